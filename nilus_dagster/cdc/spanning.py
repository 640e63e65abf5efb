"""A source transaction too big to buffer: folded while it streams, applied at its Commit.

pgoutput (protocol 1) sends a transaction only after it committed, so nothing received ever needs
undoing because of the source. Each chunk of `batch_max_rows` changes is folded by the batch
collapsing code, so the fold holds the transaction's net effect per key (per identical row for a
table without a key), exactly what buffering it whole would have given, and nothing of it has
touched the sink.

While that net effect is at most `MEMORY_PIECES` x `batch_max_rows` keys it stays in memory, and
at the Commit it simply becomes the next batch (the common case of a transaction just over the
bound costs no more than a batch). Past that it is spilled to a private on-disk store
(cdc/spill.py), each later chunk folding on top of it; at the Commit one sink transaction applies
the net effect piece by piece (each piece distinct keys, every change at the transaction's commit
LSN) and every touched table's checkpoint, and commits: all of it or none of it. A 5M-row
insert-then-update thus reaches the sink as 5M inserts, which keeps the sink's own transaction
small (DuckDB holds an open transaction's updates in memory). An error, a stop or a crash before
the Commit leaves the sink untouched; the store dies with the process, and the next run replays
the transaction from the slot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.multiset_changes import MultisetChanges, TableChanges, new_table_changes
from nilus_dagster.cdc.poison import PoisonHandler, change_set_of
from nilus_dagster.cdc.spill import SpillStore
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Checkpoint, ChunkedApplyUnsupported, Sink, SinkError

if TYPE_CHECKING:
    from nilus_dagster.cdc.applier import StreamTable


Changes = TableChanges | MultisetChanges


class SpannedTableFailed(SinkError):
    """One table's piece failed, so the whole sink transaction did: which table, and why."""

    def __init__(self, table: TableName, error: SinkError):
        super().__init__(str(error))
        self.table, self.error = table, error


class _TableHeld(Exception):
    """A piece had a row the sink cannot take and `on_error: pause_table` held its table."""

    def __init__(self, table: TableName):
        super().__init__(str(table))
        self.table = table


class TransactionAbandoned(Exception):
    """Thrown into the sink's change transaction to roll it back."""


# Keys of net effect a transaction keeps in memory, in multiples of batch_max_rows, before spilling
MEMORY_PIECES = 4


def _held_keys(changes: Changes) -> int:
    return len(changes.rows) + len(changes.moved) if isinstance(changes, TableChanges) else len(changes.counts)


