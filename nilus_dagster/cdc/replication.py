"""Logical replication over psycopg 3: slots, exported snapshots and a pollable pgoutput stream.

`ReplicationConnection` wraps a `replication=database` connection (IDENTIFY_SYSTEM,
CREATE_REPLICATION_SLOT, START_REPLICATION). `start()` returns a `ReplicationStream` whose `poll()`
waits at most a given timeout, so a caller's loop can stop promptly. The stream acknowledges to the
server only what the caller declares durable with `confirm_flushed()`: the slot never forgets WAL
the sink has not committed.

The slot helpers (`slot_status`, `drop_slot`...) and the errors live in `cdc.slots` and are
re-exported here.
"""

from __future__ import annotations

import re
import select
import selectors
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

import psycopg
from psycopg import pq

from nilus_dagster.cdc.heartbeat import HEARTBEAT_PREFIX, WalHeartbeat
from nilus_dagster.cdc.lsn import INVALID_LSN, Lsn, format_lsn, parse_lsn
from nilus_dagster.cdc.pgoutput import LogicalMessage, Message, RowChange, decode
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

__all__ = [
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
_PG_EPOCH_UNIX_S = int(datetime(2000, 1, 1, tzinfo=UTC).timestamp())
_XLOG_START = struct.Struct(">Q").unpack_from  # XLogData: WAL start, WAL end, send time, payload
_KEEPALIVE = struct.Struct(">Qq?").unpack_from  # WAL end, server send time, reply requested
_STANDBY_STATUS = struct.Struct(">cQQQq?").pack  # 'r', write, flush, apply, client time, reply
_XLOG_DATA, _KEEPALIVE_TAG = b"w"[0], b"k"[0]
_PAYLOAD_OFFSET = 25
_LOGICAL_MESSAGE = b"M"[0]
# Tell the server at once (not at the next periodic update) once the confirmed position moved this
# far: on a busy cluster an idle slot then releases WAL segment by segment.
EAGER_STATUS_BYTES = 16 << 20


def _slot_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"'{name}' is not a valid replication slot name: use 1-63 lowercase letters, digits and '_'"
        )
    return name


def _now_pg_micros() -> int:
    return int((time.time() - _PG_EPOCH_UNIX_S) * 1_000_000)


class ReplicationConnection:
    """A `replication=database` connection to one database. Use as a context manager."""

    def __init__(self, conn: psycopg.Connection, dsn: str | None = None) -> None:
        self._conn = conn
        self._dsn = dsn  # kept to tell a dropped slot from a lost server, through a normal connection
        self._stream: ReplicationStream | None = None

    @classmethod
    def connect(cls, dsn: str, **kwargs: object) -> ReplicationConnection:
        conn = psycopg.connect(dsn, replication="database", autocommit=True, **kwargs)  # type: ignore[arg-type]
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
    ) -> ReplicationStream:
        """START_REPLICATION with pgoutput v1. `start_lsn` 0 resumes at the slot's confirmed flush
        position; the server never replays a transaction that committed before that position.
        `logical_messages` also streams `pg_logical_emit_message()` messages (e.g. watermarks).
        `heartbeat_interval_s`: see `ReplicationStream` (implies `logical_messages`)."""
        if self._stream is not None:
            raise ReplicationError("this connection is already streaming")
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
        self._stream = ReplicationStream(self._conn.pgconn, slot, self._dsn, status_interval_s, heartbeat_interval_s)
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream = None
        self._conn.close()

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


