"""Response and body models of the operator surface (lifecycle, checkpoints, audit, validate)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nilus_dagster.api.params import Paging, Text, UtcDatetime


class StateChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["start", "stop", "pause", "resume"] = Field(
        description="start (from stopped), stop (from running or paused), pause (from running), resume (from paused)"
    )


class PipelineLifecycle(BaseModel):
    pipeline_name: str
    resource_id: str
    state: str = Field(
        description="running, starting (the sensor launches the next run), stopping, stopped, pausing, paused, "
        "pending_schema_approval or failed"
    )
    held_by: str | None = Field(None, description="The token (or Dagster) that stopped or paused the pipeline")
    live_run_ids: list[str]


class StateChanged(BaseModel):
    pipeline_name: str
    resource_id: str
    previous_state: str
    state: str
    terminated_run_ids: list[str] = Field(description="Live runs terminated through the Dagster instance")
    audit_id: int


class TableCheckpoint(BaseModel):
    table: str
    phase: Literal["streaming", "snapshot", "resync", "not_started"]
    lsn: str | None = Field(description="Durable position: every change up to it is in the sink")
    checkpointed_at: datetime | None
    age_seconds: float | None
    run_id: str | None


class CheckpointsResponse(BaseModel):
    pipeline_name: str
    resource_id: str
    slot: str | None
    tables: list[TableCheckpoint]


class AuditFilters(Paging):
    resource_id: Text | None = None
    pipeline_name: Text | None = None
    actor: Text | None = Field(None, description="Token name, or dagster:<user> for a Dagster job")
    action: Text | None = Field(None, description="e.g. state:stop")
    result: Literal["pending", "ok", "refused", "error"] | None = None
    at_gte: UtcDatetime | None = None
    at_lte: UtcDatetime | None = None


class AuditEntry(BaseModel):
    id: int
    pipeline_name: str | None
    resource_id: str | None
    actor: str
    action: str
    params: dict[str, Any]
    result: str
    detail: dict[str, Any]
    run_ids: list[str]
    at: datetime


class AuditPage(BaseModel):
    audit: list[AuditEntry]
    limit: int
    offset: int
    total: int


class DefsProblem(BaseModel):
    file: str
    field: str
    value: Any = None
    message: str = Field(description="What is wrong and how to fix it (as `dg check defs` says)")


class ValidationReport(BaseModel):
    valid: bool
    pipelines: list[str] = Field(default_factory=list, description="tenant/name of each valid pipeline")
    error: str | None = None
    code: str | None = None
    problems: list[DefsProblem] = Field(default_factory=list)


class TableProgress(BaseModel):
    table: str
    phase: Literal["streaming", "snapshot", "resync", "not_started"]
    partitions_total: int
    partitions_done: int
    rows_total: int = Field(description="Estimated rows to copy (at least those copied)")
    rows_done: int
    percent: float


class ProgressResponse(BaseModel):
    pipeline_name: str
    resource_id: str
    phase: Literal["snapshot", "resync", "streaming", "not_started"] = Field(
        description="snapshot while any table is first copied, resync while one is copied again, else "
        "streaming (not_started before the first run)"
    )
    tables: list[TableProgress]


class TableMetrics(BaseModel):
    table: str
    events_total: int = Field(description="Changes of this table the live (or last) run applied")
    failed: bool = Field(description="Held failed: its sink apply kept failing")
    last_checkpoint_at: datetime | None


class PipelineMetrics(BaseModel):
    pipeline_name: str
    resource_id: str
    state: str
    events_per_second: float = Field(description="Recent rate of the live run (0 without one)")
    replication_lag_seconds: float | None = Field(
        description="Seconds the sink is behind the source (grows once the run stops beating); null before a run"
    )
    last_checkpoint_at: datetime | None
    events_total: int = Field(description="Change events the live (or last) run applied")
    sink_errors_total: int = Field(description="Sink errors the live (or last) run met and outlived")
    retained_wal_bytes: int | None = Field(
        None, description="Source WAL past the slot's confirmed position (read from the source; null if unreadable)"
    )
    tables: list[TableMetrics]


class ProposedSchema(BaseModel):
    pipeline_name: str
    resource_id: str
    pending: bool = Field(description="A schema change waits for approval (state pending_schema_approval)")
    table: str | None = None
    diff: str | None = Field(None, description="What changed, e.g. `added amount (decimal(10,2))`")
    lsn: str | None = Field(None, description="WAL position of the change")
    current_schema: dict[str, Any] | None = Field(None, description="The schema the sink table follows now")
    proposed_schema: dict[str, Any] | None = None


class ResyncBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tables: list[Text] = Field(min_length=1, max_length=500, description="schema.table of each table to re-copy")
    reason: Text = "operator request"


class ActionLaunched(BaseModel):
    pipeline_name: str
    resource_id: str
    action: str
    job_name: str = Field(description="The Dagster job that carried it out")
    run_id: str = Field(description="Its Dagster run (tagged nilus/audit_id)")
    success: bool
    message: str
    audit_id: int


class ColumnRetyped(BaseModel):
    column: str
    sink_type: str = Field(description="The logical type the sink column was made for (the schema history)")
    source_type: str = Field(description="The logical type the source column has now")
    source_column_type: str = Field(description="The source's own spelling, e.g. bigint")


class TableDrift(BaseModel):
    table: str
    has_drift: bool
    compared_with: Literal["sink", "schema_history"] = Field(
        description="sink: the sink table's columns; schema_history: the schema the sink follows (the sink "
        "could not be read now)"
    )
    added: list[str] = Field(description="Columns the source has and the sink does not")
    dropped: list[str] = Field(description="Columns the sink has and the source no longer does")
    retyped: list[ColumnRetyped]
    error: str | None = Field(None, description="Why the table could not be compared")


class DriftResponse(BaseModel):
    pipeline_name: str
    resource_id: str
    tables: list[TableDrift]
