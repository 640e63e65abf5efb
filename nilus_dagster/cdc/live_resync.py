"""Resync tables beside the stream: the pipeline's other tables keep streaming meanwhile.

How it stays exact. Between two polls the stream applies its batch (whole transactions) and holds
the tables to resync (`StreamTable.held`: their changes are dropped from then on, the open
transaction's included, and their checkpoints never advance; a dropped change committed before
the copy's snapshot is in the copy, a later one is re-delivered after the restart). A
worker thread runs `TableResync` (cdc/resync.py) through its own sink (`sink.fork()`): a
temporary slot's exported snapshot gives the consistent point C; the tables are emptied and
marked, read inside the snapshot and their checkpoints set to C. Meanwhile the pipeline's slot is
acknowledged no further than the held tables allow (`StreamTable.resync_limit`): not past the
position at the hold until the tables are marked (a crash there finds their sink copies whole up
to the hold, and the slot re-delivers what was dropped), not past C after that (a crash finds the
marker, and the next run resyncs them again). Once the copy is done the stream ends at the next
transaction boundary and restarts from the slot (confirmed_flush <= C): the resynced tables
apply exactly the transactions committing at or after C, the others skip, by their own
checkpoints, what they already applied. Schema (Relation) messages of a held table are not acted
on: the copy follows the schema at C, and the restarted stream judges later ones against it.

A sink without `fork()` (or whose `can_fork` is false: a BigQuery sink on an injected client)
resyncs with the stream ended: every table pauses meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from nilus_dagster.cdc.applier import ChangeApplier, StreamTable
from nilus_dagster.cdc.resync import TableResync
from nilus_dagster.cdc.run_config import CdcProgress
from nilus_dagster.cdc.setup import CdcTable
from nilus_dagster.cdc.snapshot import SnapshotCancelled, SnapshotProgress, SnapshotRunner
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, SinkTable

CANCEL_WAIT_S = 30.0  # how long a stopping run waits for a cancelled copy to give up


@dataclass
class LiveResync:
    """One resync running in a worker thread beside the stream."""

    names: list[TableName]
    ids: list[int]  # the requests it carries out
    sink: Sink  # the worker's own
    limit: int | None = None  # C, once every table is emptied and marked
    result: tuple[int, int, list[CdcTable]] | None = None
    error: BaseException | None = None
    progress: SnapshotProgress | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def hold(self, tables: dict[TableName, StreamTable]) -> None:
        """Keep the tables held in the stream's applier (cheap; repeated on every check)."""
        for name in self.names:
            table = tables.get(name)
            if table is not None:
                table.held = True
                table.resync_limit = table.applied_lsn if self.limit is None else self.limit

    def start(self, resync: TableResync, targets: dict[TableName, SinkTable], recorded: dict[str, TableSchema]) -> None:
        self.thread = threading.Thread(
            target=self._work, args=(resync, targets, recorded), daemon=True, name="nilus-resync"
        )
        self.thread.start()

    def _work(self, resync: TableResync, targets: dict[TableName, SinkTable], recorded: dict[str, TableSchema]) -> None:
        try:
            self.result = resync.run(targets, recorded, on_marked=self._marked)
        except BaseException as error:  # noqa: BLE001 - handed to the stream's thread, which raises it
            self.error = error
        finally:
            self.sink.close()

    def _marked(self, lsn: int) -> None:
        self.limit = lsn

    def runner(self, base: SnapshotRunner) -> SnapshotRunner:
        """The copy's snapshot runner: the worker's sink, stopped by `cancelled`, progress kept here."""

        def note(progress: SnapshotProgress) -> None:
            self.progress = progress

        return replace(base, sink=self.sink, should_stop=self.cancelled.is_set, on_progress=note)


