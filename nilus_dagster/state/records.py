"""Typed records returned by the state store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PipelineKey:
    """Identifies a pipeline everywhere: run tags, state rows, API paths."""

    tenant: str
    pipeline: str
    resource_id: str


# Pipeline states a pipeline can be in (CDC uses all; batch uses active/failed).
PIPELINE_STATES = ("active", "paused", "pending_schema_approval", "failed", "stopped")


@dataclass(frozen=True)
class PipelineState:
    tenant: str
    pipeline: str
    resource_id: str
    state: str
    detail: dict[str, Any]
    updated_at: datetime


@dataclass(frozen=True)
class OffsetRecord:
    id: int
    tenant: str
    pipeline: str
    resource_id: str
    connector_name: str
    offset_key: str
    offset_value: dict[str, Any]
    run_id: str | None
    record_insert_ts: datetime


@dataclass(frozen=True)
class SchemaHistoryRecord:
    id: int
    tenant: str
    pipeline: str
    resource_id: str
    connector_name: str
    table_name: str
    table_schema: dict[str, Any]
    lsn: str | None
    record_insert_ts: datetime


@dataclass(frozen=True)
class SnapshotPartition:
    table_name: str
    partition_no: int
    start_block: int
    end_block: int
    rows_estimate: int
    rows_done: int
    done: bool


@dataclass(frozen=True)
class SnapshotTableProgress:
    table: str
    partitions_total: int
    partitions_done: int
    rows_total: int
    rows_done: int

    @property
    def percent(self) -> float:
        if self.partitions_total == 0:
            return 100.0
        if self.rows_total > 0:
            return round(min(100.0, 100.0 * self.rows_done / self.rows_total), 2)
        return round(100.0 * self.partitions_done / self.partitions_total, 2)


# A resync request's life: pending → running (a CDC run works on it) → done | failed.
RESYNC_OPEN = ("pending", "running")


@dataclass(frozen=True)
class ResyncRequest:
    """An operator's (or a schema change's) request to re-snapshot one table of a CDC pipeline."""

    id: int
    tenant: str
    pipeline: str
    table_name: str
    reason: str
    status: str
    run_id: str | None
    error: str | None
    requested_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Heartbeat:
    run_id: str
    beat_at: datetime
    detail: dict[str, Any]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    total: int


# A CDC table held because its sink apply keeps failing: failed → retry (asked by an operator) →
# retrying (a run streams it again) → the row is removed once a change reached the sink.
TABLE_FAILURE_STATES = ("failed", "retry", "retrying")


@dataclass(frozen=True)
class TableFailure:
    """One CDC table of a pipeline held in state `failed`: why, and where it stopped."""

    tenant: str
    pipeline: str
    table_name: str
    status: str
    reason: str
    checkpoint: str | None  # its sink checkpoint (LSN): it continues from there once fixed
    run_id: str | None
    failed_at: datetime
    updated_at: datetime
