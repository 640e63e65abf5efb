"""The operator surface in GraphQL: lifecycle state, checkpoints, audit (queries) and
`setPipelineState` (mutation), over the same logic, tokens and scopes as REST."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import strawberry
from pydantic import ValidationError
from strawberry.experimental.pydantic import type as pydantic_type
from strawberry.scalars import JSON
from strawberry.types import Info

from nilus_dagster.api import operator
from nilus_dagster.api import operator_models as om
from nilus_dagster.api.graphql_errors import GraphQLApiError, call_model

T = TypeVar("T")


@pydantic_type(model=om.PipelineLifecycle, all_fields=True)
class PipelineLifecycle:
    pass


@pydantic_type(model=om.StateChanged, all_fields=True)
class StateChanged:
    pass


@pydantic_type(model=om.TableCheckpoint, all_fields=True)
class TableCheckpoint:
    phase: str  # streaming, snapshot, resync or not_started


@pydantic_type(model=om.CheckpointsResponse, all_fields=True)
class Checkpoints:
    pass


@pydantic_type(model=om.AuditEntry, all_fields=True)
class AuditEntry:
    params: JSON
    detail: JSON


@pydantic_type(model=om.AuditPage, all_fields=True)
class AuditPage:
    pass


async def _as(info: Info, scope: str, tenant: str, run: Callable[[Any], T]) -> T:
    principal = info.context["principal"]
    if not principal.may(scope, tenant):
        raise GraphQLApiError(f"this token may not {scope} this tenant", "forbidden")
    return await call_model(info, run)


@strawberry.type
class OperatorQuery:
    @strawberry.field(description="A CDC pipeline's lifecycle state and its live runs")
    async def pipeline_state(self, info: Info, tenant: str, resource_id: str) -> PipelineLifecycle:
        def run(model: Any) -> om.PipelineLifecycle:
            return operator.lifecycle(model.runs.instance, model, operator.find_pipeline(model, tenant, resource_id))

        return PipelineLifecycle.from_pydantic(await _as(info, "read", tenant, run))

    @strawberry.field(description="Per table: the durable position and its time, or the copy phase")
    async def checkpoints(self, info: Info, tenant: str, resource_id: str) -> Checkpoints:
        def run(model: Any) -> om.CheckpointsResponse:
            return operator.checkpoints(model, operator.find_pipeline(model, tenant, resource_id))

        return Checkpoints.from_pydantic(await _as(info, "read", tenant, run))

    @strawberry.field(description="Operator actions, newest first")
    async def audit(
        self,
        info: Info,
        tenant: str,
        resource_id: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        result: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> AuditPage:
        given = {"resource_id": resource_id, "actor": actor, "action": action, "result": result}
        given |= {"limit": limit, "offset": offset}
        try:
            q = om.AuditFilters(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            raise GraphQLApiError(str(exc.errors()[0]["msg"]), "invalid_parameter") from None
        return AuditPage.from_pydantic(await _as(info, "read", tenant, lambda model: operator.audit(model, tenant, q)))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="start, stop, pause or resume a CDC pipeline (scope operate)")
    async def set_pipeline_state(self, info: Info, tenant: str, resource_id: str, state: str) -> StateChanged:
        try:
            body = om.StateChange(state=state)  # type: ignore[arg-type]
        except ValidationError:
            raise GraphQLApiError("state must be start, stop, pause or resume", "invalid_parameter") from None
        actor = info.context["principal"].name

        def run(model: Any) -> om.StateChanged:
            pipeline = operator.find_pipeline(model, tenant, resource_id)
            return operator.set_state(model.runs.instance, model, pipeline, body.state, actor)

        return StateChanged.from_pydantic(await _as(info, "operate", tenant, run))
