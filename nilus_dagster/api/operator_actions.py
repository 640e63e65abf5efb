"""Operator actions that are Dagster jobs of the pipeline (approve a schema change, resync tables,
reset): the API launches the job itself on the Dagster instance, so every action is a Dagster run
(visible in the UI with its logs, tagged `nilus/audit_id`, `nilus/operator`, `nilus/via=api`)
and is audited by the job (components/operator_audit.py) exactly as when launched from the UI.

The run executes in the API process (Dagster's in-process executor): these jobs only write the
state store, ask the live CDC run for work (resync) or drop the slot (reset), so they take
seconds; a resync launched here does not wait for the copy (`GET .../progress` follows it).
What the API can see is refused before any run (409/422, audited as refused)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from nilus_dagster.api import operator_models as om
from nilus_dagster.api.errors import ApiError
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.services import Services
from nilus_dagster.components.batch_assets import STATE_RESOURCE_KEY
from nilus_dagster.components.cdc_config import pipeline_key
from nilus_dagster.components.lifecycle import AUDIT_TAG, OPERATOR_TAG, live_runs
from nilus_dagster.components.operator_audit import VIA_TAG
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state import NilusStateStore
from nilus_dagster.state.control import ControlStore


def _refuse(model: ReadModel, pipeline: Pipeline, actor: str, action: str, params: dict[str, Any], error: ApiError):
    """Record a refusal the API decided (no run was launched) and raise it."""
    control, key = ControlStore(model.store), pipeline_key(pipeline)
    audit_id = control.audit_start(key.tenant, key, actor, action, {**params, "via": "api"})
    control.audit_end(audit_id, "refused", {"error": error.message}, [])
    raise error


def _step_errors(result: dg.ExecuteInProcessResult) -> str:
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            while error is not None:
                messages.append(error.message.strip())
                error = error.cause
    return "; ".join(messages) or "the run failed"


def _last_message(instance: dg.DagsterInstance, run_id: str) -> str:
    """The op's last log line: the action's outcome, as the job logs it."""
    logs = [e.user_message for e in instance.all_logs(run_id) if e.dagster_event is None and e.user_message]
    return logs[-1] if logs else ""


def launch(
    svc: Services,
    model: ReadModel,
    pipeline: Pipeline,
    operation: str,
    action: str,
    actor: str,
    config: dict[str, Any] | None = None,
) -> om.ActionLaunched:
    """Run the pipeline's job `<tenant>__<pipeline>__<operation>` on the instance as `actor`."""
    from nilus_dagster.components.cdc_operator_jobs import operator_jobs

    spec = model.declarations.spec(pipeline)
    if spec is None or not svc.settings.state_dsn:
        raise ApiError(503, "unavailable", "the pipeline's declaration or the state store is not available")
    name = f"{pipeline.job_name}__{operation}"
    job = next(j for j in operator_jobs(spec, pipeline) if j.name == name)
    state = NilusStateStore(dsn=svc.settings.state_dsn, schema_name=svc.settings.state_schema)
    run_config = {"ops": {f"{name}_op": {"config": config}}} if config is not None else {}
    result = job.execute_in_process(
        run_config=run_config,
        instance=svc.instance,
        resources={STATE_RESOURCE_KEY: state},
        tags={OPERATOR_TAG: actor, VIA_TAG: "api"},
        raise_on_error=False,
    )
    run = svc.instance.get_run_by_id(result.run_id)
    audit_id = int(run.tags.get(AUDIT_TAG, "0")) if run is not None else 0
    if not result.success:
        raise ApiError(
            500, "action_failed", f"job {name} failed (Dagster run {result.run_id}, audit {audit_id}): "
            f"{_step_errors(result)}"
        )
    return om.ActionLaunched(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        action=action,
        job_name=name,
        run_id=result.run_id,
        success=True,
        message=_last_message(svc.instance, result.run_id),
        audit_id=audit_id,
    )


def approve_schema(svc: Services, model: ReadModel, pipeline: Pipeline, actor: str) -> om.ActionLaunched:
    from nilus_dagster.cdc.operations import proposed_schema

    if proposed_schema(model.store, pipeline_key(pipeline)) is None:
        message = f"pipeline {pipeline.name} has no schema change waiting for approval"
        error = ApiError(409, "no_pending_schema", message)
        _refuse(model, pipeline, actor, "schema:approve", {}, error)
    return launch(svc, model, pipeline, "approve_schema", "schema:approve", actor)


def resync(svc: Services, model: ReadModel, pipeline: Pipeline, body: om.ResyncBody, actor: str) -> om.ActionLaunched:
    from nilus_dagster.cdc.resync import UnknownTables, validate_resync_tables
    from nilus_dagster.schema import TableName

    params = {"tables": list(body.tables), "reason": body.reason}
    try:
        names = validate_resync_tables(body.tables, [TableName.parse(t.name) for t in pipeline.source.tables])
    except UnknownTables as unknown:
        _refuse(model, pipeline, actor, "resync", params, ApiError(422, "unknown_tables", str(unknown)))
    config = {"tables": [n.qualified for n in names], "reason": body.reason, "wait_s": 0.0}
    return launch(svc, model, pipeline, "resync", "resync", actor, config)


def reset(svc: Services, model: ReadModel, pipeline: Pipeline, actor: str) -> om.ActionLaunched:
    """Refused while a run of the pipeline is live (it holds the slot): stop the pipeline first."""
    live = live_runs(svc.instance, pipeline)
    if live:
        error = ApiError(
            409,
            "pipeline_running",
            f"cannot reset pipeline {pipeline.name}: run {live[0].run_id} is live; stop the pipeline first "
            "(PUT .../state stop)",
        )
        _refuse(model, pipeline, actor, "reset", {}, error)
    return launch(svc, model, pipeline, "reset", "reset", actor)
