"""A source transaction too big to buffer whole, applied chunk by chunk inside ONE sink transaction.

pgoutput (protocol 1) sends a transaction only after it committed, spilled to disk on the server
(`logical_decoding_work_mem`) while it was being decoded, so nothing received ever needs undoing
because of the source. The engine folds each chunk of the transaction's changes per key (cdc/
changes.py) and applies it before the next one, in WAL order: the sink ends where applying the
whole transaction at once would have left it (every change carries the transaction's commit LSN,
which the sinks' LSN guard lets through again). The last chunk carries the checkpoint of every
table the transaction touched, then the sink transaction commits: all of it or none of it. An
error, a stop request or a crash before that rolls it back, and the next run replays the
transaction from the slot, which was never acknowledged past it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.multiset_changes import MultisetChanges, TableChanges, new_table_changes
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Checkpoint, Sink
from nilus_dagster.sources.postgres.text_codec import text_to_arrow

if TYPE_CHECKING:
    from nilus_dagster.cdc.applier import StreamTable


Changes = TableChanges | MultisetChanges


class TransactionAbandoned(Exception):
    """Thrown into the sink's change transaction to roll it back."""


@dataclass
class SpanningTransaction:
    """An open sink change transaction and what it has applied so far."""

    sink: Sink
    soft_delete: bool
    scope: AbstractContextManager[None]
    touched: dict[TableName, StreamTable] = field(default_factory=dict)
    events: int = 0
    chunks: int = 0

    @classmethod
    def open(cls, sink: Sink, *, soft_delete: bool) -> SpanningTransaction:
        """Begin the sink transaction; raises ChunkedApplyUnsupported if the sink cannot."""
        scope = sink.change_transaction()
        scope.__enter__()
        return cls(sink, soft_delete, scope)

    def apply_chunk(self, tables: dict[TableName, StreamTable], chunk: dict[TableName, Changes]) -> None:
        """Apply one chunk (no checkpoint: the transaction has not ended)."""
        self.chunks += 1
        for name, changes in chunk.items():
            self._apply(tables[name], changes, None)

    def commit(self, tables: dict[TableName, StreamTable], last: dict[TableName, Changes], end_lsn: int) -> None:
        """Apply the last chunk with every touched table's checkpoint, then commit."""
        try:
            for name in last:
                self.touched.setdefault(name, tables[name])
            value = format_lsn(end_lsn)
            for name, table in self.touched.items():
                changes = last.get(name) or new_table_changes(table.schema)
                self._apply(table, changes, Checkpoint(table.checkpoint_key, value))
        except BaseException:
            self.rollback()
            raise
        self.scope.__exit__(None, None, None)
        for table in self.touched.values():
            table.applied_lsn = end_lsn

    def fill_applied_rows(self, table: StreamTable, fill: dict[str, str | None], commit_lsn: int) -> None:
        """ADD COLUMN ... DEFAULT inside the transaction: the rows its chunks already wrote precede
        the DDL, so they read the default too (the evolve filled only rows older than the
        transaction; these carry its commit LSN)."""
        for name, text in fill.items():
            column = table.schema.column(name)
            value = text_to_arrow(pa.array([text], pa.string()), column.type, column=f"{table.source.name}.{name}")
            self.sink.fill_column(table.target, column, value, before_lsn=commit_lsn + 1)  # type: ignore[attr-defined]

    def rollback(self) -> None:
        error = TransactionAbandoned("the source transaction did not reach its commit in this run")
        self.scope.__exit__(TransactionAbandoned, error, None)

    def _apply(self, table: StreamTable, changes: Changes, checkpoint: Checkpoint | None) -> None:
        self.touched.setdefault(table.source.name, table)
        if checkpoint is None and changes.events == 0 and not changes.truncate:
            return
        self.events += changes.events
        self.sink.apply_changes(
            table.target, changes.schema, changes.to_change_set(), checkpoint, soft_delete=self.soft_delete
        )
