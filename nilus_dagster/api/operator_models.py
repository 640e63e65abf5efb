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