class ReplicationStream:
    """A started pgoutput stream. Not thread-safe: poll and confirm from one thread.

    Heartbeats (`heartbeat_interval_s`, see `cdc.heartbeat`): while no data arrives for that long,
    `poll()` writes one into the slot's database. When it comes back its LSN becomes `caught_up_lsn`,
    a position an idle slot may acknowledge even when the server, busy decoding other databases'
    WAL, sends no keepalive. Heartbeats are consumed here and never returned by `poll()`.
    """

    def __init__(
        self,
        pgconn: pq.abc.PGconn,
        slot: str,
        dsn: str | None,
        status_interval_s: float,
        heartbeat_interval_s: float | None = None,
    ) -> None:
        self.slot = slot
        self._pgconn = pgconn
        self._dsn = dsn
        self._status_interval_s = status_interval_s
        self._selector = selectors.DefaultSelector()
        self._selector.register(pgconn.socket, selectors.EVENT_READ)
        self._confirmed: Lsn = INVALID_LSN
        self._last_status = 0.0  # monotonic time of the last standby status update
        self._caught_up: Lsn | None = None
        self._stopped = False
        self._sent_flush: Lsn = INVALID_LSN  # the flush position last sent to the server
        self.received_lsn: Lsn = INVALID_LSN  # highest WAL position seen (XLogData start, keepalive)
        self.heartbeat = WalHeartbeat(dsn, heartbeat_interval_s) if dsn and heartbeat_interval_s is not None else None
        self._last_data = time.monotonic()  # when XLogData (other than a heartbeat) last arrived
        self.heartbeat_lsn: Lsn = INVALID_LSN  # LSN of the last heartbeat received back

    @property
    def confirmed_lsn(self) -> Lsn:
        """The flush position last declared by `confirm_flushed` (what the server is told)."""
        return self._confirmed

    @property
    def caught_up_lsn(self) -> Lsn | None:
        """The server's sent position from the last keepalive, if no data arrived after it.

        Once everything `poll()` returned is durable, confirming this position lets an idle slot
        (whose publication sees no changes while other databases write WAL) release WAL."""
        return self._caught_up

    def confirm_flushed(self, lsn: Lsn, *, send: bool = False) -> None:
        """Declare everything up to `lsn` durable (usually a Commit's `end_lsn`). Never goes back.

        The server learns it at the next periodic status update, or now with `send=True` (or when
        it moved `EAGER_STATUS_BYTES` past what the server was last told)."""
        self._confirmed = max(self._confirmed, lsn)
        if send or self._confirmed - self._sent_flush >= EAGER_STATUS_BYTES:
            self.send_status()

    def send_status(self, *, reply_requested: bool = False) -> None:
        """Send a standby status update: flushed and applied = the confirmed position (the server
        moves the slot's confirmed_flush_lsn there and may free WAL before it); written = what was
        received, which only tells the server not to ping about data already delivered."""
        flushed = self._confirmed
        written = max(flushed, self.received_lsn)
        message = _STANDBY_STATUS(b"r", written, flushed, flushed, _now_pg_micros(), reply_requested)
        try:
            if self._pgconn.put_copy_data(message) != 1:
                raise ServerClosed("could not queue a status update: the connection is broken")
            self._flush_output()
        except psycopg.OperationalError as error:
            self._raise_lost(str(error))
        self._last_status = time.monotonic()
        self._sent_flush = flushed

    def poll(
        self,
        timeout_s: float,
        max_messages: int = 10_000,
        *,
        decoder: Callable[[bytes, int], Message | RowChange] = decode,
    ) -> list[tuple[Lsn, Message]]:
        """Return the messages already received, or wait up to `timeout_s` for some.

        Each message comes with the WAL start position of its XLogData (0 for Relation and Type
        messages, which describe rather than change). Keepalives are answered and periodic status
        updates sent here, so call it at least every few seconds while the stream is open.
        `decoder` turns a payload (and the offset of the pgoutput message in it) into a message,
        e.g. `pgoutput.decode_row_change` for row changes as plain tuples.
        """
        if self._stopped:
            raise ReplicationError(f"the stream of slot '{self.slot}' is stopped")
        messages: list[tuple[Lsn, Message]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            self._drain(messages, max_messages, decoder)
            now = time.monotonic()
            if now - self._last_status >= self._status_interval_s:
                self.send_status()
            if self.heartbeat is not None and self.heartbeat.due(now, self._last_data):
                self.heartbeat.beat(now)
            if messages or now >= deadline:
                return messages
            next_status = self._last_status + self._status_interval_s
            if self._selector.select(max(0.0, min(deadline, next_status) - now)):
                self._consume_input()

    def stop(self) -> None:
        """Tell the server to end the stream (best effort; closing the connection also does)."""
        if self._stopped:
            return
        self._stopped = True
        if self.heartbeat is not None:
            self.heartbeat.close()
        self._selector.close()
        if self._pgconn.status == pq.ConnStatus.OK:
            try:
                self._pgconn.put_copy_end()
                self._pgconn.flush()
            except psycopg.OperationalError:
                pass

    def _drain(
        self,
        messages: list[tuple[Lsn, Message]],
        max_messages: int,
        decoder: Callable[[bytes, int], Message | RowChange] = decode,
    ) -> None:
        """Decode every complete message libpq holds, reading the socket without blocking."""
        get_copy_data = self._pgconn.get_copy_data
        append = messages.append
        room = max_messages - len(messages)
        received, caught_up = self.received_lsn, self._caught_up  # locals: this loop is the hot path
        just_read_socket = False
        try:
            while room > 0:
                size, data = get_copy_data(1)
                if size > 0:
                    just_read_socket = False
                    buf = bytes(data)
                    tag = buf[0]
                    if tag == _XLOG_DATA:
                        (start,) = _XLOG_START(buf, 1)
                        if start > received:
                            received = start
                        if buf[_PAYLOAD_OFFSET] == _LOGICAL_MESSAGE and self._is_heartbeat(buf):
                            caught_up = self.heartbeat_lsn  # everything committed before it was sent
                            continue
                        self._last_data = time.monotonic()
                        append((start, decoder(buf, _PAYLOAD_OFFSET)))  # type: ignore[arg-type]
                        room -= 1
                        caught_up = None
                    elif tag == _KEEPALIVE_TAG:
                        wal_end, _, reply_requested = _KEEPALIVE(buf, 1)
                        caught_up = wal_end
                        received = max(received, wal_end)
                        if reply_requested:
                            self.received_lsn = received
                            self.send_status()
                elif size == 0:
                    if just_read_socket:
                        return
                    self._pgconn.consume_input()
                    just_read_socket = True
                else:
                    self._end_of_stream()
        except psycopg.OperationalError as error:
            self._raise_lost(str(error))
        finally:
            self.received_lsn, self._caught_up = received, caught_up

    def _is_heartbeat(self, buf: bytes) -> bool:
        message = decode(buf, _PAYLOAD_OFFSET)
        if not isinstance(message, LogicalMessage) or message.transactional or message.prefix != HEARTBEAT_PREFIX:
            return False
        self.heartbeat_lsn = max(self.heartbeat_lsn, message.lsn)
        return True

    def _consume_input(self) -> None:
        try:
            self._pgconn.consume_input()
        except psycopg.OperationalError as error:
            self._raise_lost(str(error))

    def _flush_output(self) -> None:
        """Send queued output; while the socket is full, keep reading so neither side blocks."""
        while self._pgconn.flush() == 1:
            readable, _, _ = select.select([self._pgconn.socket], [self._pgconn.socket], [], 1.0)
            if readable:
                self._consume_input()

    def _end_of_stream(self) -> None:
        """The server ended COPY: raise what it said."""
        message, sqlstate = "the server ended the replication stream", None
        result = self._pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            message = result.error_message.decode(errors="replace").strip()
            raw_state = result.error_field(pq.DiagnosticField.SQLSTATE)
            sqlstate = raw_state.decode() if raw_state else None
        if sqlstate == "55000":  # object_not_in_prerequisite_state: the slot was invalidated
            raise SlotLost(f"replication slot '{self.slot}' can no longer be used: {message}")
        self._raise_lost(message)

    def _raise_lost(self, reason: str) -> None:
        self.stop()
        if self._dsn is not None:
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
                    exists = slot_exists(conn, self.slot)
            except psycopg.Error:
                exists = True  # cannot tell: report the connection loss
            if not exists:
                raise SlotLost(f"replication slot '{self.slot}' was dropped ({reason.strip()})")
        raise ServerClosed(f"replication connection for slot '{self.slot}' lost: {reason.strip()}")
