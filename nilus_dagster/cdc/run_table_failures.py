"""The per-table isolation steps of a CDC run (a mixin of `CdcRun`; the policy itself is in
cdc/table_failures.py): hold the pipeline's failed tables in every stream, never recreate a
dropped sink table, pick up retries asked by an operator, and report the failed tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nilus_dagster.cdc.state_writer import BackgroundRead
from nilus_dagster.cdc.table_failures import TableIsolation
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkError, SinkTable, SinkTableMissing

if TYPE_CHECKING:
    from nilus_dagster.cdc.applier import StreamTable
    from nilus_dagster.cdc.run_config import CdcPipelineConfig, CdcProgress
    from nilus_dagster.state.store import StateStore


class TableFailureSteps:
    """Needs `config`, `store`, `sink`, `run_id` and `heartbeat_interval_s`."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        store: StateStore
        sink: Sink
        run_id: str
        heartbeat_interval_s: float
        _attempt_started: float

    def _init_table_failures(self) -> None:
        key = self.config.key
        self._isolation = TableIsolation(
            on_failed=lambda name, reason, checkpoint: self.store.record_table_failure(
                key, name.qualified, reason, checkpoint, self.run_id
            ),
            on_recovered=lambda name: self.store.clear_table_failures(key, [name.qualified]),
        )
        self._retry_reader: BackgroundRead | None = None
        self._retry_due = False
        self._sink_faults = 0  # stream attempts ended by a sink error

    def _close_table_failures(self) -> None:
        if self._retry_reader is not None:
            self._retry_reader.close()

    def _load_table_failures(self, names: set[TableName]) -> None:
        """Before a stream: the pipeline's failed tables are held; those an operator asked to
        retry are released (status `retrying` until a change of theirs reaches the sink)."""
        key = self.config.key
        self._isolation.tables = set(names)
        by_name = {n.qualified: n for n in names}
        retry: list[str] = []
        for failure in self.store.table_failures(key.tenant, key.pipeline):
            name = by_name.get(failure.table_name)
            if name is None:
                continue
            if failure.status == "retry":
                retry.append(failure.table_name)
                self._isolation.failed.setdefault(name, failure.reason)
                self._isolation.release({name})
            elif failure.status == "retrying":
                self._isolation.retrying.add(name)
            else:
                self._isolation.failed.setdefault(name, failure.reason)
        if retry:
            self.store.mark_table_retrying(key, retry)
        self._retry_due = False

    def _sink_table_usable(self, table: StreamTable, target: SinkTable, checkpoint: str | None) -> bool:
        """False when the table is held failed, or its sink table is gone although it has a
        checkpoint (then it is failed now: recreating it would hold only the newer changes)."""
        if table.source.name in self._isolation.failed:
            return False
        exists = getattr(self.sink, "table_exists", None)
        if checkpoint is None or not callable(exists) or exists(target):
            return True
        self._isolation.fail(table, str(SinkTableMissing(self.sink.name, target.qualified, checkpoint)))
        return False

    def _table_retry_requested(self, tables: dict[TableName, StreamTable]) -> bool:
        """Checked between polls: an operator asked to retry a table this stream holds failed
        (read in the background every heartbeat). True ends the stream: it restarts from the slot."""
        if self._retry_due:
            return True
        if not any(t.failed for t in tables.values()):
            return False
        if self._retry_reader is None:
            key = self.config.key
            self._retry_reader = BackgroundRead(
                lambda: {f.table_name for f in self.store.table_failures(key.tenant, key.pipeline)
                         if f.status == "retry"},
                self.heartbeat_interval_s,
            )
        asked = self._retry_reader.value_since(self._attempt_started) or set()
        self._retry_due = any(t.failed and name.qualified in asked for name, t in tables.items())
        return self._retry_due

    def _tables_resynced(self, names: list[TableName]) -> None:
        """A resync starts the tables over from their new checkpoints: no longer failed."""
        self._isolation.forget(set(names))
        self.store.clear_table_failures(self.config.key, [n.qualified for n in names])

    def _counting_sink_faults(self, attempt: Callable[[], None]) -> Callable[[], None]:
        """`attempt`, counting the stream attempts a sink error ended (see `sink_errors_total`)."""

        def counted() -> None:
            try:
                attempt()
            except Exception as error:
                if _from_sink(error):
                    self._sink_faults += 1
                raise

        return counted

    def _failure_progress(self, progress: CdcProgress) -> None:
        waited_out = getattr(self.sink, "lock_waits", 0) + getattr(self.sink, "transient_errors", 0)
        progress.sink_errors_total = self._isolation.errors + self._sink_faults + waited_out
        if self._isolation.failed:
            progress.failed_tables = {n.qualified: reason for n, reason in self._isolation.failed.items()}


def _from_sink(error: BaseException) -> bool:
    seen: BaseException | None = error
    for _ in range(20):  # a chain is short; never loop on a cyclic one
        if seen is None:
            return False
        if isinstance(seen, SinkError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


__all__ = ["TableFailureSteps"]
