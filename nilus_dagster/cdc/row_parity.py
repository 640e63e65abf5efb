"""Row-count parity of CDC tables at a matched point: the source counted in a snapshot S, the sink
counted once it holds everything S could see, less what S could not.

A round:
1. On its own source connection (a thread: counting a big table takes a while), a `REPEATABLE
   READ` transaction reads S (`pg_current_snapshot()`: xmin, xmax, the xids in progress), counts
   every table in S, then reads L = `pg_current_wal_insert_lsn()`: every transaction S sees wrote
   its commit record before L.
2. At the stream's next settled point (nothing buffered, no open transaction) at or past L, the
   sink holds every transaction S sees. The stream remembers, per table, each transaction it
   applied: xid and rows added minus rows removed (`StreamStats.transactions_by_table`). Those S
   does not see (xid in progress at S, or newer) are taken off the sink's count: `sink_rows` is
   the sink's count as of S, exact under any concurrent writes.
The round is skipped (no result; the next one comes an interval later) where that cannot be
exact: a table truncated by a transaction S does not see, more transactions than are remembered,
a transaction committed but not yet visible when S was read that the stream never saw (e.g. one
streamed before this run, still waiting for a synchronous standby), a held or resyncing table, a
partitioned table (an attached partition's rows reach the sink outside the stream), a stream
that does not reach L within `ROUND_TIMEOUT_S`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from nilus_dagster.cdc.lsn import format_lsn, parse_lsn
from nilus_dagster.cdc.stream_stats import StreamStats
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkTable
from nilus_dagster.sources.postgres.connection import connect_source

ROUND_TIMEOUT_S = 300.0  # a round whose stream does not reach L by then is skipped
_XID_MASK = 0xFFFF_FFFF

_SNAPSHOT_SQL = """
SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text,
       ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x),
       ARRAY(SELECT x::text FROM pg_snapshot_xip(s) x WHERE pg_xact_status(x) = 'committed')
FROM pg_current_snapshot() s
"""


def _precedes(a: int, b: int) -> bool:
    """xid a is older than xid b (32-bit xids compare modulo 2^32, as PostgreSQL does)."""
    return ((a - b) & _XID_MASK) >= 0x8000_0000


@dataclass(frozen=True)
class SourceSnapshot:
    """What a round read in the source: S's xids (32-bit), the counts in S, and L."""

    xmin: int
    xmax: int
    in_progress: frozenset[int]
    committed_in_progress: frozenset[int]  # in progress for S, yet committed: visible only later
    counts: dict[str, int]
    wal_lsn: int
    taken_at: float = field(default_factory=time.monotonic)

    def sees(self, xid: int) -> bool:
        if _precedes(xid, self.xmin):
            return True
        return _precedes(xid, self.xmax) and xid not in self.in_progress


@dataclass(frozen=True)
class RowParity:
    """One table's result: the source's rows in S and the sink's rows as of S."""

    table: str
    source_rows: int
    sink_rows: int
    sink_rows_now: int  # the sink's count at the settled point, before taking off what S did not see
    lsn: str  # the stream's settled position (≥ L)


def read_source_snapshot(conn: Any, tables: Iterable[TableName]) -> SourceSnapshot:  # a psycopg connection
    """Step 1 of a round on an autocommit connection of its own."""
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        row = conn.execute(_SNAPSHOT_SQL).fetchone()
        counts = {}
        for table in tables:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.schema, table.name))
            counts[table.qualified] = int(conn.execute(query).fetchone()[0])
        lsn_row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    finally:
        conn.execute("COMMIT")
    return SourceSnapshot(
        xmin=int(row[0]) & _XID_MASK,
        xmax=int(row[1]) & _XID_MASK,
        in_progress=frozenset(int(x) & _XID_MASK for x in row[2]),
        committed_in_progress=frozenset(int(x) & _XID_MASK for x in row[3]),
        counts=counts,
        wal_lsn=parse_lsn(lsn_row[0]),
    )


@dataclass
class ParityTable:
    name: TableName
    target: SinkTable