@dataclass
class SpanningTransaction:
    """An open source transaction folded so far (`pending`, in memory, on top of what is spilled
    to `store` once it grew too big), and the tables it touched."""

    sink: Sink
    soft_delete: bool
    piece_rows: int
    on_poison: PoisonHandler | None = None
    store: SpillStore | None = None  # created at the first spill
    pending: dict[TableName, Changes] = field(default_factory=dict)  # the applier folds chunks into it
    touched: dict[TableName, StreamTable] = field(default_factory=dict)
    events: int = 0  # changes folded so far

    @classmethod
    def open(
        cls, sink: Sink, *, soft_delete: bool, piece_rows: int, on_poison: PoisonHandler | None = None
    ) -> SpanningTransaction:
        """Raises ChunkedApplyUnsupported (before anything is folded) if the sink cannot apply
        one transaction in several calls. (No trial transaction: opening one per big source
        transaction, e.g. a DuckDB connection, was a sixth of a catch-up's time.)"""
        if not callable(getattr(sink, "change_transaction", None)):
            raise ChunkedApplyUnsupported(f"{type(sink).__name__} has no change_transaction()")
        return cls(sink, soft_delete, piece_rows, on_poison)

    @property
    def spilled(self) -> bool:
        """Part of the transaction is on disk: its Commit applies it in pieces (`commit`)."""
        return self.store is not None

    def changes_for(self, table: StreamTable) -> Changes:
        """Collapsing state for `table` in `pending`, on top of what is spilled."""
        self.touched.setdefault(table.source.name, table)
        if self.store is None:
            return new_table_changes(table.schema)
        return self.store.store(table.source.name, table.schema).changes(table.schema)

    def chunk_folded(self) -> None:
        """A chunk was folded into `pending`: spill it once it holds too many keys."""
        if sum(map(_held_keys, self.pending.values())) > MEMORY_PIECES * self.piece_rows:
            self.spill()

    def spill(self) -> None:
        """Move `pending` into the on-disk store (created now if need be)."""
        if self.store is None:
            self.store = SpillStore()
        for name, changes in self.pending.items():
            self.store.store(name, changes.schema).write(changes)  # type: ignore[arg-type]
        self.pending.clear()

    def schema_changed(self, table: StreamTable, fill: dict[str, str | None]) -> None:
        """The table's schema evolved inside the transaction (`fill`: added columns' values for
        rows written before the change): what was folded before reads them (the store fills it)."""
        if table.source.name in self.pending and fill:
            self.spill()
        store = self.store.tables.get(table.source.name) if self.store is not None else None
        if store is not None:
            store.schema_changed(table.schema, fill)

    def discard(self, name: TableName) -> None:
        """The table is held from here on: none of this transaction may reach it."""
        self.touched.pop(name, None)
        self.pending.pop(name, None)
        if self.store is not None:
            self.store.discard(name)

    def commit(self, end_lsn: int, keepalive: Callable[[], Any] | None = None) -> None:
        """Apply the spilled net effect (all of it: call `spill` first) and every touched table's
        checkpoint in one sink transaction; `keepalive` is called after each piece (the
        replication connection must answer the server within wal_sender_timeout)."""
        store = self.store
        assert store is not None and not self.pending
        value = format_lsn(end_lsn)
        try:
            while True:
                try:
                    with self.sink.change_transaction():
                        for name, table in self.touched.items():
                            pieces = store.tables[name].pieces(table.schema, self.piece_rows)
                            self._apply_pieces(table, pieces, Checkpoint(table.checkpoint_key, value), keepalive)
                    break
                except _TableHeld as held:  # rolled back: all again without the held table
                    self.discard(held.table)
        finally:
            store.close()
        for table in self.touched.values():
            table.applied_lsn = end_lsn

    def _apply_pieces(
        self,
        table: StreamTable,
        pieces: Iterable[Changes],
        checkpoint: Checkpoint,
        keepalive: Callable[[], Any] | None,
    ) -> None:
        """One table's pieces, its checkpoint with one of them (one call fewer; the whole block is
        one sink transaction). With the first piece, so that a sink table dropped meanwhile is
        refused there, never recreated by a piece (SinkTableMissing); with the last where the sink
        needs it there (`checkpoint_with_last_piece`: BigQuery merges a shadow at the checkpoint)."""
        last = getattr(self.sink, "checkpoint_with_last_piece", False)
        pending: Checkpoint | None = checkpoint
        previous: Changes | None = None
        for piece in pieces:
            if last:
                if previous is not None:
                    self._apply(table, previous, None)
                previous = piece
            else:
                self._apply(table, piece, pending)
                pending = None
            if keepalive is not None:
                keepalive()
        if last:
            self._apply(table, previous if previous is not None else new_table_changes(table.schema), checkpoint)
        elif pending is not None:
            self._apply(table, new_table_changes(table.schema), pending)

    def rollback(self) -> None:
        """Nothing reached the sink: forget the folded changes."""
        self.pending.clear()
        if self.store is not None:
            self.store.close()

    def _apply(self, table: StreamTable, changes: Changes, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None and changes.events == 0 and not changes.truncate:
            return
        # A table can be held (on_error: pause_table) where the rollback undoes every piece: not on a
        # sink whose checkpoint piece already reaches the target (BigQuery's shadow merge).
        cannot_hold = getattr(self.sink, "checkpoint_with_last_piece", False)
        change_set = change_set_of(table, changes, self.on_poison, spanning=cannot_hold)
        if change_set is None:
            raise _TableHeld(table.source.name)
        try:
            self.sink.apply_changes(table.target, changes.schema, change_set, checkpoint, soft_delete=self.soft_delete)
        except SpannedTableFailed:
            raise
        except SinkError as error:
            raise SpannedTableFailed(table.source.name, error) from error
