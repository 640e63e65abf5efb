"""Tenant CDC state: persisted offsets and schema history, newest first; failed tables and their retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from nilus_dagster.api import models
from nilus_dagster.api.deps import Model, OperateTenant, ReadTenant
from nilus_dagster.api.errors import ERROR_RESPONSES, ApiError, ErrorBody
from nilus_dagster.api.params import NAME_PATTERN, OffsetFilters, SchemaHistoryFilters, TableFailureFilters
from nilus_dagster.state.records import PipelineKey, TableFailure

router = APIRouter(prefix="/tenants/{tenant}/cdc", tags=["cdc"], responses=ERROR_RESPONSES)
PipelineName = Annotated[str, Path(pattern=NAME_PATTERN, description="Pipeline name")]
TableParam = Annotated[
    str, Path(pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$", description="schema.table")
]


def _failure(f: TableFailure) -> models.TableFailureOut:
    return models.TableFailureOut(
        pipeline_name=f.pipeline,
        table_name=f.table_name,
        status=f.status,
        reason=f.reason,
        checkpoint=f.checkpoint,
        run_id=f.run_id,
        failed_at=f.failed_at,
        updated_at=f.updated_at,
    )


@router.get("/offset-storage", response_model=models.OffsetsPage)
def offset_storage(tenant: ReadTenant, model: Model, q: Annotated[OffsetFilters, Query()]) -> models.OffsetsPage:
    return model.offsets(tenant, q)


@router.get("/schema-history", response_model=models.SchemaHistoryPage)
def schema_history(
    tenant: ReadTenant, model: Model, q: Annotated[SchemaHistoryFilters, Query()]
) -> models.SchemaHistoryPage:
    return model.schema_history(tenant, q)


@router.get("/table-failures", response_model=models.TableFailuresResponse)
def table_failures(
    tenant: ReadTenant, model: Model, q: Annotated[TableFailureFilters, Query()]
) -> models.TableFailuresResponse:
    """CDC tables held in state `failed` (their sink apply kept failing; the others keep streaming)."""
    failures = [_failure(f) for f in model.store.table_failures(tenant, q.pipeline)]
    return models.TableFailuresResponse(failures=failures, total=len(failures))


@router.post(
    "/pipelines/{pipeline_name}/tables/{table}/retry",
    response_model=models.TableRetryResponse,
    status_code=202,
    responses={404: {"model": ErrorBody, "description": "The table is not failed in this pipeline"}},
)
def retry_table(
    tenant: OperateTenant, pipeline_name: PipelineName, table: TableParam, model: Model
) -> models.TableRetryResponse:
    """Stream a failed table again from its checkpoint (fix the cause first). Needs scope `operate` or `admin`."""
    retried = model.store.request_table_retry(PipelineKey(tenant, pipeline_name, ""), [table])
    if not retried:
        raise ApiError(404, "not_found", f"table {table} of pipeline {pipeline_name} is not failed")
    return models.TableRetryResponse(pipeline_name=pipeline_name, table_name=table, status="retry")
