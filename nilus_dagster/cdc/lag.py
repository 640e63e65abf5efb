"""Lag that tells the truth: measured against the source, rising through any stall.

`LagClock` turns what the stream knows (caught up with the server or not, the commit time of the
newest applied transaction) into seconds behind the source: 0 while caught up; otherwise the time
since the run last knew itself current (caught up, or the newest applied commit). It keeps rising
while the stream delivers nothing (a frozen connection, a sink outage, a reconnect backoff).
`source_position` reads the server's side: its WAL position and the slot's unconfirmed bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from nilus_dagster.cdc.deadline import io_deadline

_SOURCE_SQL = """
SELECT pg_current_wal_lsn()::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()
"""


@dataclass(frozen=True)
class SourcePosition:
    wal_lsn: str  # the newest WAL position the server has
    unconfirmed_wal_bytes: int  # WAL after the slot's confirmed position: not yet durable in the sink
    retained_wal_bytes: int  # WAL the server keeps for the slot


def source_position(conn: psycopg.Connection[Any], slot: str, deadline_s: float = 5.0) -> SourcePosition | None:
    """The server's side of the lag (None when the slot does not exist)."""
    with io_deadline(conn, deadline_s):
        row = conn.execute(_SOURCE_SQL, (slot,)).fetchone()
    if row is None:
        return None
    return SourcePosition(str(row[0]), int(row[1] or 0), int(row[2] or 0))


class LagClock:
    """Seconds behind the source, from the stream's point of view (see the module docstring)."""

    def __init__(self) -> None:
        self._current_at = time.time()  # wall-clock time the run last knew itself current
        self._known = False  # caught up, or a commit applied: until then, counted from the run's start

    def observe(self, caught_up: bool, last_commit: datetime | None) -> float:
        now = time.time()
        if caught_up:
            self._current_at, self._known = now, True
            return 0.0
        if last_commit is not None:
            # A run that starts behind (a backlog) is as far behind as its first applied commit.
            first = not self._known
            self._current_at = last_commit.timestamp() if first else max(self._current_at, last_commit.timestamp())
            self._known = True
        return self.lag()

    def lag(self) -> float:
        """While nothing is delivered: the lag keeps growing."""
        return round(max(0.0, time.time() - self._current_at), 3)
