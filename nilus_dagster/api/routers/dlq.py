"""The dead-letter queue of a tenant's CDC pipelines: peek, count (scope `read`), ack and replay
(scope `operate`, role editor) and purge (scope `admin`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from nilus_dagster.api.deps import AdminTenant, Model, OperateTenant, ReadTenant
from nilus_dagster.api.dlq_models import (
    DlqAck,
    DlqChanged,
    DlqCount,
    DlqCountQuery,
    DlqEntry,
    DlqPage,
    DlqPeekQuery,
    DlqPurge,
    DlqReplay,
    DlqReplayRequest,
)
from nilus_dagster.api.errors import ERROR_RESPONSES, ApiError, ErrorBody
from nilus_dagster.state.dlq_replays import DlqReplay as ReplayRecord
from nilus_dagster.state.records import PipelineKey

router = APIRouter(prefix="/tenants/{tenant}/dlq", tags=["dead-letter queue"], responses=ERROR_RESPONSES)


@router.get("", response_model=DlqPage)
def peek(tenant: ReadTenant, model: Model, q: Annotated[DlqPeekQuery, Query()]) -> DlqPage:
    """Entries oldest first (unacknowledged only unless include_acked)."""
    page = model.store.dead_letters(tenant, q.selection(unacked=not q.include_acked), limit=q.limit, offset=q.offset)
    return DlqPage(entries=[DlqEntry.of(e) for e in page.items], limit=q.limit, offset=q.offset, total=page.total)


@router.get("/count", response_model=DlqCount)
def count(tenant: ReadTenant, model: Model, q: Annotated[DlqCountQuery, Query()]) -> DlqCount:
    return DlqCount(count=model.store.count_dead_letters(tenant, q.selection()))


@router.post("/ack", response_model=DlqChanged)
def ack(tenant: OperateTenant, model: Model, body: DlqAck) -> DlqChanged:
    """Mark entries handled up to an id (the asset check passes once a table has none left)."""
    return DlqChanged(count=model.store.ack_dead_letters(tenant, body.up_to_id, body.selection()))


@router.post("/purge", response_model=DlqChanged)
def purge(tenant: AdminTenant, model: Model, body: DlqPurge) -> DlqChanged:
    """Delete entries (all that match, or only acknowledged ones)."""
    return DlqChanged(count=model.store.purge_dead_letters(tenant, body.selection(), acked_only=body.acked_only))


@router.post(
    "/replay",
    response_model=DlqReplay,
    status_code=202,
    responses={404: {"model": ErrorBody, "description": "No such CDC pipeline or table, or no unacknowledged entry"}},
)
def replay(tenant: OperateTenant, model: Model, body: DlqReplayRequest) -> DlqReplay:
    """Replay entries once their cause is fixed: the CDC run writes the current source rows of their
    keys and acknowledges them (what the `<tenant>__<pipeline>__replay_dead_letters` job asks for)."""
    pipeline = next((p for p in model.declarations.for_tenant(tenant) if p.name == body.pipeline), None)
    if pipeline is None or pipeline.type != "cdc":
        raise ApiError(404, "not_found", f"the tenant declares no CDC pipeline {body.pipeline}")
    if body.table is not None and body.table not in {t.name for t in pipeline.source.tables}:
        raise ApiError(404, "not_found", f"{body.table} is not a table of pipeline {body.pipeline}")
    key = PipelineKey(tenant, pipeline.name, pipeline.effective_resource_id)
    replay_id, _ = model.store.request_dlq_replay(key, body.ids or None, body.table)
    record = model.store.dlq_replay(replay_id) if replay_id else None
    if record is None:
        raise ApiError(404, "not_found", "no unacknowledged dead-letter entry matches")
    return _replay(record)


@router.get("/replays/{replay_id}", response_model=DlqReplay, responses={404: {"model": ErrorBody}})
def get_replay(tenant: ReadTenant, model: Model, replay_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> DlqReplay:
    """A replay request and what became of it."""
    record = model.store.dlq_replay(replay_id)
    if record is None or record.tenant != tenant:
        raise ApiError(404, "not_found", "no such replay request")
    return _replay(record)


def _replay(record: ReplayRecord) -> DlqReplay:
    return DlqReplay(
        replay_id=record.id, pipeline_name=record.pipeline, entry_ids=record.entry_ids, status=record.status,
        message=record.message, run_id=record.run_id, requested_at=record.requested_at, updated_at=record.updated_at,
    )
