"""A source transaction too big to buffer: spilled to disk while it streams, applied at its Commit
in pieces inside ONE sink transaction.

pgoutput (protocol 1) sends a transaction only after it committed, so nothing received ever needs
undoing because of the source. Each chunk of `batch_max_rows` changes is folded by the batch
collapsing code on top of what earlier chunks left in a private on-disk store (cdc/spill.py), so
at the Commit the store holds the transaction's net effect per key (per identical row for a table
without a key), exactly what buffering it whole would have given, and nothing of it has touched
the sink. Then one sink transaction applies that net effect piece by piece (each piece distinct
keys, every change at the transaction's commit LSN) and every touched table's checkpoint, and
commits: all of it or none of it. A 5M-row insert-then-update thus reaches the sink as 5M
inserts, which keeps the sink's own transaction small (DuckDB holds an open transaction's
updates in memory). An error, a stop or a crash before the Commit leaves the sink untouched; the
store dies with the process, and the next run replays the transaction from the slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.multiset_changes import MultisetChanges, TableChanges, new_table_changes
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


class TransactionAbandoned(Exception):
    """Thrown into the sink's change transaction to roll it back."""


@dataclass
class SpanningTransaction:
    """An open source transaction spilled so far, and the tables it touched."""

    sink: Sink
    soft_delete: bool
    piece_rows: int
    store: SpillStore = field(default_factory=SpillStore)
    touched: dict[TableName, StreamTable] = field(default_factory=dict)
    events: int = 0
    chunks: int = 0

    @classmethod
    def open(cls, sink: Sink, *, soft_delete: bool, piece_rows: int) -> SpanningTransaction:
        """Raises ChunkedApplyUnsupported (before anything is spilled) if the sink cannot apply
        one transaction in several calls. (No trial transaction: opening one per big source
        transaction, e.g. a DuckDB connection, was a sixth of a catch-up's time.)"""
        if not callable(getattr(sink, "change_transaction", None)):
            raise ChunkedApplyUnsupported(f"{type(sink).__name__} has no change_transaction()")
        return cls(sink, soft_delete, piece_rows)

    def changes_for(self, table: StreamTable) -> Changes:
        """Collapsing state for the next chunk of `table`, on top of what is spilled."""
        self.touched.setdefault(table.source.name, table)
        return self.store.store(table.source.name, table.schema).changes(table.schema)

    def spill_chunk(self, chunk: dict[TableName, Changes]) -> None:
        self.chunks += 1
        for name, changes in chunk.items():
            self.events += changes.events
            self.store.tables[name].write(changes)  # type: ignore[arg-type]

    def schema_changed(self, table: StreamTable, fill: dict[str, str | None]) -> None:
        """The table's schema evolved inside the transaction (`fill`: added columns' values for
        rows written before the change)."""
        store = self.store.tables.get(table.source.name)
        if store is not None:
            store.schema_changed(table.schema, fill)

    def discard(self, name: TableName) -> None:
        """The table is held from here on: none of this transaction may reach it."""
        self.touched.pop(name, None)
        self.store.discard(name)

    def commit(self, end_lsn: int, keepalive: Callable[[], Any] | None = None) -> None:
        """Apply the spilled net effect and every touched table's checkpoint in one sink
        transaction; `keepalive` is called after each piece (the replication connection must
        answer the server within wal_sender_timeout)."""
        value = format_lsn(end_lsn)
        try:
            with self.sink.change_transaction():
                for name, table in self.touched.items():
                    # The checkpoint goes with the table's first piece (one call fewer; the whole
                    # block is one transaction): a sink table dropped meanwhile is refused there,
                    # never recreated by a piece (see SinkTableMissing).
                    checkpoint: Checkpoint | None = Checkpoint(table.checkpoint_key, value)
                    for piece in self.store.tables[name].pieces(table.schema, self.piece_rows):
                        self._apply(table, piece, checkpoint)
                        checkpoint = None
                        if keepalive is not None:
                            keepalive()
                    if checkpoint is not None:
                        self._apply(table, new_table_changes(table.schema), checkpoint)
        finally:
            self.store.close()
        for table in self.touched.values():
            table.applied_lsn = end_lsn

    def rollback(self) -> None:
        """Nothing reached the sink: forget the spilled changes."""
        self.store.close()

    def _apply(self, table: StreamTable, changes: Changes, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None and changes.events == 0 and not changes.truncate:
            return
        change_set = changes.to_change_set()
        try:
            self.sink.apply_changes(table.target, changes.schema, change_set, checkpoint, soft_delete=self.soft_delete)
        except SpannedTableFailed:
            raise
        except SinkError as error:
            raise SpannedTableFailed(table.source.name, error) from error
