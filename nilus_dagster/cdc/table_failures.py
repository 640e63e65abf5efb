"""Per-table isolation: a table whose sink apply keeps failing is held in state `failed`, the
others keep flowing.

Every table's changes of a batch go to the sink in their own sink transaction with that table's
checkpoint (cdc/applier.py). When one of them fails:

- a transient error (a lost connection, a locked DuckDB file: `cdc.retry.is_transient`) is a sink
  outage: it is raised, and the run reconnects and replays from the checkpoints as before;
- any other sink error is retried `attempts` times in all (with backoff) after the batch's other
  tables were applied. If it still fails and another table's apply succeeded since its first
  failure (the sink works: the fault is this table's), or the error itself is about the table
  alone (`SinkTableMissing`), the table is failed: held (`StreamTable.held`), its changes from
  then on dropped, its checkpoint kept, and the failure recorded (state store `table_failures`,
  the heartbeat's `failed_tables`). Without such evidence the error is raised as before (the
  whole sink may be refusing writes), unless no other table of the pipeline streams (a one-table
  pipeline, or the others already failed): nothing could give evidence then, and holding the table
  stops nothing else, so it is failed too; the run stays alive (the API and the metric
  `nilus_cdc_failed_tables` show it) and a retry resumes it from its checkpoint once fixed.

The slot is never acknowledged past a held table's checkpoint (`ChangeApplier.durable_lsn`), so the
WAL it still needs is kept. A retry (operator job or API: status `retry`) ends the stream at a
transaction boundary; the stream restarts from the slot, from the smallest checkpoint: the table
takes every change after its own checkpoint, the others skip what they hold. A resync of the table
clears its failure too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nilus_dagster.cdc.applier import StreamTable
from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkError, SinkTableMissing, SinkUnavailable

_log = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF_S = 0.5


def _is_transient(error: BaseException) -> bool:
    from nilus_dagster.cdc.retry import is_transient  # cdc.retry imports the applier

    return is_transient(error)


def failure_reason(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__)[:2000]


@dataclass
class TableIsolation:
    """The run's failed tables (they survive stream restarts) and the apply-failure policy.

    `on_failed(table, reason, checkpoint)` and `on_recovered(table)` persist the changes (best
    effort: the hold itself lives here and in the applier)."""

    on_failed: Callable[[TableName, str, str | None], Any] = lambda table, reason, checkpoint: None
    on_recovered: Callable[[TableName], Any] = lambda table: None
    attempts: int = DEFAULT_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S
    sleep: Callable[[float], None] = time.sleep
    failed: dict[TableName, str] = field(default_factory=dict)  # held: table → reason
    tables: set[TableName] = field(default_factory=set)  # the pipeline's tables in the stream
    retrying: set[TableName] = field(default_factory=set)  # released by a retry, not yet proven
    errors: int = 0  # sink errors met applying tables (each failed attempt)
    _first_failure: dict[TableName, float] = field(default_factory=dict)
    _span_failures: dict[TableName, int] = field(default_factory=dict)  # chunked transactions failed
    _last_success: float = 0.0

    # -- the hold ----------------------------------------------------------------------------
    def hold_failed(self, tables: dict[TableName, StreamTable]) -> None:
        """Hold, in a new stream's tables, those failed earlier in the run (or in a previous one)."""
        for name, reason in self.failed.items():
            table = tables.get(name)
            if table is not None:
                table.held, table.failed = True, reason

    def fail(self, table: StreamTable, reason: str) -> None:
        name = table.source.name
        table.held, table.failed = True, reason
        self.failed[name] = reason
        self.retrying.discard(name)
        self._first_failure.pop(name, None)
        checkpoint = format_lsn(table.applied_lsn) if table.applied_lsn else None
        _log.error("CDC table %s failed and is held (the other tables keep streaming): %s", name, reason)
        self._persist(lambda: self.on_failed(name, reason, checkpoint))

    def release(self, names: set[TableName]) -> None:
        """Retry: the next stream applies these tables again (from their checkpoints)."""
        for name in names:
            if self.failed.pop(name, None) is not None:
                self.retrying.add(name)

    def forget(self, names: set[TableName]) -> None:
        """Resynced (or reset): the tables start over from their new checkpoints."""
        for name in names:
            self.failed.pop(name, None)
            self.retrying.discard(name)
            self._first_failure.pop(name, None)

    # -- applying ----------------------------------------------------------------------------
    def apply_all(
        self, applies: list[tuple[StreamTable, Callable[[], Any]]], keepalive: Callable[[], Any] | None = None
    ) -> list[StreamTable]:
        """Apply each table's changes of a batch (each its own sink transaction); a failed one is
        retried once the others are applied. Returns the tables applied (not those now failed)."""
        applied, failing = [], []
        for table, apply in applies:
            (applied if self.attempt(table, apply) else failing).append((table, apply))
        others_applied = bool(applied)
        for table, apply in failing:
            if self.settle(table, apply, others_applied=others_applied, keepalive=keepalive):
                applied.append((table, apply))
        return [table for table, _ in applied]

    def attempt(self, table: StreamTable, apply: Callable[[], Any]) -> bool:
        """Apply one table's changes; False when it failed in a way worth isolating (transient
        errors and anything but sink errors are raised)."""
        try:
            apply()
        except SinkError as error:
            self.errors += 1
            if _is_transient(error):
                raise
            self._first_failure.setdefault(table.source.name, time.monotonic())
            return False
        self.applied(table.source.name)
        return True

    def settle(
        self,
        table: StreamTable,
        apply: Callable[[], Any],
        *,
        others_applied: bool,
        keepalive: Callable[[], Any] | None = None,
    ) -> bool:
        """After the batch's other tables (`others_applied`: one of them got through): retry a
        failed apply; True once it succeeds, False when the table is now failed (held). Raises
        when the sink as a whole may be at fault."""
        name = table.source.name
        error: BaseException | None = None
        for attempt in range(1, self.attempts):
            self.sleep(self.backoff_s * 2 ** (attempt - 1))
            if keepalive is not None:
                keepalive()
            try:
                apply()
            except SinkError as failure:
                self.errors += 1
                if _is_transient(failure):
                    raise
                error = failure
                continue
            self.applied(name)
            return True
        if error is None:  # a single attempt allowed: reproduce the error to judge it
            try:
                apply()
            except SinkError as failure:
                error = failure
            else:
                self.applied(name)
                return True
        sink_works = others_applied or self._last_success > self._first_failure.get(name, 0.0)
        if not sink_works and not isinstance(error, SinkTableMissing) and not self._alone(name):
            raise error  # no other table got through meanwhile: maybe the whole sink refuses writes
        self.fail(table, failure_reason(error))
        return False

    def span_failed(self, table: StreamTable, error: SinkError) -> None:
        """A transaction applied in chunks failed on `table`: nothing of it reached the sink (one
        sink transaction) and its spilled changes are gone, so the stream must replay it. After
        `attempts` such failures (at once for `SinkTableMissing`) with the sink working for other
        tables the table is failed first, so the replay goes on without it. Always raises."""
        name = table.source.name
        self.errors += 1
        if _is_transient(error):
            raise error
        self._first_failure.setdefault(name, time.monotonic())
        self._span_failures[name] = self._span_failures.get(name, 0) + 1
        definitive = isinstance(error, SinkTableMissing)
        if definitive or self._span_failures[name] >= self.attempts:
            if not definitive and self._last_success <= self._first_failure[name] and not self._alone(name):
                raise error  # no other table got through meanwhile: maybe the whole sink refuses writes
            self._span_failures.pop(name, None)
            self.fail(table, failure_reason(error))
        raise SinkUnavailable(  # transient (no cause: judged by itself): the stream replays from the slot
            f"a transaction applied in chunks failed on {name}; replaying it "
            f"{'without the table' if name in self.failed else 'to try again'}: {failure_reason(error)}"
        ) from None

    def _alone(self, name: TableName) -> bool:
        """No other table streams: none could show that the sink works."""
        return not (self.tables - {name} - self.failed.keys())

    def applied(self, name: TableName) -> None:
        """A change of the table reached the sink."""
        self._last_success = time.monotonic()
        self._first_failure.pop(name, None)
        if name in self.retrying:
            self.retrying.discard(name)
            self._persist(lambda: self.on_recovered(name))

    @staticmethod
    def _persist(write: Callable[[], Any]) -> None:
        try:
            write()
        except Exception as error:  # noqa: BLE001 - the state store may be down: the hold stands anyway
            _log.warning("could not record a table failure change in the state store: %s", error)


__all__ = ["TableIsolation", "failure_reason"]
