"""The operator surface: a CDC pipeline's lifecycle (through Dagster), progress, metrics,
checkpoints, drift, schema approval, resync and reset (Dagster jobs), the audit trail of operator
actions, and validation of a defs YAML. Writes need scope `operate` (role editor; reset: `admin`);
reads need `read`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from nilus_dagster.api import operator, operator_actions, operator_reads
from nilus_dagster.api import operator_models as om
from nilus_dagster.api.auth import Principal
from nilus_dagster.api.deps import AdminTenant, Model, OperateTenant, ReadTenant, authenticate, services
from nilus_dagster.api.errors import ERROR_RESPONSES, ApiError, ErrorBody
from nilus_dagster.api.routers.monitoring import NOT_FOUND, ResourceId
from nilus_dagster.api.services import Services
from nilus_dagster.spec.check import check_defs_text

router = APIRouter(tags=["operator"], responses=ERROR_RESPONSES)
Svc = Annotated[Services, Depends(services)]
Caller = Annotated[Principal, Depends(authenticate)]
PIPELINE = "/tenants/{tenant}/pipelines/{resource_id}"
CONFLICT: dict[int | str, dict] = {
    **NOT_FOUND,
    409: {"model": ErrorBody, "description": "Not allowed from the current state (named), or not a CDC pipeline"},
}
ACTION: dict[int | str, dict] = {
    **CONFLICT,
    500: {"model": ErrorBody, "description": "The Dagster job ran and failed (`action_failed`, naming its run)"},
}
MAX_DEFS_BYTES = 1_000_000


@router.get(f"{PIPELINE}/state", response_model=om.PipelineLifecycle, responses=CONFLICT)
def get_state(tenant: ReadTenant, resource_id: ResourceId, model: Model, svc: Svc) -> om.PipelineLifecycle:
    """The CDC pipeline's lifecycle state and its live runs."""
    return operator.lifecycle(svc.instance, model, operator.find_pipeline(model, tenant, resource_id))


@router.put(f"{PIPELINE}/state", response_model=om.StateChanged, responses=CONFLICT)
def put_state(
    tenant: OperateTenant, resource_id: ResourceId, body: om.StateChange, model: Model, svc: Svc, caller: Caller
) -> om.StateChanged:
    """start (from stopped), stop (from running or paused: the live run flushes and ends CANCELED,
    no relaunch), pause (from running: the slot is kept, nothing is consumed), resume (from
    paused). The keep-alive sensor launches the run after a start or resume. Audited."""
    pipeline = operator.find_pipeline(model, tenant, resource_id)
    return operator.set_state(svc.instance, model, pipeline, body.state, caller.name)


@router.get(f"{PIPELINE}/checkpoints", response_model=om.CheckpointsResponse, responses=CONFLICT)
def get_checkpoints(tenant: ReadTenant, resource_id: ResourceId, model: Model) -> om.CheckpointsResponse:
    """Per table: the durable position (LSN) and when it was recorded, or the copy phase it is in."""
    return operator.checkpoints(model, operator.find_pipeline(model, tenant, resource_id))


@router.get(f"{PIPELINE}/progress", response_model=om.ProgressResponse, responses=CONFLICT)
def get_progress(tenant: ReadTenant, resource_id: ResourceId, model: Model) -> om.ProgressResponse:
    """The copy phase, and per table its partitions and rows copied (Nanosync's shape)."""
    return operator_reads.progress(model, operator.find_pipeline(model, tenant, resource_id))


@router.get(f"{PIPELINE}/metrics", response_model=om.PipelineMetrics, responses=CONFLICT)
def get_metrics(tenant: ReadTenant, resource_id: ResourceId, model: Model, svc: Svc) -> om.PipelineMetrics:
    """State, recent events/s, replication lag, last checkpoint, events and sink errors (the live or
    last run's), the slot's retained WAL; per table its events and whether it is failed."""
    return operator_reads.metrics(svc.instance, model, operator.find_pipeline(model, tenant, resource_id))


