"""A started pgoutput stream (`ReplicationStream`): poll for messages, acknowledge what is durable.

Dead connections are noticed within seconds: when the server has sent nothing for `ping_after_s`
the stream asks it for a keepalive reply, and once nothing at all arrived for `dead_after_s` it
declares the connection lost (`ServerClosed`), which the run answers by reconnecting.
"""

from __future__ import annotations

import select
import selectors
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
from psycopg import pq

from nilus_dagster.cdc.heartbeat import HEARTBEAT_PREFIX, WalHeartbeat
from nilus_dagster.cdc.lsn import INVALID_LSN, Lsn
from nilus_dagster.cdc.pgoutput import LogicalMessage, Message, RowChange, decode
from nilus_dagster.cdc.slots import ReplicationError, ServerClosed, SlotLost, slot_exists

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


def _payload(buf: bytes, offset: int) -> bytes:
    """The "decoder" that keeps a payload as it is (decoded later by `decode_many`)."""
    return buf


def _now_pg_micros() -> int:
    return int((time.time() - _PG_EPOCH_UNIX_S) * 1_000_000)


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
        dead_after_s: float = 15.0,
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
        self.dead_after_s = dead_after_s
        self._last_receive = time.monotonic()  # when the server last sent anything at all
        self._pinged = False  # a reply was requested since the last message
        self._listening_since = time.monotonic()  # silence counts only while the caller polls
        self._last_poll = time.monotonic()

    @property
    def fresh(self) -> bool:
        """The server spoke recently (within the cadence at which a silent server is pinged)."""
        return time.monotonic() - self._last_receive < self.dead_after_s / 3 + 1.0

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
        decode_many: Callable[[list[bytes], int], list[Message | RowChange]] | None = None,
    ) -> list[tuple[Lsn, Message]]:
        """Return the messages already received, or wait up to `timeout_s` for some.

        Each message comes with the WAL start position of its XLogData (0 for Relation and Type
        messages, which describe rather than change). Keepalives are answered and periodic status
        updates sent here, so call it at least every few seconds while the stream is open.
        `decoder` turns a payload (and the offset of the pgoutput message in it) into a message,
        e.g. `pgoutput.decode_row_change` for row changes as plain tuples; `decode_many`, if given,
        decodes the payloads of each drain at once instead (`pgoutput.decode_many`).
        """
        if self._stopped:
            raise ReplicationError(f"the stream of slot '{self.slot}' is stopped")
        messages: list[tuple[Lsn, Message]] = []
        if time.monotonic() - self._last_poll > 1.0:  # the caller was busy (a long sink write): not silence
            self._listening_since, self._pinged = time.monotonic(), False
        try:
            if decode_many is not None:
                return self._poll(timeout_s, max_messages, _payload, messages, decode_many)
            return self._poll(timeout_s, max_messages, decoder, messages)
        finally:
            self._last_poll = time.monotonic()

    def _poll(
        self,
        timeout_s: float,
        max_messages: int,
        decoder: Callable[[bytes, int], Message | RowChange],
        messages: list[tuple[Lsn, Message]],
        decode_many: Callable[[list[bytes], int], list[Message | RowChange]] | None = None,
    ) -> list[tuple[Lsn, Message]]:
        deadline = time.monotonic() + timeout_s
        while True:
            first = len(messages)
            self._drain(messages, max_messages, decoder)
            if decode_many is not None and len(messages) > first:  # (the payloads, kept by `_payload`)
                starts, payloads = zip(*messages[first:], strict=True)
                messages[first:] = zip(starts, decode_many(list(payloads), _PAYLOAD_OFFSET), strict=True)  # type: ignore[arg-type]
            now = time.monotonic()
            self._check_alive(now)
            if now - self._last_status >= self._status_interval_s:
                self.send_status()
            if self.heartbeat is not None and self.heartbeat.due(now, self._last_data):
                self.heartbeat.beat(now)
            if messages or now >= deadline:
                return messages
            next_status = self._last_status + self._status_interval_s
            if self._selector.select(max(0.0, min(deadline, next_status) - now)):
                self._consume_input()

    def _check_alive(self, now: float) -> None:
        """A silent server is asked for a keepalive reply after a third of `dead_after_s`; once the
        whole of it passed with nothing received, the connection is lost (a frozen network)."""
        silent = self._silent_s(now)
        if silent >= self.dead_after_s:
            self._raise_lost(f"no message from the server for {silent:.1f}s (connection dead?)")
        if not self._pinged and silent >= self.dead_after_s / 3:
            self._pinged = True
            self.send_status(reply_requested=True)

    def _silent_s(self, now: float) -> float:
        """How long the server has said nothing while we were listening."""
        return now - max(self._last_receive, self._listening_since)

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
        just_read_socket = got_any = got_data = False
        try:
            while room > 0:
                size, data = get_copy_data(1)
                if size > 0:
                    just_read_socket = False
                    got_any = True
                    buf = bytes(data)
                    tag = buf[0]
                    if tag == _XLOG_DATA:
                        (start,) = _XLOG_START(buf, 1)
                        if start > received:
                            received = start
                        if buf[_PAYLOAD_OFFSET] == _LOGICAL_MESSAGE and self._is_heartbeat(buf):
                            caught_up = self.heartbeat_lsn  # everything committed before it was sent
                            continue
                        got_data = True
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
            if got_any:
                self._last_receive, self._pinged = time.monotonic(), False
            if got_data:  # (once per drain, not per message)
                self._last_data = self._last_receive

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
            silent = self._silent_s(time.monotonic())
            if silent >= self.dead_after_s:
                self._raise_lost(f"could not send to the server for {silent:.1f}s (connection dead?)")

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
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=3) as conn:
                    exists = slot_exists(conn, self.slot)
            except psycopg.Error:
                exists = True  # cannot tell: report the connection loss
            if not exists:
                raise SlotLost(f"replication slot '{self.slot}' was dropped ({reason.strip()})")
        raise ServerClosed(f"replication connection for slot '{self.slot}' lost: {reason.strip()}")
