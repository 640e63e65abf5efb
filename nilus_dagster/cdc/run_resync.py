"""The resync and resume steps of a CDC run (a mixin of `CdcRun`): before streaming, finish
every table whose sink copy is not whole; while streaming, carry out requested resyncs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nilus_dagster.cdc.lsn import format_lsn, parse_lsn
from nilus_dagster.cdc.resume import FACTS_KEY, SnapshotResume, resumable
from nilus_dagster.cdc.resync import RESYNC_MARKER, TableResync, validate_resync_tables
from nilus_dagster.cdc.run_config import CdcPipelineConfig, CdcProgress
from nilus_dagster.cdc.run_poison import PAUSED_DETAIL, release_paused
from nilus_dagster.cdc.setup import CdcTable
from nilus_dagster.cdc.snapshot import SnapshotCancelled, SnapshotRunner
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, SinkTable
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.store import StateStore

_PENDING_DETAIL = ("table", "proposed_schema", "diff", "lsn", "reason")  # of a held schema change


class ResyncSteps:
    """Needs the run's collaborators and helpers (declared for type checkers only)."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        sink: Sink
        store: StateStore
        run_id: str
        heartbeat_interval_s: float
        _resync_due: bool
        _last_resync_check: float
        _report: Callable[..., None]
        _record_schema: Callable[[TableName, TableSchema, int, Any], None]
        _snapshot_runner: Callable[[int, str | None, str], SnapshotRunner]
        _targets: Callable[[list[CdcTable]], list[tuple[CdcTable, SinkTable]]]
        _tables_resynced: Callable[[list[TableName]], None]

    def request_resync(self, tables: Sequence[str | TableName], reason: str = "") -> list[int]:
        """Ask for tables to be re-snapshotted (validated against the pipeline; UnknownTables
        names its tables). Callable from anywhere in the run, the streaming loop included (e.g. a
        schema-change handler): the request is recorded in the state store and the run carries
        it out at its next safe point (the end of the current transaction). Returns request ids."""
        ids = request_table_resync(self.config, self.store, tables, reason)
        self._resync_due = True
        return ids

    def _resync_requested(self) -> bool:
        """A resync is waiting: flagged by this run, or recorded by the resync job (checked at
        most once per heartbeat interval)."""
        now = time.monotonic()
        if not self._resync_due and now - self._last_resync_check >= self.heartbeat_interval_s:
            self._last_resync_check = now
            self._resync_due = bool(self.store.open_resyncs(self.config.key.tenant, self.config.key.pipeline))
        return self._resync_due

    def _catch_up(self, tables: list[CdcTable], added: list[TableName], detail: dict[str, Any]) -> int:
        """Before streaming: finish every table whose sink copy is not whole. A keyed table whose
        initial snapshot was interrupted resumes at its first unfinished partition (cdc/resume.py);
        other interrupted tables, interrupted resyncs, tables added to the pipeline and requested
        resyncs are resynced (cdc/resync.py)."""
        config = self.config
        requested = {r.table_name for r in self.store.open_resyncs(config.key.tenant, config.key.pipeline)}
        wanted, unfinished = set(added), []
        for table in tables:
            checkpoint = self.sink.read_checkpoint(config.table_checkpoint(table.name))
            if checkpoint == RESYNC_MARKER:
                wanted.add(table.name)
            elif checkpoint is None and config.snapshot == "initial" and table.name not in wanted:
                unfinished.append(table)
        with connect_source(config.source_connection, config.source_dsn, autocommit=True) as conn:
            facts = detail.get(FACTS_KEY)
            resume = [t for t in unfinished if t.name.qualified not in requested and resumable(conn, t, facts)]
        wanted |= {t.name for t in unfinished if t not in resume}
        rows = 0
        if resume:
            consistent = parse_lsn(detail["consistent_lsn"])
            resumer = SnapshotResume(
                config.source_connection,
                config.source_dsn,
                facts,
                consistent,
                format_lsn(consistent),
                self._snapshot_runner,
            )
            rows += resumer.run([(t, target) for t, target in self._targets(tables) if t in resume])
        return rows + self._resync(tables, wanted)

    def _resync(self, tables: list[CdcTable], wanted: set[TableName]) -> int:
        """Resync the wanted tables plus the open requests; `tables` gets their current schemas."""
        planned = self._plan_resync(tables, wanted)
        if planned is None:
            return 0
        names, ids = planned
        self._report(CdcProgress("resync", resync_tables=[n.qualified for n in names]), force=True)
        try:
            rows, lsn, fresh = self._table_resync(self.sink, self._snapshot_runner).run(
                {t.name: target for t, target in self._targets(tables) if t.name in names},
                self._recorded_schemas(),
            )
        except BaseException as error:
            self._resync_failed(ids, error)
            raise
        self._resync_done(tables, names, ids, lsn, fresh)
        return rows

    def _plan_resync(
        self, tables: list[CdcTable], wanted: set[TableName]
    ) -> tuple[list[TableName], list[int]] | None:
        """The tables to resync now (wanted ones plus the open requests) and the request ids, marked
        running; None when there is nothing to do. Requests for tables no longer streamed fail."""
        key = self.config.key
        requests = self.store.open_resyncs(key.tenant, key.pipeline)
        self._resync_due = False
        known = {t.name.qualified: t.name for t in tables}
        stale = [r.id for r in requests if r.table_name not in known]
        if stale:
            self.store.mark_resyncs(stale, "failed", run_id=self.run_id, error="the table is not in the pipeline")
        wanted = wanted | {known[r.table_name] for r in requests if r.table_name in known}
        if not wanted:
            return None
        ids = [r.id for r in requests if r.table_name in known]
        self.store.mark_resyncs(ids, "running", run_id=self.run_id)
        return [t.name for t in tables if t.name in wanted], ids

    def _table_resync(self, sink: Sink, make_runner: Callable[[int, str | None, str], SnapshotRunner]) -> TableResync:
        config = self.config
        return TableResync(
            config.source_connection,
            config.source_dsn,
            sink,
            self.store,
            config.key,
            {t.table: t.primary_key for t in config.tables if t.primary_key},
            config.table_checkpoint,
            make_runner,
            self._record_schema,
        )

    def _recorded_schemas(self) -> dict[str, TableSchema]:
        latest = self.store.latest_schemas(self.config.key.tenant, self.config.key.pipeline)
        return {name: TableSchema.from_json(r.table_schema) for name, r in latest.items()}

    def _resync_failed(self, ids: list[int], error: BaseException) -> None:
        """A stop leaves the requests open for the next run (the tables keep their marker)."""
        if isinstance(error, SnapshotCancelled) or not isinstance(error, Exception):
            self.store.mark_resyncs(ids, "pending")
        else:
            self.store.mark_resyncs(ids, "failed", error=str(error)[:2000])

    def _resync_done(
        self, tables: list[CdcTable], names: list[TableName], ids: list[int], lsn: int, fresh: list[CdcTable]
    ) -> None:
        by_name = {t.name: t for t in fresh}
        tables[:] = [by_name.get(t.name, t) for t in tables]
        self.store.mark_resyncs(ids, "done")
        self._tables_resynced(names)  # a failed table starts over from its new checkpoint
        self._after_resync(names, lsn)

    def _after_resync(self, names: list[TableName], lsn: int) -> None:
        """Record the resync; a schema change held on a resynced table is settled by it (the
        table now follows the source's current schema)."""
        state = self.store.get_pipeline_state(self.config.key.tenant, self.config.key.pipeline)
        detail = dict(state.detail) if state else {}
        status = state.state if state else "active"
        if status == "pending_schema_approval" and detail.get("table") in {n.qualified for n in names}:
            status = "active"
            detail = {k: v for k, v in detail.items() if k not in _PENDING_DETAIL}
        detail = release_paused(detail, {n.qualified for n in names})  # a row held by on_error: pause_table
        if status == "paused" and PAUSED_DETAIL not in detail:
            status = "active"
        detail["last_resync"] = {"tables": [n.qualified for n in names], "lsn": format_lsn(lsn)}
        self.store.set_pipeline_state(self.config.key, status, detail)


def request_table_resync(
    config: CdcPipelineConfig, store: StateStore, tables: Sequence[str | TableName], reason: str = ""
) -> list[int]:
    """Record a resync request for tables of the pipeline (UnknownTables names the valid ones);
    the live CDC run, or else the next one, carries it out. Returns the request ids."""
    names = validate_resync_tables(tables, [t.table for t in config.tables])
    return store.request_resync(config.key, [n.qualified for n in names], reason)
