"""Dead-letter queue API: query parameters, bodies and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from nilus_dagster.api.params import NAME_PATTERN, TEXT_PATTERN, Paging, _Query
from nilus_dagster.state.dead_letters import DeadLetter, DeadLetterFilter


class _Which(BaseModel):
    pipeline: str | None = Field(None, pattern=NAME_PATTERN, description="Only this pipeline")
    table: str | None = Field(None, pattern=TEXT_PATTERN, description="Only this source table (schema.table)")
    error_kind: str | None = Field(None, pattern=TEXT_PATTERN, description="e.g. not_finite, decimal_out_of_range")


class DlqCountQuery(_Which, _Query):
    def selection(self, *, unacked: bool = True) -> DeadLetterFilter:
        return DeadLetterFilter(self.pipeline, self.table, self.error_kind, unacked=unacked)


class DlqPeekQuery(DlqCountQuery, Paging):
    include_acked: bool = Field(False, description="Also entries already acknowledged")


class DlqAck(_Which):
    model_config = ConfigDict(extra="forbid")

    up_to_id: int = Field(ge=1, description="Acknowledge the unacknowledged entries with id <= up_to_id")

    def selection(self) -> DeadLetterFilter:
        return DeadLetterFilter(self.pipeline, self.table, self.error_kind, unacked=True)


class DlqPurge(_Which):
    model_config = ConfigDict(extra="forbid")

    acked_only: bool = Field(False, description="Delete only acknowledged entries")

    def selection(self) -> DeadLetterFilter:
        return DeadLetterFilter(self.pipeline, self.table, self.error_kind, unacked=False)


class DlqEntry(BaseModel):
    id: int
    pipeline_name: str
    resource_id: str
    table_name: str
    lsn: str = Field(description="Commit LSN of the source transaction that carried the row")
    key: list[Any] = Field(description="The row's key values (a key-less table: the whole row), as text")
    row: dict[str, Any] = Field(description="The row's values as PostgreSQL text")
    op: str = Field(description="I (insert), U (update) or D (delete)")
    error_kind: str
    column_name: str | None
    message: str
    run_id: str | None
    created_at: datetime
    acked_at: datetime | None

    @classmethod
    def of(cls, entry: DeadLetter) -> DlqEntry:
        from nilus_dagster.cdc.lsn import format_lsn

        return cls(
            id=entry.id, pipeline_name=entry.pipeline, resource_id=entry.resource_id, table_name=entry.table_name,
            lsn=format_lsn(entry.commit_lsn), key=entry.row_key, row=entry.row_data, op=entry.op,
            error_kind=entry.error_kind, column_name=entry.column_name, message=entry.message, run_id=entry.run_id,
            created_at=entry.created_at, acked_at=entry.acked_at,
        )


class DlqPage(BaseModel):
    entries: list[DlqEntry] = Field(description="Oldest first")
    limit: int
    offset: int
    total: int


class DlqCount(BaseModel):
    count: int = Field(description="Unacknowledged entries")


class DlqChanged(BaseModel):
    count: int = Field(description="Entries acknowledged or deleted")


class DlqReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: str = Field(pattern=NAME_PATTERN, description="The CDC pipeline whose entries to replay")
    ids: list[int] = Field(default_factory=list, max_length=10_000, description="Entry ids (empty: any)")
    table: str | None = Field(None, pattern=TEXT_PATTERN, description="Only entries of this table (schema.table)")


class DlqReplay(BaseModel):
    replay_id: int
    pipeline_name: str
    entry_ids: list[int] = Field(description="The unacknowledged entries the replay covers")
    status: str = Field(description="pending (the CDC run carries it out), done, or failed (message names why)")
    message: str | None
    run_id: str | None
    requested_at: datetime
    updated_at: datetime
