"""The dead-letter queue of a tenant's CDC pipelines: peek, count (scope `read`), ack (scope
`operate`, role editor) and purge (scope `admin`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

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
)
from nilus_dagster.api.errors import ERROR_RESPONSES

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