class LiveResyncSteps:
    """The live-resync steps of a CDC run (a mixin of `CdcRun`, next to `ResyncSteps`)."""

    if TYPE_CHECKING:
        sink: Sink
        should_stop: Callable[[], bool]
        _live: LiveResync | None
        _resync_requested_nonblocking: Callable[[], bool]
        _plan_resync: Callable[[list[CdcTable], set[TableName]], tuple[list[TableName], list[int]] | None]
        _table_resync: Callable[[Sink, Callable[[int, str | None, str], SnapshotRunner]], TableResync]
        _snapshot_runner: Callable[[int, str | None, str], SnapshotRunner]
        _recorded_schemas: Callable[[], dict[str, TableSchema]]
        _resync_failed: Callable[[list[int], BaseException], None]
        _resync_done: Callable[[list[CdcTable], list[TableName], list[int], int, list[CdcTable]], None]
        _targets: Callable[[list[CdcTable]], list[tuple[CdcTable, SinkTable]]]
        _report: Callable[..., None]

    def _resync_tick(self, tables: list[CdcTable], applier: ChangeApplier) -> bool:
        """Checked by the stream between polls. Starts a requested resync beside the stream (unless
        a transaction is being applied in chunks); True ends the stream: a live resync is done (the
        stream restarts), or the sink cannot resync beside it."""
        live = self._live
        if live is not None:
            live.hold(applier.tables)
            return live.done
        if not self._resync_requested_nonblocking():
            return False
        if not callable(getattr(self.sink, "fork", None)) or not getattr(self.sink, "can_fork", True):
            return True
        if applier.applying_in_chunks:  # its sink transaction may already hold changes to the tables
            return False
        planned = self._plan_resync(tables, set())
        if planned is None:
            return False
        names, ids = planned
        live = self._live = LiveResync(names, ids, self.sink.fork())  # type: ignore[attr-defined]
        # The batch's changes to these tables land before they are emptied; the open transaction's
        # are dropped when it is folded (see the module docstring).
        applier._flush_pending()
        live.hold(applier.tables)
        resync = self._table_resync(live.sink, lambda *args: live.runner(self._snapshot_runner(*args)))
        live.start(resync, {t.name: target for t, target in self._targets(tables) if t.name in names},
                   self._recorded_schemas())
        self._report(CdcProgress("streaming", resync_tables=[n.qualified for n in names]), force=True)
        return False

    def _live_progress(self, progress: CdcProgress) -> None:
        """A streaming report names the tables being resynced beside it, and the copy's progress."""
        live = self._live
        if live is None or progress.phase != "streaming":
            return
        progress.resync_tables = [n.qualified for n in live.names]
        if live.progress is not None:
            progress.snapshot_rows = live.progress.rows_done
            progress.snapshot_partitions_done = live.progress.partitions_done
            progress.snapshot_partitions_total = live.progress.partitions_total

    def _finish_live(self, tables: list[CdcTable]) -> None:
        """After the stream ended: wait for the copy (cancelled if the run stops) and settle its
        requests; a failed copy raises. A cancelled one leaves its requests open for the next run."""
        live = self._live
        if live is None:
            return
        assert live.thread is not None
        while live.thread.is_alive() and not live.cancelled.is_set():
            if self.should_stop():
                live.cancelled.set()
            live.thread.join(timeout=0.2)
        live.thread.join(timeout=CANCEL_WAIT_S)
        self._live = None
        if live.thread.is_alive() or isinstance(live.error, SnapshotCancelled):
            self._resync_failed(live.ids, SnapshotCancelled("the run stopped during the resync"))
            return
        if live.error is not None:
            self._resync_failed(live.ids, live.error)
            raise live.error
        assert live.result is not None
        _rows, lsn, fresh = live.result
        self._resync_done(tables, live.names, live.ids, lsn, fresh)

    def _abandon_live(self) -> None:
        """The stream failed: stop the copy (its tables keep their marker, the requests stay open)."""
        live = self._live
        if live is None:
            return
        live.cancelled.set()
        assert live.thread is not None
        live.thread.join(timeout=CANCEL_WAIT_S)
        self._live = None
        if live.error is None or isinstance(live.error, SnapshotCancelled):
            self._resync_failed(live.ids, SnapshotCancelled("the stream failed during the resync"))
        else:
            self._resync_failed(live.ids, live.error)


__all__ = ["LiveResync", "LiveResyncSteps"]
