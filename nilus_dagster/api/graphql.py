"""GraphQL at `/nilus-manager/graphql`: the REST read model, the same bearer tokens and scoping.

A missing or bad token is an HTTP 401 (as in REST); another tenant or scope is a GraphQL error
with `extensions.code` `forbidden`. Arguments are validated by the REST query models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import strawberry
from fastapi import Depends
from graphql import GraphQLError
from pydantic import ValidationError
from strawberry.experimental.pydantic import type as pydantic_type
from strawberry.extensions import MaskErrors
from strawberry.fastapi import GraphQLRouter
from strawberry.scalars import JSON
from strawberry.tools import merge_types
from strawberry.types import ExecutionContext, Info
from strawberry.utils.logging import StrawberryLogger

from nilus_dagster.api import models
from nilus_dagster.api.auth import Principal
from nilus_dagster.api.deps import authenticate, read_model, services
from nilus_dagster.api.graphql_errors import GraphQLApiError as _Error
from nilus_dagster.api.graphql_errors import call_model
from nilus_dagster.api.graphql_operator import Mutation, OperatorQuery
from nilus_dagster.api.params import (
    OffsetFilters,
    PipelineFilters,
    RunFilters,
    SchemaHistoryFilters,
    StatsQuery,
)
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.services import Services

T = TypeVar("T")
log = logging.getLogger(__name__)


@pydantic_type(model=models.Run, all_fields=True)
class Run:
    pass


@pydantic_type(model=models.Pipeline, all_fields=True)
class Pipeline:
    labels: JSON


@pydantic_type(model=models.PipelinesPage, all_fields=True)
class PipelinesPage:
    pass


@pydantic_type(model=models.RunsPage, all_fields=True)
class RunsPage:
    pass


@pydantic_type(model=models.RunStats, all_fields=True)
class RunStats:
    pass


@pydantic_type(model=models.StatsResponse, all_fields=True)
class StatsResponse:
    pass


@pydantic_type(model=models.OffsetRecord, all_fields=True)
class OffsetRecord:
    offset_value: JSON


@pydantic_type(model=models.OffsetsPage, all_fields=True)
class OffsetsPage:
    pass


@pydantic_type(model=models.SchemaHistoryRecord, all_fields=True)
class SchemaHistoryRecord:
    table_schema: JSON


@pydantic_type(model=models.SchemaHistoryPage, all_fields=True)
class SchemaHistoryPage:
    pass


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'argument'}: {e['msg']}" for e in exc.errors())


async def _resolve(info: Info, tenant: str, build: Callable[[], Any], run: Callable[[ReadModel, Any], T]) -> T:
    """Check the caller may read `tenant`, validate the arguments, run the query off the event loop."""
    principal: Principal = info.context["principal"]
    if not principal.may("read", tenant):
        raise _Error("this token may not read this tenant", "forbidden")
    try:
        args = build()
    except ValidationError as exc:
        raise _Error(_describe(exc), "invalid_parameter") from None
    return await call_model(info, lambda model: run(model, args))


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


@strawberry.type
class Query:
    @strawberry.field(description="Pipelines declared for the tenant, with their latest run")
    async def pipelines(
        self,
        info: Info,
        tenant: str,
        run_as_user: str | None = None,
        is_success: bool | None = None,
        resource_id: str | None = None,
        started_at: str | None = None,
        started_at_gte: str | None = None,
        started_at_lte: str | None = None,
        label: list[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> PipelinesPage:
        args = _given(
            label=label,
            run_as_user=run_as_user,
            is_success=is_success,
            resource_id=resource_id,
            started_at=started_at,
            started_at_gte=started_at_gte,
            started_at_lte=started_at_lte,
            limit=limit,
            offset=offset,
        )
        page = await _resolve(info, tenant, lambda: PipelineFilters(**args), lambda m, q: m.pipelines(tenant, q))
        return PipelinesPage.from_pydantic(page)

    @strawberry.field(description="A pipeline's runs, newest first")
    async def runs(
        self,
        info: Info,
        tenant: str,
        resource_id: str,
        is_success: bool | None = None,
        run_as_user: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> RunsPage:
        args = _given(is_success=is_success, run_as_user=run_as_user, limit=limit, offset=offset)
        page = await _resolve(
            info, tenant, lambda: RunFilters(**args), lambda m, q: m.runs_page(tenant, resource_id, q)
        )
        return RunsPage.from_pydantic(page)

    @strawberry.field(description="Run statistics over a period such as 24h, 7d or 30d")
    async def stats(self, info: Info, tenant: str, resource_id: str, period: str = "24h") -> StatsResponse:
        result = await _resolve(
            info, tenant, lambda: StatsQuery(period=period), lambda m, q: m.stats(tenant, resource_id, q)
        )
        return StatsResponse.from_pydantic(result)

    @strawberry.field(description="Persisted CDC offsets, newest first")
    async def offset_storage(
        self,
        info: Info,
        tenant: str,
        resource_id: str | None = None,
        connector_name: str | None = None,
        offset_key: str | None = None,
        record_insert_ts_gte: str | None = None,
        record_insert_ts_lte: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> OffsetsPage:
        args = _given(
            resource_id=resource_id,
            connector_name=connector_name,
            offset_key=offset_key,
            record_insert_ts_gte=record_insert_ts_gte,
            record_insert_ts_lte=record_insert_ts_lte,
            limit=limit,
            offset=offset,
        )
        page = await _resolve(info, tenant, lambda: OffsetFilters(**args), lambda m, q: m.offsets(tenant, q))
        return OffsetsPage.from_pydantic(page)

    @strawberry.field(description="Persisted CDC schema history, newest first")
    async def schema_history(
        self,
        info: Info,
        tenant: str,
        resource_id: str | None = None,
        connector_name: str | None = None,
        record_insert_ts_gte: str | None = None,
        record_insert_ts_lte: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> SchemaHistoryPage:
        args = _given(
            resource_id=resource_id,
            connector_name=connector_name,
            record_insert_ts_gte=record_insert_ts_gte,
            record_insert_ts_lte=record_insert_ts_lte,
            limit=limit,
            offset=offset,
        )
        page = await _resolve(
            info, tenant, lambda: SchemaHistoryFilters(**args), lambda m, q: m.schema_history(tenant, q)
        )
        return SchemaHistoryPage.from_pydantic(page)


def _is_internal(error: GraphQLError) -> bool:
    """Unexpected exceptions are internal; GraphQL syntax/validation errors and ours are not."""
    original = error.original_error
    return original is not None and not isinstance(original, _Error)


class _Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Only unexpected exceptions are logged as errors (with their traceback); a refused
        token, a bad argument, an outage or a malformed query is the caller's answer, not ours."""
        for error in errors:
            if _is_internal(error):
                StrawberryLogger.error(error, execution_context)
            else:
                code = (error.extensions or {}).get("code", "invalid_query")
                log.log(logging.WARNING if code == "unavailable" else logging.INFO, "graphql %s: %s", code, error)


schema = _Schema(
    query=merge_types("Query", (Query, OperatorQuery)),
    mutation=Mutation,
    # Anything but our own errors is masked: no internals (or other tenants' data) in messages.
    extensions=[lambda: MaskErrors(should_mask_error=_is_internal)],  # a fresh extension per request
)


async def _context(
    principal: Annotated[Principal, Depends(authenticate)],
    model: Annotated[ReadModel, Depends(read_model)],
    svc: Annotated[Services, Depends(services)],
) -> dict[str, Any]:
    return {"principal": principal, "model": model, "services": svc}


def graphql_router() -> GraphQLRouter:
    return GraphQLRouter(schema, context_getter=_context, graphql_ide=None)
