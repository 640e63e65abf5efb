"""The operator surface in GraphQL: lifecycle state, checkpoints, progress, metrics, proposed
schema, drift, audit (queries) and `setPipelineState`, `approveSchema`, `resyncTables`,
`resetPipeline` (mutations), over the same logic, tokens and scopes as REST."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import strawberry
from pydantic import ValidationError
from strawberry.experimental.pydantic import type as pydantic_type
from strawberry.scalars import JSON
from strawberry.types import Info

from nilus_dagster.api import operator, operator_actions, operator_reads
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


@pydantic_type(model=om.TableProgress, all_fields=True)
class TableProgress:
    phase: str


@pydantic_type(model=om.ProgressResponse, all_fields=True)
class Progress:
    phase: str


@pydantic_type(model=om.TableMetrics, all_fields=True)
class TableMetrics:
    pass


@pydantic_type(model=om.PipelineMetrics, all_fields=True)
class PipelineMetrics:
    pass


@pydantic_type(model=om.ProposedSchema, all_fields=True)
class ProposedSchema:
    current_schema: JSON | None
    proposed_schema: JSON | None


@pydantic_type(model=om.ColumnRetyped, all_fields=True)
class ColumnRetyped:
    pass


@pydantic_type(model=om.TableDrift, all_fields=True)
class TableDrift:
    compared_with: str


@pydantic_type(model=om.DriftResponse, all_fields=True)
class Drift:
    pass


@pydantic_type(model=om.ActionLaunched, all_fields=True)
class ActionLaunched:
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

    @strawberry.field(description="The copy phase and, per table, partitions and rows copied")
    async def progress(self, info: Info, tenant: str, resource_id: str) -> Progress:
        def run(model: Any) -> om.ProgressResponse:
            return operator_reads.progress(model, operator.find_pipeline(model, tenant, resource_id))

        return Progress.from_pydantic(await _as(info, "read", tenant, run))

    @strawberry.field(description="State, events/s, lag, last checkpoint, events and sink errors; per table")
    async def pipeline_metrics(self, info: Info, tenant: str, resource_id: str) -> PipelineMetrics:
        def run(model: Any) -> om.PipelineMetrics:
            pipeline = operator.find_pipeline(model, tenant, resource_id)
            return operator_reads.metrics(model.runs.instance, model, pipeline)

        return PipelineMetrics.from_pydantic(await _as(info, "read", tenant, run))

    @strawberry.field(description="The schema change waiting for approval, if any")
    async def proposed_schema(self, info: Info, tenant: str, resource_id: str) -> ProposedSchema:
        def run(model: Any) -> om.ProposedSchema:
            return operator_reads.proposed_schema(model, operator.find_pipeline(model, tenant, resource_id))

        return ProposedSchema.from_pydantic(await _as(info, "read", tenant, run))

    @strawberry.field(description="Per table: columns added, dropped or retyped in the source against the sink")
    async def drift(self, info: Info, tenant: str, resource_id: str) -> Drift:
        def run(model: Any) -> om.DriftResponse:
            return operator_reads.drift(model, operator.find_pipeline(model, tenant, resource_id))

        return Drift.from_pydantic(await _as(info, "read", tenant, run))

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

    @strawberry.mutation(description="Approve the held schema change: runs the job __approve_schema (scope operate)")
    async def approve_schema(self, info: Info, tenant: str, resource_id: str) -> ActionLaunched:
        actor, svc = info.context["principal"].name, info.context["services"]

        def run(model: Any) -> om.ActionLaunched:
            pipeline = operator.find_pipeline(model, tenant, resource_id)
            return operator_actions.approve_schema(svc, model, pipeline, actor)

        return ActionLaunched.from_pydantic(await _as(info, "operate", tenant, run))

    @strawberry.mutation(description="Copy tables again: runs the job __resync (scope operate)")
    async def resync_tables(
        self, info: Info, tenant: str, resource_id: str, tables: list[str], reason: str | None = None
    ) -> ActionLaunched:
        try:
            body = om.ResyncBody(tables=tables, **({"reason": reason} if reason is not None else {}))
        except ValidationError as exc:
            raise GraphQLApiError(str(exc.errors()[0]["msg"]), "invalid_parameter") from None
        actor, svc = info.context["principal"].name, info.context["services"]

        def run(model: Any) -> om.ActionLaunched:
            pipeline = operator.find_pipeline(model, tenant, resource_id)
            return operator_actions.resync(svc, model, pipeline, body, actor)

        return ActionLaunched.from_pydantic(await _as(info, "operate", tenant, run))

    @strawberry.mutation(description="Start over: runs the job __reset (scope admin; refused while a run is live)")
    async def reset_pipeline(self, info: Info, tenant: str, resource_id: str) -> ActionLaunched:
        actor, svc = info.context["principal"].name, info.context["services"]

        def run(model: Any) -> om.ActionLaunched:
            return operator_actions.reset(svc, model, operator.find_pipeline(model, tenant, resource_id), actor)

        return ActionLaunched.from_pydantic(await _as(info, "admin", tenant, run))