class RowParityProbe:
    """Runs rounds every `interval_s` while a run streams; `results` holds each table's newest one,
    `round` counts the rounds that gave results, `skipped` says why a table's last round gave none."""

    def __init__(
        self, connection_name: str, dsn: str, sink: Sink, tables: list[ParityTable], interval_s: float
    ) -> None:
        self._connection_name, self._dsn, self._sink = connection_name, dsn, sink
        self.tables = {t.name.qualified: t for t in tables}
        self.interval_s = interval_s
        self.results: dict[str, RowParity] = {}
        self.skipped: dict[str, str] = {}
        self.round = 0
        self._last_start = float("-inf")
        self._pending: SourceSnapshot | None = None
        self._thread: threading.Thread | None = None
        self._thread_result: SourceSnapshot | BaseException | None = None
        self._held_during: set[str] = set()  # tables held at any tick of the open round

    # -- step 1 ------------------------------------------------------------------------------
    def read_now(self) -> int | None:
        """Step 1 in the caller's thread (a run that stops once caught up reads it before it
        streams); returns L, the position the stream must reach, or None when it failed."""
        self._last_start = time.monotonic()
        self._held_during = set()
        try:
            self._pending = self._read()
        except Exception as error:  # noqa: BLE001 - a check never breaks the stream
            self._skip_all(f"the source count failed: {error}")
            return None
        return self._pending.wal_lsn

    def _read(self) -> SourceSnapshot:
        with connect_source(self._connection_name, self._dsn, autocommit=True) as conn:
            return read_source_snapshot(conn, [t.name for t in self.tables.values()])

    def _start_thread(self) -> None:
        self._last_start = time.monotonic()
        self._held_during = set()

        def work() -> None:
            try:
                self._thread_result = self._read()
            except Exception as error:  # noqa: BLE001
                self._thread_result = error

        self._thread_result = None
        self._thread = threading.Thread(target=work, name="nilus-row-parity", daemon=True)
        self._thread.start()

    # -- the stream's ticks ------------------------------------------------------------------
    def tick(self, *, settled: bool, reached_lsn: int, stats: StreamStats, held: set[str]) -> bool:
        """Called with each progress report; returns True when it produced results."""
        if not self.tables:
            return False
        self._held_during |= held  # a table held meanwhile got rows outside the stream (a resync)
        if self._thread is not None and not self._thread.is_alive():
            result, self._thread = self._thread_result, None
            if isinstance(result, BaseException):
                self._skip_all(f"the source count failed: {result}")
            else:
                self._pending = result
        if self._pending is None:
            if self._thread is None and settled and time.monotonic() - self._last_start >= self.interval_s:
                self._start_thread()
            return False
        if time.monotonic() - self._pending.taken_at > ROUND_TIMEOUT_S:
            self._pending = None
            self._skip_all(f"the stream did not reach the source count's position within {ROUND_TIMEOUT_S:.0f}s")
            return False
        if not settled or reached_lsn < self._pending.wal_lsn:
            return False
        snapshot, self._pending = self._pending, None
        return self._evaluate(snapshot, stats, self._held_during, format_lsn(reached_lsn))

    def _evaluate(self, snapshot: SourceSnapshot, stats: StreamStats, held: set[str], lsn: str) -> bool:
        tracked = stats.transactions_by_table
        known = {xid for t in tracked.values() for xid, _, _ in t.entries}
        unseen = snapshot.committed_in_progress - known
        produced = False
        for name, table in self.tables.items():
            reason = self._unmatched(name, snapshot, stats, held, unseen)
            if reason is not None:
                self.skipped[name] = reason
                continue
            entries = tracked[name].entries if name in tracked else ()
            not_seen = [(delta, truncated) for xid, delta, truncated in entries if not snapshot.sees(xid)]
            if any(truncated for _, truncated in not_seen):
                self.skipped[name] = "truncated after the source count's snapshot"
                continue
            now = self._sink.row_count(table.target)
            sink_rows = now - sum(delta for delta, _ in not_seen)
            self.results[name] = RowParity(name, snapshot.counts[name], sink_rows, now, lsn)
            self.skipped.pop(name, None)
            produced = True
            if name in tracked:
                tracked[name].forget_seen(snapshot.sees)
        if produced:
            self.round += 1
        return produced

    @staticmethod
    def _unmatched(
        name: str, snapshot: SourceSnapshot, stats: StreamStats, held: set[str], unseen: frozenset[int]
    ) -> str | None:
        if name in held:
            return "the table is held (schema approval or resync)"
        if unseen:
            return "a transaction committed but not yet visible at the source count was not streamed in this run"
        tracked = stats.transactions_by_table.get(name)
        if tracked is not None and tracked.forgotten_xid is not None and not snapshot.sees(tracked.forgotten_xid):
            return "more transactions since the source count than the stream remembers"
        return None

    def _skip_all(self, reason: str) -> None:
        for name in self.tables:
            self.skipped[name] = reason

    def close(self) -> None:
        """The run ends: a count still running is left to finish on its own (daemon thread)."""
        self._thread = None
        self._pending = None
