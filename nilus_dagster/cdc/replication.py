"""Logical replication over psycopg 3: slots, exported snapshots and a pollable pgoutput stream.

`ReplicationConnection` wraps a `replication=database` connection (IDENTIFY_SYSTEM,
CREATE_REPLICATION_SLOT, START_REPLICATION). `start()` returns a `ReplicationStream` whose `poll()`
waits at most a given timeout, so a caller's loop can stop promptly. The stream acknowledges to the
server only what the caller declares durable with `confirm_flushed()`: the slot never forgets WAL
the sink has not committed. The stream itself lives in `cdc.replication_stream`.

Connections open with a connect timeout and TCP keepalives (`CONNECT_OPTIONS`), so a dead peer is
noticed in seconds rather than at the kernel's two-hour default.

The slot helpers (`slot_status`, `drop_slot`...) and the errors live in `cdc.slots` and are
re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import psycopg
from psycopg import pq

from nilus_dagster.cdc.lsn import INVALID_LSN, Lsn, format_lsn, parse_lsn
from nilus_dagster.cdc.replication_stream import EAGER_STATUS_BYTES, ReplicationStream
from nilus_dagster.cdc.slots import (  # re-exported: callers import the replication layer from here
    ReplicationError,
    ServerClosed,
    SlotInUse,
    SlotLost,
    SlotStatus,
    SystemMismatch,
    drop_slot,
    ensure_same_system,
    fetch_type_info,
    slot_exists,
    slot_status,
    system_identifier,
)
from nilus_dagster.sources.postgres.connection import CONNECT_OPTIONS

__all__ = [
    "CONNECT_OPTIONS",
    "EAGER_STATUS_BYTES",
    "ReplicationConnection",
    "ReplicationError",
    "ReplicationStream",
    "ServerClosed",
    "SlotInUse",
    "SlotInfo",
    "SlotLost",
    "SlotStatus",
    "SystemInfo",
    "SystemMismatch",
    "drop_slot",
    "ensure_same_system",
    "fetch_type_info",
    "slot_exists",
    "slot_status",
    "system_identifier",
]


@dataclass(frozen=True, slots=True)
class SystemInfo:
    system_identifier: str
    timeline: int
    xlogpos: Lsn
    dbname: str | None


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot_name: str
    consistent_point: Lsn  # stream from here to see exactly what the snapshot does not
    snapshot_name: str | None  # for SET TRANSACTION SNAPSHOT, while the creating connection is idle


_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_PUBLICATION = re.compile(r"^[a-z_][a-z0-9_$]{0,62}$")  # pgoutput lowercases the names it is given


def _slot_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"'{name}' is not a valid replication slot name: use 1-63 lowercase letters, digits and '_'"
        )
    return name


class ReplicationConnection:
    """A `replication=database` connection to one database. Use as a context manager."""

    def __init__(self, conn: psycopg.Connection, dsn: str | None = None) -> None:
        self._conn = conn
        self._dsn = dsn  # kept to tell a dropped slot from a lost server, through a normal connection
        self._stream: ReplicationStream | None = None

    @classmethod
    def connect(cls, dsn: str, **kwargs: object) -> ReplicationConnection:
        options = {**CONNECT_OPTIONS, **kwargs}
        conn = psycopg.connect(dsn, replication="database", autocommit=True, **options)  # type: ignore[arg-type]
        return cls(conn, dsn)

    def identify_system(self) -> SystemInfo:
        row = self._command("IDENTIFY_SYSTEM")
        return SystemInfo(str(row[0]), int(row[1]), parse_lsn(row[2]), row[3])

    def create_slot(self, name: str, *, export_snapshot: bool, temporary: bool = False) -> SlotInfo:
        """Create a pgoutput slot. With `export_snapshot`, the returned snapshot stays importable
        until `release_snapshot()`, the next command on this connection, or `close()`."""
        kind = "TEMPORARY " if temporary else ""
        snapshot = "export" if export_snapshot else "nothing"
        try:
            row = self._command(
                f"CREATE_REPLICATION_SLOT {_slot_name(name)} {kind}LOGICAL pgoutput (SNAPSHOT '{snapshot}')"
            )
        except psycopg.errors.DuplicateObject as error:
            raise ReplicationError(f"replication slot '{name}' already exists") from error
        return SlotInfo(row[0], parse_lsn(row[1]), row[2])

    def release_snapshot(self) -> None:
        """End the snapshot exported by `create_slot` (any command on this connection does)."""
        self._command("IDENTIFY_SYSTEM")

    def start(
        self,
        slot: str,
        publication_names: Sequence[str],
        start_lsn: Lsn = INVALID_LSN,
        *,
        logical_messages: bool = False,
        status_interval_s: float = 10.0,
        heartbeat_interval_s: float | None = None,
        dead_after_s: float = 15.0,
    ) -> ReplicationStream:
        """START_REPLICATION with pgoutput v1. `start_lsn` 0 resumes at the slot's confirmed flush
        position; the server never replays a transaction that committed before that position.
        `logical_messages` also streams `pg_logical_emit_message()` messages (e.g. watermarks).
        `heartbeat_interval_s`: see `ReplicationStream` (implies `logical_messages`). `dead_after_s`:
        silence after which the connection counts as lost, capped below the server's own
        wal_sender_timeout (after which it ends its side anyway)."""
        if self._stream is not None:
            raise ReplicationError("this connection is already streaming")
        sender_timeout_ms = int(self._conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'")
                                .fetchone()[0])  # type: ignore[index]
        if sender_timeout_ms > 0:
            dead_after_s = min(dead_after_s, sender_timeout_ms / 2000)
        if not publication_names:
            raise ValueError("start() needs at least one publication name")
        for publication in publication_names:
            if not _PUBLICATION.match(publication):
                raise ValueError(f"'{publication}' is not a plain (lowercase, unquoted) publication name")
        options = f"proto_version '1', publication_names '{','.join(publication_names)}'"
        if logical_messages or heartbeat_interval_s is not None:
            options += ", messages 'true'"
        command = f"START_REPLICATION SLOT {_slot_name(slot)} LOGICAL {format_lsn(start_lsn)} ({options})"
        try:
            self._conn.execute(command)
        except psycopg.errors.UndefinedObject as error:
            raise SlotLost(f"replication slot '{slot}' does not exist") from error
        except psycopg.errors.ObjectInUse as error:
            raise SlotInUse(f"replication slot '{slot}' is in use by another connection: {error}") from error
        except psycopg.errors.ObjectNotInPrerequisiteState as error:
            raise SlotLost(f"replication slot '{slot}' cannot be used: {error}") from error
        if self._conn.pgconn.status != pq.ConnStatus.OK:
            raise ServerClosed(f"the server closed the connection while starting slot '{slot}'")
        self._stream = ReplicationStream(
            self._conn.pgconn, slot, self._dsn, status_interval_s, heartbeat_interval_s, dead_after_s
        )
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream = None
        self._conn.close()

    @property
    def backend_pid(self) -> int:
        """The server process of this connection: the walsender holding the slot once started."""
        return self._conn.info.backend_pid

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _command(self, command: str) -> tuple:
        if self._stream is not None:
            raise ReplicationError("the connection is streaming: commands are no longer possible")
        row = self._conn.execute(command).fetchone()
        assert row is not None, command
        return row


