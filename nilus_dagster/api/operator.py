"""The operator surface's logic, shared by its REST routes: find the pipeline, change its
lifecycle through Dagster (components/lifecycle.py), read its checkpoints and the audit trail."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from dagster import DagsterInstance

from nilus_dagster.api import operator_models as om
from nilus_dagster.api.errors import ApiError
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.components.lifecycle import (
    TransitionRefused,
    change_state,
    lifecycle_state,
    live_runs,
)
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state.control import AuditRecord, ControlStore
from nilus_dagster.state.records import RESYNC_OPEN, OffsetRecord
from nilus_dagster.state.store import StateStore


def find_pipeline(model: ReadModel, tenant: str, resource_id: str, *, cdc: bool = True) -> Pipeline:
    """The tenant's declared pipeline with `resource_id`: 404 if none, 409 if it must be CDC and is not."""
    pipeline = next((p for p in model.declarations.for_tenant(tenant) if p.effective_resource_id == resource_id), None)
    if pipeline is None:
        raise ApiError(404, "not_found", "the tenant declares no pipeline with this resource_id")
    if cdc and pipeline.type != "cdc":
        raise ApiError(
            409,
            "not_cdc",
            f"pipeline {pipeline.name} is a batch pipeline: its runs follow its schedule (turn the schedule "
            "off in Dagster to stop it); this endpoint is for CDC pipelines",
        )
    return pipeline


def lifecycle(instance: DagsterInstance, model: ReadModel, pipeline: Pipeline) -> om.PipelineLifecycle:
    hold = ControlStore(model.store).get(pipeline.tenant, pipeline.name)
    return om.PipelineLifecycle(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        state=lifecycle_state(instance, model.store, pipeline),
        held_by=hold.actor if hold is not None and hold.held else None,
        live_run_ids=[r.run_id for r in live_runs(instance, pipeline)],
    )


def set_state(
    instance: DagsterInstance, model: ReadModel, pipeline: Pipeline, action: str, actor: str
) -> om.StateChanged:
    try:
        change = change_state(instance, model.store, pipeline, action, actor, via="api")
    except TransitionRefused as refused:
        raise ApiError(409, "invalid_transition", str(refused)) from None
    return om.StateChanged(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        previous_state=change.previous,
        state=change.state,
        terminated_run_ids=change.run_ids,
        audit_id=change.audit_id,
    )


def table_phases(store: StateStore, pipeline: Pipeline) -> tuple[OffsetRecord | None, dict[str, str]]:
    """The pipeline's durable slot offset (None before its first run) and each table's phase:
    resync (being copied again), snapshot (first copy under way), streaming or not_started."""
    offsets = store.latest_offsets(pipeline.tenant, pipeline.name)
    offset = offsets[0] if offsets else None
    progress = {p.table: p for p in store.snapshot_progress(pipeline.tenant, pipeline.name)}
    resyncing = {r.table_name for r in store.open_resyncs(pipeline.tenant, pipeline.name) if r.status in RESYNC_OPEN}
    phases = {}
    for source_table in pipeline.source.tables:
        name = source_table.name
        copying = progress.get(name)
        if name in resyncing:
            phases[name] = "resync"
        elif copying is not None and copying.partitions_done < copying.partitions_total:
            phases[name] = "snapshot"
        else:
            phases[name] = "not_started" if offset is None else "streaming"
    return offset, phases


def checkpoints(model: ReadModel, pipeline: Pipeline, now: datetime | None = None) -> om.CheckpointsResponse:
    """Per table: the durable stream position (the slot offset the run records after the sink
    committed it; one slot serves every table) unless the table is still being (re)copied."""
    now = now or datetime.now(UTC)
    offset, phases = table_phases(model.store, pipeline)
    tables = []
    for name, phase in phases.items():
        streaming = phase == "streaming" and offset is not None
        tables.append(
            om.TableCheckpoint(
                table=name,
                phase=phase,  # type: ignore[arg-type]
                lsn=offset.offset_value.get("lsn") if streaming else None,
                checkpointed_at=offset.record_insert_ts if streaming else None,
                age_seconds=round((now - offset.record_insert_ts).total_seconds(), 3) if streaming else None,
                run_id=offset.run_id if streaming else None,
            )
        )
    return om.CheckpointsResponse(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        slot=offset.offset_key if offset else None,
        tables=tables,
    )


def audit(model: ReadModel, tenant: str, q: om.AuditFilters) -> om.AuditPage:
    page = ControlStore(model.store).audit_page(
        tenant,
        pipeline=q.pipeline_name,
        resource_id=q.resource_id,
        actor=q.actor,
        action=q.action,
        result=q.result,
        at_gte=q.at_gte,
        at_lte=q.at_lte,
        limit=q.limit,
        offset=q.offset,
    )
    entries = [om.AuditEntry(pipeline_name=r.pipeline, **_audit_fields(r)) for r in page.items]
    return om.AuditPage(audit=entries, limit=q.limit, offset=q.offset, total=page.total)


def _audit_fields(record: AuditRecord) -> dict[str, Any]:
    fields = asdict(record)
    del fields["tenant"], fields["pipeline"]
    return fields
