"""Response and request bodies: the exact OpenAPI contract (GraphQL types derive from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nilus_dagster.api.params import NAME_PATTERN, TEXT_PATTERN, JsonObject


class Run(BaseModel):
    """One Dagster run of a pipeline."""

    run_id: str
    job_name: str
    pipeline_name: str | None = Field(description="The nilus/pipeline tag")
    resource_id: str | None
    status: str = Field(description="Dagster run status: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...")
    is_success: bool = Field(description="True when status is SUCCESS")
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_sec: float | None = Field(description="ended_at - started_at; null until the run ends")
    run_as_user: str | None
    dagster_url: str = Field(description="The run in the Dagster UI")


class Pipeline(BaseModel):
    """A declared pipeline and its latest run (null if it never ran)."""

    pipeline_name: str
    tenant: str
    resource_id: str
    type: str
    description: str | None
    labels: dict[str, str]
    run_as_user: str | None = Field(description="As declared")
    job_name: str
    schedule: str | None
    state: str | None = Field(description="State in the state store (active, paused, ...), if any")
    latest_run: Run | None


class PipelinesPage(BaseModel):
    pipelines: list[Pipeline]
    limit: int
    offset: int
    total: int


class RunsPage(BaseModel):
    resource_id: str
    runs: list[Run]
    limit: int
    offset: int
    total: int


class RunStats(BaseModel):
    total_runs: int = Field(description="Runs created in the period, any status")
    successful_runs: int
    failed_runs: int = Field(description="FAILURE and CANCELED runs")
    success_rate: float = Field(description="successful / (successful + failed) * 100, 2 decimals; 0 if none")
    avg_duration_sec: float | None = Field(description="Over finished runs; null if none")
    max_duration_sec: float | None


class StatsResponse(BaseModel):
    resource_id: str
    period: str
    period_start: datetime
    period_end: datetime
    stats: RunStats


class OffsetRecord(BaseModel):
    id: int
    pipeline_name: str
    resource_id: str
    connector_name: str
    offset_key: str
    offset_value: dict[str, Any]
    run_id: str | None
    record_insert_ts: datetime


class OffsetsPage(BaseModel):
    offsets: list[OffsetRecord]
    limit: int
    offset: int
    total: int


class SchemaHistoryRecord(BaseModel):
    id: int
    pipeline_name: str
    resource_id: str
    connector_name: str
    table_name: str
    table_schema: dict[str, Any]
    lsn: str | None
    record_insert_ts: datetime


class SchemaHistoryPage(BaseModel):
    schema_history: list[SchemaHistoryRecord]
    limit: int
    offset: int
    total: int


class ComponentHealth(BaseModel):
    ok: bool
    detail: str | None = None


class Health(BaseModel):
    status: str = Field(description="ok, or error when a component failed (HTTP 503)")
    components: dict[str, ComponentHealth]


class Info(BaseModel):
    service: str
    version: str
    commit: str | None
    image: str | None
    dagster_version: str
    api_base_path: str


# -- internal runtime API bodies ------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resource_id: str | None = Field(
        default=None,
        pattern=TEXT_PATTERN,
        description="Defaults to the declared pipeline's resource id, else nilus:v1:{pipeline}:{tenant}",
    )


class RunPost(_Body):
    pipeline_name: str = Field(pattern=NAME_PATTERN)
    run_id: str = Field(pattern=TEXT_PATTERN)
    payload: JsonObject = Field(default_factory=dict)


class StatePost(_Body):
    state: Literal["active", "paused", "pending_schema_approval", "failed", "stopped"]
    detail: JsonObject = Field(default_factory=dict)


class OffsetPost(_Body):
    connector_name: str = Field(pattern=TEXT_PATTERN)
    offset_key: str = Field(pattern=TEXT_PATTERN)
    offset_value: JsonObject
    run_id: str | None = Field(default=None, pattern=TEXT_PATTERN)


class SchemaHistoryPost(_Body):
    connector_name: str = Field(pattern=TEXT_PATTERN)
    table_name: str = Field(pattern=TEXT_PATTERN)
    table_schema: JsonObject
    lsn: str | None = Field(default=None, pattern=TEXT_PATTERN)


class Stored(BaseModel):
    stored: bool
    id: int | None = None


class PipelineStateOut(BaseModel):
    pipeline_name: str
    resource_id: str
    state: str
    detail: dict[str, Any]
    updated_at: datetime


class StateResponse(BaseModel):
    pipeline_name: str
    state: PipelineStateOut | None


class LatestOffsetsResponse(BaseModel):
    pipeline_name: str
    offsets: list[OffsetRecord] = Field(
        description="The offset in force of each (connector_name, offset_key): its newest record; newest first"
    )


class PipelineSchemaHistoryPage(SchemaHistoryPage):
    pipeline_name: str


class ExistsResponse(BaseModel):
    pipeline_name: str
    exists: bool


class StorageHealth(BaseModel):
    status: str


class TableFailureOut(BaseModel):
    pipeline_name: str
    table_name: str = Field(description="schema.table in the source")
    status: str = Field(description="failed (held), retry (asked, not yet picked up), retrying (streaming again)")
    reason: str = Field(description="the sink error that made the table fail")
    checkpoint: str | None = Field(description="its sink checkpoint (LSN): it continues from there once fixed")
    run_id: str | None
    failed_at: datetime
    updated_at: datetime


class TableFailuresResponse(BaseModel):
    failures: list[TableFailureOut]
    total: int


class TableRetryResponse(BaseModel):
    pipeline_name: str
    table_name: str
    status: str = Field(description="retry: the live CDC run (or else the next one) streams it again")
