"""The streaming phase: the replication stream → the change applier (cdc/applier.py) → the sink.

The slot is acknowledged only up to what every table has made durable, so nothing is lost; each
table's checkpoint, committed with its changes, makes sure nothing is applied twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nilus_dagster.cdc.applier import (
    ChangeApplier,
    SchemaChangeRefused,
    SchemaEvent,
    StreamStats,
    StreamTable,
)
from nilus_dagster.cdc.pgoutput import decode_many
from nilus_dagster.cdc.replication import ReplicationStream
from nilus_dagster.sinks.base import release_idle

__all__ = [
    "ChangeApplier",
    "SchemaChangeRefused",
    "SchemaEvent",
    "StreamProgress",
    "StreamStats",
    "StreamTable",
    "run_stream",
]


@dataclass
class StreamProgress:
    applied_lsn: int
    received_lsn: int
    events_total: int
    events_per_s: float
    lag_seconds: float
    transactions: int
    caught_up: bool = False  # nothing pending and the server said it has nothing newer
    settled: bool = False  # nothing buffered and no open transaction: the sink holds all received
    caught_up_lsn: int = 0  # the position the server last said it has nothing newer than


def run_stream(
    stream: ReplicationStream,
    applier: ChangeApplier,
    *,
    should_stop: Callable[[], bool],
    stop_at_lsn: int | None = None,
    on_progress: Callable[[StreamProgress], Any] = lambda progress: None,
    on_durable: Callable[[int], Any] = lambda lsn: None,
    progress_interval_s: float = 1.0,
    finish_transaction_s: float = 10.0,
    interrupts: tuple[type[BaseException], ...] = (),
) -> StreamStats:
    """Stream until asked to stop (finishing the open transaction first, within a bound) or, with
    `stop_at_lsn`, until everything up to that WAL position is applied.

    An exception of `interrupts` (a run being terminated) that arrives while waiting for the
    server is treated as a stop request: the batch is flushed, then the exception is re-raised.
    Anywhere else it propagates at once; nothing is half-committed and the next run replays (a
    transaction being applied in chunks is rolled back).
    """
    applier.on_flushed = lambda end_lsn: _confirm(stream, applier, end_lsn, on_durable)
    applier.keepalive = stream.send_status  # a spilled transaction's Commit can outlast wal_sender_timeout
    append_row = applier._transaction.append  # what `handle` does with a row change, minus the call
    stream.send_status(reply_requested=True)  # a keepalive tells at once whether anything is newer
    last_progress = 0.0
    stop_requested_at: float | None = None
    interrupted: BaseException | None = None
    # A poll returns at most one bound's worth of rows, so an open transaction never buffers more
    # than twice `batch_max_rows` changes.
    poll_max = max(1, min(10_000, applier.batch_max_rows))
    try:
        while True:
            if stop_requested_at is None and should_stop():
                stop_requested_at = time.monotonic()
            timeout = 0.05 if stop_requested_at is not None else min(0.2, applier.batch_max_ms / 1000)
            try:
                messages = stream.poll(timeout_s=timeout, max_messages=poll_max, decode_many=decode_many)
            except interrupts as error:
                if interrupted is not None:
                    raise
                interrupted, stop_requested_at, messages = error, time.monotonic(), []
            for _, message in messages:
                if type(message) is tuple:  # a row change: buffered until its transaction commits
                    append_row(message)
                    continue
                applier.handle(message)
                if applier.batch_ready():
                    _flush(stream, applier, on_durable)
            if applier.transaction_too_big:
                applier.spill()  # a big transaction goes on in chunks, inside one sink transaction
            target_reached = stop_at_lsn is not None and applier._batch_end_lsn >= stop_at_lsn
            if applier.batch_ready() or (
                (stop_requested_at is not None or target_reached) and not applier.in_transaction
            ):
                _flush(stream, applier, on_durable)
            if not applier.has_pending and not applier.in_transaction and stream.caught_up_lsn:
                # Nothing pending and the server has nothing newer: an idle slot may release its WAL.
                stream.confirm_flushed(applier.durable_lsn(stream.caught_up_lsn))
            now = time.monotonic()
            if now - last_progress >= progress_interval_s:
                last_progress = now
                on_progress(_progress(stream, applier))
            if stop_requested_at is not None and (
                not applier.in_transaction or now - stop_requested_at > finish_transaction_s
            ):
                break  # an unfinished transaction is simply replayed by the next run
            if stop_at_lsn is not None and _caught_up(stream, applier, stop_at_lsn):
                break
            if not messages and not applier.in_transaction and not applier.has_pending:
                release_idle(applier.sink)  # nothing to apply: other processes may open the sink
    finally:
        applier.abandon()  # ending inside a transaction applied in chunks: roll it back
    stream.send_status()
    on_progress(_progress(stream, applier))
    if interrupted is not None:
        raise interrupted
    return applier.stats


def _flush(stream: ReplicationStream, applier: ChangeApplier, on_durable: Callable[[int], Any]) -> None:
    _confirm(stream, applier, applier.flush(), on_durable)


def _confirm(stream: ReplicationStream, applier: ChangeApplier, end_lsn: int, on_durable: Callable[[int], Any]) -> None:
    """Tell the slot (and the state store) how far the sink is durable."""
    if end_lsn:
        stream.confirm_flushed(applier.durable_lsn(end_lsn))
        on_durable(end_lsn)


def _caught_up(stream: ReplicationStream, applier: ChangeApplier, target: int) -> bool:
    if applier.in_transaction or applier.has_pending:
        return False
    reached = max(applier.stats.applied_lsn, stream.caught_up_lsn or 0)
    return reached >= target


def _progress(stream: ReplicationStream, applier: ChangeApplier) -> StreamProgress:
    stats = applier.stats
    settled = not applier.has_pending and not applier.in_transaction
    caught_up = settled and bool(stream.caught_up_lsn)
    lag = 0.0
    if stats.last_commit_time is not None and not caught_up:
        lag = max(0.0, (datetime.now(UTC) - stats.last_commit_time).total_seconds())
    return StreamProgress(
        applied_lsn=stats.applied_lsn,
        received_lsn=stream.received_lsn,
        events_total=stats.events_total,
        events_per_s=round(stats.events_per_s, 1),
        lag_seconds=round(lag, 3),
        transactions=stats.transactions,
        caught_up=caught_up,
        settled=settled,
        caught_up_lsn=stream.caught_up_lsn or 0,
    )