@router.get(f"{PIPELINE}/schema/proposed", response_model=om.ProposedSchema, responses=CONFLICT)
def get_proposed_schema(tenant: ReadTenant, resource_id: ResourceId, model: Model) -> om.ProposedSchema:
    """The schema change a `schema_changes: pause` pipeline holds for approval (`pending` false if none)."""
    return operator_reads.proposed_schema(model, operator.find_pipeline(model, tenant, resource_id))


@router.post(f"{PIPELINE}/schema/approve", response_model=om.ActionLaunched, responses=ACTION)
def approve_schema(
    tenant: OperateTenant, resource_id: ResourceId, model: Model, svc: Svc, caller: Caller
) -> om.ActionLaunched:
    """Approve the held schema change: runs the job `__approve_schema` on the Dagster instance; the
    CDC run restarts and applies it. 409 `no_pending_schema` if none waits. Audited."""
    pipeline = operator.find_pipeline(model, tenant, resource_id)
    return operator_actions.approve_schema(svc, model, pipeline, caller.name)


@router.get(f"{PIPELINE}/drift", response_model=om.DriftResponse, responses=CONFLICT)
def get_drift(tenant: ReadTenant, resource_id: ResourceId, model: Model) -> om.DriftResponse:
    """Per table: columns added, dropped or retyped in the source against the sink."""
    return operator_reads.drift(model, operator.find_pipeline(model, tenant, resource_id))


@router.post(f"{PIPELINE}/resync", response_model=om.ActionLaunched, responses=ACTION)
def resync_tables(
    tenant: OperateTenant, resource_id: ResourceId, body: om.ResyncBody, model: Model, svc: Svc, caller: Caller
) -> om.ActionLaunched:
    """Copy tables again while the others keep streaming: runs the job `__resync` on the Dagster
    instance (it asks the live CDC run, or the next one); follow it at `.../progress`. Audited."""
    pipeline = operator.find_pipeline(model, tenant, resource_id)
    return operator_actions.resync(svc, model, pipeline, body, caller.name)


@router.post(f"{PIPELINE}/reset", response_model=om.ActionLaunched, responses=ACTION)
def reset_pipeline(
    tenant: AdminTenant, resource_id: ResourceId, model: Model, svc: Svc, caller: Caller
) -> om.ActionLaunched:
    """Start over (scope admin): runs the job `__reset` (drops the slot and the snapshot progress;
    the next run snapshots every table again). 409 while a run is live: stop the pipeline first."""
    pipeline = operator.find_pipeline(model, tenant, resource_id)
    return operator_actions.reset(svc, model, pipeline, caller.name)


@router.get("/tenants/{tenant}/audit", response_model=om.AuditPage)
def get_audit(tenant: ReadTenant, model: Model, q: Annotated[om.AuditFilters, Query()]) -> om.AuditPage:
    """Operator actions (REST and Dagster jobs): who, what, when, result, the runs they touched; newest first."""
    return operator.audit(model, tenant, q)


@router.post(
    "/validate",
    response_model=om.ValidationReport,
    responses={422: {"model": om.ValidationReport, "description": "The YAML is invalid; `problems` lists each"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/yaml": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
            },
        }
    },
)
async def validate(request: Request, _: Caller) -> JSONResponse:
    """Check a defs.yaml (the request body) as `dg check defs` would; nothing is applied."""
    raw = await request.body()
    if len(raw) > MAX_DEFS_BYTES:
        raise ApiError(413, "too_large", f"the defs YAML may not exceed {MAX_DEFS_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_body", "the body must be UTF-8 YAML text") from None
    name = request.query_params.get("file", "defs.yaml")
    check = check_defs_text(text, name)
    if not check.problems:
        return JSONResponse(om.ValidationReport(valid=True, pipelines=check.pipelines).model_dump(mode="json"))
    report = om.ValidationReport(
        valid=False,
        error=f"{len(check.problems)} problem(s) in {name}: " + "; ".join(p.message for p in check.problems),
        code="invalid_defs",
        problems=[om.DefsProblem(file=p.file, field=p.field, value=p.value, message=p.message) for p in check.problems],
    )
    return JSONResponse(report.model_dump(mode="json"), status_code=422)
