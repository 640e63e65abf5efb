"""One CDC run of a pipeline: check the source, keep the publication and slot, snapshot what needs
it, then stream until asked to stop. Plain Python: the Dagster job calls `run_cdc_pipeline`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from nilus_dagster.cdc.attach import LeafWatcher
from nilus_dagster.cdc.heartbeat import HEARTBEAT_PREFIX
from nilus_dagster.cdc.lag import source_position
from nilus_dagster.cdc.live_resync import LiveResync, LiveResyncSteps
from nilus_dagster.cdc.lsn import format_lsn, parse_lsn
from nilus_dagster.cdc.replication import (
    ReplicationConnection,
    SlotLost,
    SystemMismatch,
    ensure_same_system,
    fetch_type_info,
    slot_status,
    system_identifier,
)
from nilus_dagster.cdc.resync import RESYNC_MARKER  # a table resynced beside the stream (reconnect)
from nilus_dagster.cdc.row_parity import ParityTable, RowParityProbe
from nilus_dagster.cdc.run_config import (
    APPROVED_DETAIL,
    RESET_HINT,
    CdcPipelineConfig,
    CdcPipelineFailed,
    CdcProgress,
    CdcRunResult,
    CdcTableConfig,
    Phase,
)
from nilus_dagster.cdc.run_poison import PoisonSteps
from nilus_dagster.cdc.run_reconnect import ReconnectSteps
from nilus_dagster.cdc.run_replay import ReplaySteps
from nilus_dagster.cdc.run_resync import ResyncSteps, request_table_resync
from nilus_dagster.cdc.run_schema import SchemaSteps
from nilus_dagster.cdc.run_snapshot import SnapshotSteps
from nilus_dagster.cdc.run_table_failures import TableFailureSteps
from nilus_dagster.cdc.setup import CdcTable, check_server, resolve_tables, sync_publication
from nilus_dagster.cdc.source_facts import TableFacts
from nilus_dagster.cdc.stream import (
    ChangeApplier,
    StreamProgress,
    StreamStats,
    StreamTable,
    run_stream,
)
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, SinkTable, carried_schema, stream_session
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.store import StateStore


@dataclass
class CdcRun(
    LiveResyncSteps, ResyncSteps, SchemaSteps, SnapshotSteps, ReconnectSteps, PoisonSteps, TableFailureSteps,
    ReplaySteps,
):
    """State and collaborators of one run; `run()` does the work."""

    config: CdcPipelineConfig
    sink: Sink
    store: StateStore
    run_id: str
    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[CdcProgress], Any] = lambda progress: None
    stop_at_caught_up: bool = False
    interrupts: tuple[type[BaseException], ...] = ()  # e.g. Dagster's run termination
    heartbeat_interval_s: float = 5.0
    offset_interval_s: float = 10.0
    wal_heartbeat_interval_s: float | None = 10.0  # idle stream: a WAL message to acknowledge (None: off)
    dead_after_s: float = 15.0  # a replication connection silent this long is lost: reconnect
    partition_check_interval_s: float = 10.0  # how often to look for partitions attached while streaming

    def __post_init__(self) -> None:
        self._facts: dict[TableName, TableFacts] = {}  # catalog facts of each table's schema in force
        self._catalog: psycopg.Connection[Any] | None = None  # the source connection while streaming
        self._last_beat = 0.0
        self._beat_phase = ""
        self._last_offset = 0.0
        self._pending_offset: int | None = None
        self._retained_wal: int | None = None
        self._resync_due = False  # a resync was requested: the stream ends at the next safe point
        self._last_resync_check = 0.0
        self._live: LiveResync | None = None  # a resync running beside the stream
        self.slot = self.config.slot_name or ""  # resolved against the source database in run()
        self._init_reconnect()
        self._init_table_failures()
        self._init_replays()

    # -- helpers ---------------------------------------------------------------------------
    def _set_state(self, state: str, **detail: Any) -> None:
        """Change the pipeline state, keeping the identity facts (slot, system) in its detail."""
        current = self.store.get_pipeline_state(self.config.key.tenant, self.config.key.pipeline)
        self.store.set_pipeline_state(self.config.key, state, {**(current.detail if current else {}), **detail})

    def _fail(self, reason: str, **detail: Any) -> CdcPipelineFailed:
        self._set_state("failed", reason=reason, **detail)
        return CdcPipelineFailed(reason)

    def _report(self, progress: CdcProgress, *, force: bool = False) -> None:
        progress.retained_wal_bytes = self._retained_wal
        self._live_progress(progress)
        self._failure_progress(progress)
        self.on_progress(progress)
        now = time.monotonic()
        if force or now - self._last_beat >= self.heartbeat_interval_s or progress.phase != self._beat_phase:
            self._last_beat, self._beat_phase = now, progress.phase  # a new phase is told at once
            self._writer.put("heartbeat", progress.as_detail())  # off the critical path (cdc/state_writer.py)

    def _record_offset(self, lsn: int, *, force: bool = False) -> None:
        self._pending_offset = lsn
        self._durable_count += 1
        now = time.monotonic()
        if force or now - self._last_offset >= self.offset_interval_s:
            self._last_offset = now
            self._queue_offset(lsn)
            self._pending_offset = None

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> CdcRunResult:
        try:
            return self._run()
        finally:
            self._close_state_io()
            self._close_table_failures()
            self._close_replays()

    def _run(self) -> CdcRunResult:
        result = CdcRunResult()
        self._report(CdcProgress("setup"), force=True)
        # A transient fault while connecting, creating the slot or copying is retried like one while
        # streaming: each attempt starts over from what is durable (the slot, done partitions).
        tables = self._through_faults(lambda: self._set_up(result))
        if tables is None or self.should_stop():
            return result
        result.stats = self._stream(tables)
        return result

    def _set_up(self, result: CdcRunResult) -> list[CdcTable]:
        """Check the source and the sink, keep the publication and slot, and bring every table's
        sink copy up to the slot (the initial snapshot, its resumption, resyncs): the tables."""
        config = self.config
        state = self.store.get_pipeline_state(config.key.tenant, config.key.pipeline)
        if state is not None and state.state == "failed":
            raise CdcPipelineFailed(
                f"pipeline {config.key.pipeline} is failed ({state.detail.get('reason', 'see its state')}); "
                f"reset it (re-snapshot) before it can run again: {RESET_HINT}"
            )
        with connect_source(config.source_connection, config.source_dsn, autocommit=True) as conn:
            self.slot = config.slot(current_database(conn))
            tables = self._prepare_source(conn, state.detail if state else {})
            result.generated_columns = {str(t.name): list(t.generated_columns) for t in tables if t.generated_columns}
            for table, target in self._targets(tables):  # refuse before anything is created
                self.sink.check_table(target, table.schema, cdc=True)
            status = slot_status(conn, self.slot)
            if status.exists and status.wal_status == "lost":
                raise self._fail(
                    f"replication slot {self.slot} has lost WAL it needed (wal_status = lost): changes were "
                    f"removed before they were read; {RESET_HINT}",
                    slot=self.slot,
                )
            if not status.exists and state is not None and "slot" in state.detail:
                raise self._fail(
                    f"replication slot {self.slot} is gone (dropped or lost) although the pipeline has "
                    f"streamed before: changes since the last offset cannot be read; {RESET_HINT}",
                    slot=self.slot,
                )
            identifier = self._system_id = system_identifier(conn)
        added = self._sync_publication(tables, slot_exists=status.exists)
        result.tables_added = [t.qualified for t in added]
        if not status.exists:
            result.slot_created = True
            requested = [r.id for r in self.store.open_resyncs(config.key.tenant, config.key.pipeline)]
            result.snapshot_rows = self._create_slot_and_snapshot(tables, identifier)
            self.store.mark_resyncs(requested, "done", run_id=self.run_id)  # covered by the new snapshot
        else:
            result.snapshot_rows = self._catch_up(tables, added, state.detail if state else {})
        return tables

    def _prepare_source(self, conn: psycopg.Connection[Any], detail: dict[str, Any]) -> list[CdcTable]:
        config = self.config
        check_server(conn, self.slot)
        if "system_identifier" in detail:
            try:
                ensure_same_system(conn, detail["system_identifier"])
            except SystemMismatch as error:
                raise self._fail(str(error)) from None
        keys = {t.table: t.primary_key for t in config.tables if t.primary_key}
        return [t.carried_for(self.sink) for t in resolve_tables(conn, [t.table for t in config.tables], keys)]

    def _sync_publication(self, tables: list[CdcTable], *, slot_exists: bool) -> list[TableName]:
        with connect_source(self.config.source_connection, self.config.source_dsn, autocommit=True) as conn:
            existed = conn.execute(
                "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.config.publication,)
            ).fetchone()
            added, removed = sync_publication(
                conn, self.config.publication, [t.name for t in tables], slot_exists=slot_exists
            )
        for table in removed:
            self.store.clear_snapshot(self.config.key.tenant, self.config.key.pipeline, table.qualified)
        return added if existed else []

    def _targets(self, tables: list[CdcTable]) -> list[tuple[CdcTable, SinkTable]]:
        by_name = {t.table: t.target for t in self.config.tables}
        return [(t, by_name[t.name]) for t in tables]

    def _stream(self, tables: list[CdcTable]) -> StreamStats:
        """Stream until asked to stop. A resync requested meanwhile runs beside the stream (see
        cdc/live_resync.py), which restarts from the slot when it is done; with a sink that cannot,
        the stream ends at a transaction boundary, the resync runs, and the stream restarts."""
        with connect_source(self.config.source_connection, self.config.source_dsn, autocommit=True) as conn:
            stop_at = caught_up_target(conn) if self.stop_at_caught_up else None
        self._parity = self._parity_probe(tables)
        if stop_at is not None and self._parity.tables:  # a run that ends once caught up checks there
            stop_at = max(stop_at, self._parity.read_now() or 0)
        stats = StreamStats()
        while True:
            try:
                self._through_faults(
                    self._counting_sink_faults(lambda: self._stream_once(tables, stop_at, stats)), "streaming"
                )
            except BaseException:
                self._abandon_live()
                raise
            if self._live is not None:
                self._finish_live(tables)
                if self.should_stop():
                    break
                continue
            if self._retry_due and not self.should_stop():
                continue  # a failed table is retried: it takes every change after its checkpoint
            if self.should_stop() or not self._resync_requested():
                break
            self._resync(tables, set())
        if self._pending_offset is not None:
            self._record_offset(self._pending_offset, force=True)
        final = CdcProgress("stopped", lsn=format_lsn(stats.applied_lsn) if stats.applied_lsn else None)
        final.events_total, final.table_changes = stats.events_total, stats.table_changes  # the run's totals
        self._report(final, force=True)
        return stats

    def _parity_probe(self, tables: list[CdcTable]) -> RowParityProbe:
        """Row-count parity rounds over the tables whose sink rows only the stream writes."""
        config, interval = self.config, self.config.row_count_interval_s
        pairs = self._targets(tables) if interval else []
        checked = [ParityTable(t.name, target) for t, target in pairs if not t.partitioned]
        return RowParityProbe(config.source_connection, config.source_dsn, self.sink, checked, interval or 0.0)

    def _stream_once(self, tables: list[CdcTable], stop_at: int | None, stats: StreamStats) -> None:
        with stream_session(self.sink):  # (DuckDB: the file stays open while batches come back to back)
            self._stream_session(tables, stop_at, stats)

    def _stream_session(self, tables: list[CdcTable], stop_at: int | None, stats: StreamStats) -> None:
        config = self.config
        latest = self.store.latest_schemas(config.key.tenant, config.key.pipeline)
        stream_tables: dict[TableName, StreamTable] = {}
        self._load_table_failures({t.name for t in tables})
        for table, target in self._targets(tables):
            recorded = latest.get(table.name.qualified)
            schema = TableSchema.from_json(recorded.table_schema) if recorded else table.schema
            facts = TableFacts.from_json(recorded.table_schema.get("source_facts")) if recorded else None
            if facts is not None:
                self._facts.setdefault(table.name, facts)
            schema = carried_schema(self.sink, TableSchema(schema.table, schema.columns, table.schema.primary_key))
            checkpoint = self.sink.read_checkpoint(config.table_checkpoint(table.name))
            stream_table = stream_tables[table.name] = StreamTable(
                source=table,
                target=target,
                checkpoint_key=config.table_checkpoint(table.name),
                applied_lsn=parse_lsn(checkpoint) if checkpoint not in (None, RESYNC_MARKER) else 0,
                schema=schema,
            )
            if self._sink_table_usable(stream_table, target, checkpoint):  # a dropped one is not recreated
                self.sink.prepare_table(target, schema, cdc=True)
        self._isolation.hold_failed(stream_tables)
        leaf_watcher = LeafWatcher(
            config.source_connection,
            config.source_dsn,
            self.sink,
            config.checkpoint_prefix,
            [t for t in stream_tables.values() if t.source.partitioned],
            self.partition_check_interval_s,
        )
        leaf_watcher.check()  # partitions attached since the last run: their rows before ATTACH
        with connect_source(config.source_connection, config.source_dsn, autocommit=True) as conn:
            types_conn = self._catalog = conn
            self._check_reconnected_source(conn)

            applier = ChangeApplier(
                tables=stream_tables,
                sink=self.sink,
                lookup_types=lambda oids: fetch_type_info(types_conn, oids),
                on_schema_change=self._schema_policy,
                on_poison=self._on_poison,
                batch_max_rows=config.batch_max_rows,
                batch_max_ms=config.batch_max_ms,
                soft_delete=config.soft_delete,
                stats=stats,
                isolation=self._isolation,
            )
            self._replay_pending(applier, conn)  # dead-letter replays asked for (cdc/dlq_replay.py)
            start = min((t.applied_lsn for t in stream_tables.values()), default=0)
            progress = CdcProgress("streaming")
            last_slot_check = 0.0

            def report(stream_progress: StreamProgress) -> None:
                nonlocal last_slot_check
                if time.monotonic() - last_slot_check >= 10:
                    last_slot_check = time.monotonic()
                    self._source = source_position(conn, self.slot)
                self._apply_source(progress)
                if not applier.in_transaction:  # never inside a spanning sink transaction
                    leaf_watcher.poll()  # partitions attached while streaming
                progress.lsn = format_lsn(stream_progress.applied_lsn or start)  # idle: the checkpoint
                progress.table_changes = stats.table_changes
                fresh = self._live_stream is not None and self._live_stream.fresh  # a frozen link is not caught up
                progress.lag_seconds = self._lag.observe(stream_progress.caught_up and fresh, stats.last_commit_time)
                progress.events_total = stream_progress.events_total
                progress.events_per_s = stream_progress.events_per_s
                self._tick_parity(stream_progress, stream_tables, stats, progress)
                self._report(progress)

            try:
                with ReplicationConnection.connect(config.source_dsn) as replication:
                    stream = replication.start(
                        self.slot, [config.publication], start, heartbeat_interval_s=self.wal_heartbeat_interval_s,
                        dead_after_s=self.dead_after_s,
                    )
                    self._walsender_pid, self._live_stream = replication.backend_pid, stream
                    run_stream(
                        stream,
                        applier,
                        should_stop=lambda: (
                            self.should_stop()
                            or self._resync_tick(tables, applier)
                            or self._table_retry_requested(applier.tables)
                            or self._replay_tick(applier)
                        ),
                        stop_at_lsn=stop_at,
                        on_progress=report,
                        on_durable=self._record_offset,
                        interrupts=self.interrupts,
                    )
            except SlotLost as error:
                raise self._fail(f"{error}; {RESET_HINT}", slot=self.slot) from None

    def _tick_parity(
        self, stream: StreamProgress, tables: dict[TableName, StreamTable], stats: StreamStats, progress: CdcProgress
    ) -> None:
        held = {t.source.name.qualified for t in tables.values() if t.held}
        reached = max(stream.applied_lsn, stream.caught_up_lsn)
        self._parity.tick(settled=stream.settled, reached_lsn=reached, stats=stats, held=held)
        progress.row_parity = {name: asdict(result) for name, result in self._parity.results.items()}
        progress.row_parity_round = self._parity.round
        progress.row_parity_skipped = dict(self._parity.skipped)


def current_database(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def caught_up_target(conn: psycopg.Connection[Any]) -> int:
    """A WAL position past the commit of every transaction committed so far, already flushed (the
    walsender reads only flushed WAL, so the stream can reach it at once).

    `pg_current_wal_lsn()` alone is not that: it is the WAL *write* position, and a commit under
    `synchronous_commit = off` returns before its record is written, so a run could stop "caught
    up" before a transaction its caller had just committed. A tiny transaction committed with
    `synchronous_commit = local` flushes every WAL record before its own, committed ones included
    (it needs an xid and a WAL record of its own, else PostgreSQL commits it asynchronously: a
    heartbeat, which the stream consumes).
    """
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = local")
        conn.execute("SELECT txid_current(), pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,))
    row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(row[0])


def run_cdc_pipeline(
    config: CdcPipelineConfig,
    sink: Sink,
    store: StateStore,
    *,
    run_id: str,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[CdcProgress], Any] = lambda progress: None,
    stop_at_caught_up: bool = False,
    interrupts: tuple[type[BaseException], ...] = (),
) -> CdcRunResult:
    """Run the pipeline until `should_stop()` (or, with `stop_at_caught_up`, until the WAL position
    seen at the start is applied). `interrupts`: see `run_stream`. A MariaDB source streams its
    binlog instead (cdc/mysql/pipeline.py), with the same result and progress."""
    from nilus_dagster.cdc.mysql.pipeline import BinlogCdcRun, is_binlog_source

    run = BinlogCdcRun if is_binlog_source(config) else CdcRun
    return run(config, sink, store, run_id, should_stop, on_progress, stop_at_caught_up, interrupts).run()


__all__ = [
    "APPROVED_DETAIL",
    "RESET_HINT",
    "CdcPipelineConfig",
    "CdcPipelineFailed",
    "CdcProgress",
    "CdcRun",
    "CdcRunResult",
    "CdcTableConfig",
    "Phase",
    "current_database",
    "request_table_resync",
    "run_cdc_pipeline",
]
