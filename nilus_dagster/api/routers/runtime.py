"""Internal runtime API (scope `runtime`): a runtime elsewhere persists its state over HTTP.

Same `StateStore` methods the in-process runtime calls, so both paths write identical rows.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from nilus_dagster.api import models
from nilus_dagster.api.declarations import DeclarationsUnavailable
from nilus_dagster.api.deps import Model, RuntimeTenant
from nilus_dagster.api.errors import ERROR_RESPONSES
from nilus_dagster.api.params import NAME_PATTERN, Paging
from nilus_dagster.api.read_model import ReadModel, offset_record, schema_record
from nilus_dagster.state.records import PipelineKey

router = APIRouter(prefix="/tenants/{tenant}", tags=["runtime (internal)"], responses=ERROR_RESPONSES)
PipelineName = Annotated[str, Path(pattern=NAME_PATTERN, description="Pipeline name")]


def _key(model: ReadModel, tenant: str, pipeline: str, resource_id: str | None) -> PipelineKey:
    if resource_id is None:
        try:
            declared = model.declarations.find(tenant, pipeline)
        except DeclarationsUnavailable:
            declared = None
        resource_id = declared.effective_resource_id if declared else f"nilus:v1:{pipeline}:{tenant}"
    return PipelineKey(tenant, pipeline, resource_id)


@router.post("/pipeline/runs", response_model=models.Stored, status_code=201)
def store_run(tenant: RuntimeTenant, model: Model, body: models.RunPost) -> models.Stored:
    """Store pipeline-run metadata."""
    key = _key(model, tenant, body.pipeline_name, body.resource_id)
    return models.Stored(stored=True, id=model.store.record_run(key, body.run_id, body.payload))


@router.get("/pipeline/{pipeline_name}/state", response_model=models.StateResponse)
def get_state(tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model) -> models.StateResponse:
    """The pipeline's current state (null if never stored)."""
    s = model.store.get_pipeline_state(tenant, pipeline_name)
    state = None
    if s is not None:
        state = models.PipelineStateOut(
            pipeline_name=s.pipeline,
            resource_id=s.resource_id,
            state=s.state,
            detail=s.detail,
            updated_at=s.updated_at,
        )
    return models.StateResponse(pipeline_name=pipeline_name, state=state)


@router.post("/pipeline/{pipeline_name}/state", response_model=models.Stored, status_code=201)
def set_state(
    tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model, body: models.StatePost
) -> models.Stored:
    model.store.set_pipeline_state(_key(model, tenant, pipeline_name, body.resource_id), body.state, body.detail)
    return models.Stored(stored=True)


@router.get("/pipeline/{pipeline_name}/offsets", response_model=models.LatestOffsetsResponse)
def get_offsets(tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model) -> models.LatestOffsetsResponse:
    """The latest CDC offsets: the newest record of each (connector_name, offset_key), newest first."""
    records = model.store.latest_offsets(tenant, pipeline_name)
    return models.LatestOffsetsResponse(pipeline_name=pipeline_name, offsets=[offset_record(r) for r in records])


@router.post("/pipeline/{pipeline_name}/offsets", response_model=models.Stored, status_code=201)
def store_offsets(
    tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model, body: models.OffsetPost
) -> models.Stored:
    model.store.append_offset(
        _key(model, tenant, pipeline_name, body.resource_id),
        connector_name=body.connector_name,
        offset_key=body.offset_key,
        offset_value=body.offset_value,
        run_id=body.run_id,
    )
    return models.Stored(stored=True)


@router.get("/pipeline/{pipeline_name}/schema-history", response_model=models.PipelineSchemaHistoryPage)
def get_schema_history(
    tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model, q: Annotated[Paging, Query()]
) -> models.PipelineSchemaHistoryPage:
    """The pipeline's stored schema history (every table), newest first."""
    page = model.store.list_schema_history(tenant, pipeline=pipeline_name, limit=q.limit, offset=q.offset)
    return models.PipelineSchemaHistoryPage(
        pipeline_name=pipeline_name,
        schema_history=[schema_record(r) for r in page.items],
        limit=q.limit,
        offset=q.offset,
        total=page.total,
    )


@router.get("/pipeline/{pipeline_name}/schema-history/exists", response_model=models.ExistsResponse)
def schema_history_exists(tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model) -> models.ExistsResponse:
    return models.ExistsResponse(
        pipeline_name=pipeline_name, exists=model.store.has_schema_history(tenant, pipeline_name)
    )


@router.post("/pipeline/{pipeline_name}/schema-history", response_model=models.Stored, status_code=201)
def store_schema_history(
    tenant: RuntimeTenant, pipeline_name: PipelineName, model: Model, body: models.SchemaHistoryPost
) -> models.Stored:
    model.store.append_schema(
        _key(model, tenant, pipeline_name, body.resource_id),
        connector_name=body.connector_name,
        table_name=body.table_name,
        table_schema=body.table_schema,
        lsn=body.lsn,
    )
    return models.Stored(stored=True)


@router.get("/storage/health", response_model=models.StorageHealth)
def storage_health(tenant: RuntimeTenant, model: Model) -> models.StorageHealth:
    """Whether the state store answers (503 when it does not)."""
    model.store.ping()  # StateStoreError -> 503 {"error", "code"}
    return models.StorageHealth(status="ok")
