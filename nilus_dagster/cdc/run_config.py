"""What a CDC run is given and what it reports: pipeline and table settings, progress, result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from nilus_dagster.cdc.setup import replication_name
from nilus_dagster.cdc.stream import StreamStats
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.state.records import PipelineKey

Phase = Literal["setup", "snapshot", "resync", "streaming", "stopped"]


APPROVED_DETAIL = "approved_schema"  # in the pipeline state: the change an operator approved
RESET_HINT = "run the job <tenant>__<pipeline>__reset to re-snapshot the pipeline"


class CdcPipelineFailed(Exception):
    """The pipeline cannot continue without an operator (its state is set to `failed`)."""


@dataclass(frozen=True)
class CdcTableConfig:
    table: TableName
    target: SinkTable
    primary_key: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CdcPipelineConfig:
    key: PipelineKey
    source_connection: str
    source_dsn: str
    tables: tuple[CdcTableConfig, ...]
    snapshot: Literal["initial", "never"] = "initial"
    snapshot_workers: int = 2
    snapshot_partition_blocks: int = 4096
    batch_max_rows: int = 50_000
    batch_max_ms: int = 1_000
    soft_delete: bool = False
    schema_changes: Literal["evolve", "pause", "fail"] = "evolve"
    on_error: Literal["dlq", "pause_table", "fail"] = "dlq"  # a row the sink cannot take (cdc/poison.py)
    slot_name: str | None = None
    publication_name: str | None = None
    retry_for_s: float = 600.0  # how long a transient fault may last before the run fails (cdc/retry.py)
    row_count_interval_s: float | None = None  # row-count parity rounds (cdc/row_parity.py); None: off

    def slot(self, database: str) -> str:
        """Slots are per cluster: the name includes the source database."""
        return self.slot_name or replication_name("nilus", self.key.tenant, self.key.pipeline, database)

    @property
    def publication(self) -> str:
        return self.publication_name or replication_name("nilus", self.key.tenant, self.key.pipeline)

    @property
    def checkpoint_prefix(self) -> str:
        return f"{self.key.tenant}/{self.key.pipeline}"

    def table_checkpoint(self, table: TableName) -> str:
        return f"{self.checkpoint_prefix}/{table.qualified}"


@dataclass
class CdcProgress:
    """What a run reports while it works (heartbeats, Dagster observations, metrics)."""

    phase: Phase
    lsn: str | None = None
    lag_seconds: float = 0.0
    events_total: int = 0
    events_per_s: float = 0.0
    retained_wal_bytes: int | None = None
    snapshot_rows: int = 0
    snapshot_partitions_done: int = 0
    snapshot_partitions_total: int = 0
    # per table during a snapshot: partitions_done, partitions_total (of this run), rows, percent
    snapshot_tables: dict[str, dict[str, float]] = field(default_factory=dict)
    resync_tables: list[str] = field(default_factory=list)  # the tables being resynced (phase `resync`)
    source_lsn: str | None = None  # the newest WAL position the source server has
    unconfirmed_wal_bytes: int | None = None  # source WAL past the slot's confirmed (sink-durable) position
    fault: str | None = None  # set while the stream is down and being retried (cdc/run_reconnect.py)
    fault_seconds: float = 0.0
    # tables held because their sink apply keeps failing (schema.table → reason; cdc/table_failures.py)
    failed_tables: dict[str, str] = field(default_factory=dict)
    sink_errors_total: int = 0  # sink errors this run met and outlived (retried, waited out, or isolated)
    # per table (schema.table): changes applied in this run by kind ("I", "U", "D", "T" truncate)
    table_changes: dict[str, dict[str, int]] = field(default_factory=dict)
    # per table: the newest row-count parity result (cdc/row_parity.py RowParity as a dict), the
    # number of rounds that gave results, and why a table's last round gave none
    row_parity: dict[str, dict[str, Any]] = field(default_factory=dict)
    row_parity_round: int = 0
    row_parity_skipped: dict[str, str] = field(default_factory=dict)

    def as_detail(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CdcRunResult:
    snapshot_rows: int = 0
    stats: StreamStats = field(default_factory=StreamStats)
    slot_created: bool = False
    tables_added: list[str] = field(default_factory=list)
    # per table: stored generated columns left out of the sink (pgoutput before PG 18 omits them)
    generated_columns: dict[str, list[str]] = field(default_factory=dict)
