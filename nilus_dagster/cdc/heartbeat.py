"""WAL heartbeats for an idle replication stream.

A logical slot is moved only by what its client acknowledges. While the pipeline's tables are idle
and other databases of the cluster write, the server may send no keepalive for a long time (it is
busy decoding their WAL). `WalHeartbeat.beat()` writes a non-transactional
`pg_logical_emit_message(false, 'nilus_heartbeat', '')` into the slot's database; decoded in WAL
order, it reaches the stream after every transaction that committed before it, so its LSN is a
position the stream may acknowledge once those are durable.
"""

from __future__ import annotations

import psycopg

from nilus_dagster.cdc.deadline import io_deadline
from nilus_dagster.sources.postgres.connection import CONNECT_OPTIONS

HEARTBEAT_PREFIX = "nilus_heartbeat"


class WalHeartbeat:
    """Writes heartbeats through its own ordinary connection (opened when first needed)."""

    def __init__(self, dsn: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self._dsn = dsn
        self._conn: psycopg.Connection | None = None
        self._last = 0.0
        self._log_running_xacts = True  # until the server says pg_log_standby_snapshot() is not ours
        self.sent = 0
        self.error: str | None = None  # why heartbeats stopped (e.g. a permission); None while on

    def due(self, now: float, last_data: float) -> bool:
        """No data for an interval and no heartbeat for one: never while data flows."""
        return self.error is None and now - last_data >= self.interval_s and now - self._last >= self.interval_s

    def beat(self, now: float) -> None:
        self._last = now
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._dsn, autocommit=True, **{**CONNECT_OPTIONS, "connect_timeout": 5})
            with io_deadline(self._conn, 5.0):  # a frozen connection must not stall the stream's poll
                if self._log_running_xacts:
                    self._log_standby_snapshot(self._conn)
                self._conn.execute("SELECT pg_logical_emit_message(false, %s, '')", (HEARTBEAT_PREFIX,))
            self.sent += 1
        except psycopg.OperationalError:
            self.close()  # the server may be restarting: the stream itself will tell
        except psycopg.Error as error:  # e.g. not permitted: keepalives still acknowledge idle WAL
            self.error = str(error).strip()
            self.close()

    def _log_standby_snapshot(self, conn: psycopg.Connection) -> None:
        """Log running transactions first (PG 16+, if permitted): the slot can move its restart
        point only at such a record, which the server otherwise writes every 15 s at best; once the
        heartbeat after it is acknowledged, the slot releases WAL up to it."""
        try:
            conn.execute("SELECT pg_log_standby_snapshot()")
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedFunction):
            self._log_running_xacts = False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
