"""One binlog CDC run of a MariaDB pipeline: check the server, snapshot the tables that need it,
then stream the binlog from the oldest table checkpoint until asked to stop.

It returns the same result and reports the same progress as the PostgreSQL run (cdc/pipeline.py),
so the Dagster assets, sensor and state store treat both alike. The stream reads to the end of the
binlog, applies what it read (each table's changes and checkpoint in one sink transaction), waits
`poll_interval_s` and reads on from the durable position.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from nilus_dagster.cdc.mysql.applier import BinlogApplier, BinlogTable
from nilus_dagster.cdc.mysql.binlog import BinlogReader, StatementRefused
from nilus_dagster.cdc.mysql.position import BadPosition, BinlogPosition
from nilus_dagster.cdc.mysql.server import (
    BinlogLost,
    check_readable,
    check_server,
    current_position,
    replica_name,
    replica_server_id,
)
from nilus_dagster.cdc.mysql.snapshot import snapshot_tables
from nilus_dagster.cdc.mysql.values import RowConverter, UnstreamableColumn, unsupported_columns
from nilus_dagster.cdc.run_config import RESET_HINT, CdcPipelineConfig, CdcPipelineFailed, CdcProgress, CdcRunResult
from nilus_dagster.cdc.setup import CdcSetupError
from nilus_dagster.cdc.state_writer import StateWriter
from nilus_dagster.cdc.stream_stats import StreamStats
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, carried_schema
from nilus_dagster.sources.mysql.catalog import read_table_schema
from nilus_dagster.sources.mysql.connection import connect_mysql
from nilus_dagster.state.records import SchemaHistoryRecord
from nilus_dagster.state.store import StateStore

IDLE_CHECKPOINT_INTERVAL_S = 10.0  # how often tables the stream does not change get their checkpoint moved


def is_binlog_source(config: CdcPipelineConfig) -> bool:
    return config.source_dsn.split(":", 1)[0] in ("mysql", "mariadb")


@dataclass
class BinlogCdcRun:
    config: CdcPipelineConfig
    sink: Sink
    store: StateStore
    run_id: str
    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[CdcProgress], Any] = lambda progress: None
    stop_at_caught_up: bool = False
    interrupts: tuple[type[BaseException], ...] = ()
    poll_interval_s: float = 0.2
    heartbeat_interval_s: float = 5.0

    def __post_init__(self) -> None:
        key = self.config.key
        self.server_id = replica_server_id(key.tenant, key.pipeline)
        self.name = replica_name(key.tenant, key.pipeline)
        self._writer = StateWriter(self._write_state)
        self._last_beat = 0.0
        self._offset: BinlogPosition | None = None

    # -- state ----------------------------------------------------------------------------
    def _write_state(self, kind: str, value: Any) -> None:
        key = self.config.key
        if kind == "heartbeat":
            self.store.beat(key, self.run_id, value)
        else:
            self.store.append_offset(key, connector_name=key.pipeline, offset_key="binlog", offset_value=value,
                                     run_id=self.run_id)

    def _set_state(self, state: str, **detail: Any) -> None:
        key = self.config.key
        current = self.store.get_pipeline_state(key.tenant, key.pipeline)
        kept = {k: v for k, v in (current.detail if current else {}).items() if k != "reset"}
        self.store.set_pipeline_state(key, state, {**kept, **detail})

    def _fail(self, reason: str) -> CdcPipelineFailed:
        self._set_state("failed", reason=reason)
        return CdcPipelineFailed(reason)

    def _record_offset(self, position: BinlogPosition | None) -> None:
        """The newest durable position, for monitoring (the sink's checkpoints are what a run resumes from)."""
        if position is not None and position != self._offset:
            self._offset = position
            self._writer.put("offset", {"position": position.text(), "ordinal": position.ordinal})

    def _report(self, progress: CdcProgress, *, force: bool = False) -> None:
        self.on_progress(progress)
        now = time.monotonic()
        if force or now - self._last_beat >= self.heartbeat_interval_s:
            self._last_beat = now
            self._writer.put("heartbeat", progress.as_detail())

    # -- the run --------------------------------------------------------------------------
    def run(self) -> CdcRunResult:
        try:
            result = CdcRunResult()
            self._report(CdcProgress("setup"), force=True)
            tables = self._set_up(result)
            if not self.should_stop():
                result.stats = self._stream(tables)
            return result
        finally:
            self._writer.close()

    def _set_up(self, result: CdcRunResult) -> dict[TableName, BinlogTable]:
        config, key = self.config, self.config.key
        state = self.store.get_pipeline_state(key.tenant, key.pipeline)
        if state is not None and state.state == "failed":
            raise CdcPipelineFailed(
                f"pipeline {key.pipeline} is failed ({state.detail.get('reason', 'see its state')}); "
                f"reset it (re-snapshot) before it can run again: {RESET_HINT}"
            )
        reset = state is not None and bool(state.detail.get("reset"))
        with closing(connect_mysql(config.source_connection, config.source_dsn)) as conn:
            check_server(conn, self.server_id, self.name)
            recorded = {} if reset else self.store.latest_schemas(key.tenant, key.pipeline)
            tables = {t.table: self._table(conn, t.table, t.target, reset, recorded) for t in config.tables}
            self._check_identity(conn, state.detail if state is not None and not reset else {}, tables)
            pending = [t for t in tables.values() if t.applied is None]
            if pending and config.snapshot == "never":
                position = current_position(conn)
                for table in pending:
                    self._mark_start(table, position)
            elif pending:
                progress = CdcProgress("snapshot", snapshot_partitions_total=len(pending))

                def told(table: BinlogTable, rows: int) -> None:
                    progress.snapshot_rows += rows
                    progress.snapshot_partitions_done += 1
                    self._report(progress, force=True)

                self._report(progress, force=True)
                _, result.snapshot_rows = snapshot_tables(conn, self.sink, pending, on_table=told,
                                                          should_stop=self.should_stop)
            server_id = int(_value(conn, "SELECT @@GLOBAL.server_id"))
        result.slot_created = bool(pending)
        for table in pending:  # the schema in force from the table's snapshot position on
            if table.applied is not None:
                self.store.append_schema(key, connector_name=key.pipeline, table_name=table.name.qualified,
                                         table_schema=table.schema.to_json(), lsn=table.applied.text())
        self._set_state("active", source_server_id=server_id, replica_server_id=self.server_id)
        return tables

    def _table(self, conn: Any, name: TableName, target: Any, reset: bool,
               recorded: dict[str, SchemaHistoryRecord]) -> BinlogTable:
        """The table as the stream must read it: a table streamed before has the schema recorded at
        its snapshot (the binlog from its checkpoint on was written under it, whatever the catalog
        says now); a new one the catalog's, which its snapshot reads."""
        checkpoint_key = self.config.table_checkpoint(name)
        checkpoint = None if reset else self.sink.read_checkpoint(checkpoint_key)
        history = recorded.get(name.qualified) if checkpoint else None
        schema = TableSchema.from_json(history.table_schema) if history else read_table_schema(conn, name)
        if not schema.primary_key:
            raise CdcSetupError(
                f"table {name} has no primary key: binlog CDC needs one to apply updates and deletes exactly "
                f"(ALTER TABLE {name} ADD PRIMARY KEY (...)), or load it with a batch pipeline"
            )
        if refused := unsupported_columns(schema):
            raise CdcSetupError(
                f"table {name}: binlog CDC cannot decode {', '.join(refused)} exactly yet; leave the table out of "
                "the CDC pipeline or load it with a batch pipeline"
            )
        schema = carried_schema(self.sink, schema)
        self.sink.check_table(target, schema, cdc=True)
        try:
            applied = BinlogPosition.parse(checkpoint) if checkpoint else None
        except BadPosition as error:
            reason = f"table {name}: its sink checkpoint is not a binlog position ({error}); {RESET_HINT}"
            raise self._fail(reason) from None
        return BinlogTable(name, target, schema, checkpoint_key, applied, RowConverter(schema))

    def _check_identity(self, conn: Any, detail: dict[str, Any], tables: dict[TableName, BinlogTable]) -> None:
        server_id = int(_value(conn, "SELECT @@GLOBAL.server_id"))
        known = detail.get("source_server_id")
        if known is not None and int(known) != server_id:
            raise self._fail(
                f"the source server's server_id is {server_id}, but the pipeline streamed from server {known}: "
                f"binlog positions of one server mean nothing on another; {RESET_HINT}"
            )
        for table in tables.values():
            if table.applied is not None:
                try:
                    check_readable(conn, table.applied, f"table {table.name}")
                except BinlogLost as error:
                    raise self._fail(f"{error}; {RESET_HINT}") from None

    def _mark_start(self, table: BinlogTable, position: BinlogPosition) -> None:
        """`snapshot: never`: the table streams from now on (its sink rows are left as they are)."""
        from nilus_dagster.cdc.mysql.applier import TypedTableChanges
        from nilus_dagster.sinks.base import Checkpoint

        self.sink.prepare_table(table.target, table.schema, cdc=True)
        empty = TypedTableChanges(table.schema, table.converter).to_change_set()
        self.sink.apply_changes(table.target, table.schema, empty, Checkpoint(table.checkpoint_key, position.text()))
        table.applied = position

    # -- streaming ------------------------------------------------------------------------
    def _stream(self, tables: dict[TableName, BinlogTable]) -> StreamStats:
        config = self.config
        stats = StreamStats()
        applier = BinlogApplier(tables, self.sink, soft_delete=config.soft_delete, batch_max_rows=config.batch_max_rows,
                                batch_max_ms=config.batch_max_ms, stats=stats)
        reader = BinlogReader(config.source_dsn, self.server_id, self.name, set(tables))
        position = min((t.applied for t in tables.values() if t.applied), key=lambda p: p.ordinal)
        applier.durable = position
        self._record_offset(position)
        target = None
        if self.stop_at_caught_up:
            with closing(connect_mysql(config.source_connection, config.source_dsn)) as conn:
                target = current_position(conn)
        progress = CdcProgress("streaming", lsn=position.text())
        last_idle = time.monotonic()
        try:
            while True:
                stopped = self._read_once(reader, applier, position, progress)
                position = applier.durable or position
                if time.monotonic() - last_idle >= IDLE_CHECKPOINT_INTERVAL_S:
                    applier.flush(all_tables=True)
                    last_idle = time.monotonic()
                self._record_offset(position)
                progress.lsn, progress.table_changes = position.text(), _plain(stats.table_changes)
                progress.events_total, progress.events_per_s = stats.events_total, round(stats.events_per_s, 1)
                self._report(progress)
                reached = max(position.ordinal, reader.reached.ordinal if reader.reached and not stopped else 0)
                if stopped or self.should_stop() or (target is not None and reached >= target.ordinal):
                    break
                try:
                    time.sleep(self.poll_interval_s)
                except self.interrupts:
                    break
        except (StatementRefused, UnstreamableColumn) as error:
            raise self._fail(f"{error}; {RESET_HINT}") from None
        applier.flush(all_tables=True)
        position = applier.durable or position
        self._record_offset(position)
        self._report(CdcProgress("stopped", lsn=position.text()), force=True)
        return stats

    def _read_once(self, reader: BinlogReader, applier: BinlogApplier, start: BinlogPosition,
                   progress: CdcProgress) -> bool:
        """Read and apply the binlog from `start` to its end; True if stopped before the end."""
        transactions = reader.read(start)
        stopped = False
        try:
            for transaction in transactions:
                applier.add(transaction)
                if applier.ready():
                    applier.flush()
                    self._record_offset(applier.durable)
                    self._report(progress)
                if self.should_stop():
                    stopped = True
                    break
        except StatementRefused:
            applier.flush()  # the whole transactions before the refused statement
            raise
        finally:
            transactions.close()  # type: ignore[attr-defined]
        applier.flush()
        return stopped


def _plain(changes: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {table: dict(kinds) for table, kinds in changes.items()}


def _value(conn: Any, sql: str) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql)
        row = cursor.fetchone()
    value = row[0]
    return value.decode() if isinstance(value, bytes) else value

