"""Binlog transactions → the shared change collapsing (cdc/changes.py) → `Sink.apply_changes`.

As for PostgreSQL, each table's checkpoint (here the binlog position after the last transaction
applied to it) is committed in the same sink transaction as its changes, and a transaction that
ends at or before a table's checkpoint is skipped for that table: a replay after a crash applies
nothing twice. A batch holds whole transactions only.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from nilus_dagster.cdc.changes import DELETE, INSERT, UPDATE, TableChanges
from nilus_dagster.cdc.mysql.binlog import RowChange, Transaction
from nilus_dagster.cdc.mysql.position import BinlogPosition
from nilus_dagster.cdc.mysql.values import RowConverter
from nilus_dagster.cdc.stream_stats import StreamStats
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Checkpoint, Sink, SinkTable

_KINDS = {"I": INSERT, "U": UPDATE, "D": DELETE}


class TypedTableChanges(TableChanges):
    """TableChanges whose rows hold decoded values (RowConverter), not PostgreSQL text."""

    def __init__(self, schema: TableSchema, converter: RowConverter) -> None:
        self._converter = converter
        super().__init__(schema)

    def column_array(self, name: str, values: Any) -> Any:
        return self._converter.column(name, values)


@dataclass
class BinlogTable:
    name: TableName
    target: SinkTable
    schema: TableSchema  # as the sink carries it
    checkpoint_key: str
    applied: BinlogPosition | None  # the position its sink copy is current to
    converter: RowConverter

    def skips(self, end: BinlogPosition) -> bool:
        return self.applied is not None and end.ordinal <= self.applied.ordinal


class BinlogApplier:
    def __init__(
        self,
        tables: dict[TableName, BinlogTable],
        sink: Sink,
        *,
        soft_delete: bool,
        batch_max_rows: int,
        batch_max_ms: int,
        stats: StreamStats,
    ) -> None:
        self.tables, self.sink, self.soft_delete = tables, sink, soft_delete
        self.batch_max_rows, self.batch_max_ms, self.stats = batch_max_rows, batch_max_ms, stats
        self._batch: dict[TableName, TypedTableChanges] = {}
        self._kinds: dict[str, Counter[str]] = {}
        self._events = 0
        self._started: float | None = None
        self.end: BinlogPosition | None = None  # end of the last transaction added to the batch
        self.durable: BinlogPosition | None = None  # end of the last transaction made durable

    def add(self, transaction: Transaction) -> None:
        end, ordinal = transaction.end, transaction.end.ordinal
        for table_name, group in groupby(transaction.changes, key=lambda c: c.table):
            table = self.tables[table_name]
            if not table.skips(end):
                self._fold(table, list(group), ordinal)
        for table_name in transaction.truncated:
            table = self.tables[table_name]
            if not table.skips(end):
                self._changes(table).truncated()
                self._kinds.setdefault(table_name.qualified, Counter()).update("T")
                self._events += 1
        if self._started is None:
            self._started = time.monotonic()
        self.end = end
        self.stats.transactions += 1
        self.stats.last_commit_time = transaction.commit_time

    def _changes(self, table: BinlogTable) -> TypedTableChanges:
        changes = self._batch.get(table.name)
        if changes is None:
            changes = self._batch[table.name] = TypedTableChanges(table.schema, table.converter)
        return changes

    def _fold(self, table: BinlogTable, changes: list[RowChange], ordinal: int) -> None:
        convert = table.converter.row
        rows = [
            (
                _KINDS[c.kind],
                0,
                None if c.new is None else convert(c.new, c.new_none),
                None if c.old is None else convert(c.old, c.old_none),
                False,
                False,
            )
            for c in changes
        ]
        self._changes(table).add_rows(table.converter.names, rows, ordinal)
        self._kinds.setdefault(table.name.qualified, Counter()).update(c.kind for c in changes)
        self._events += len(rows)

    def ready(self) -> bool:
        if self.end is None or self._started is None:
            return False
        return self._events >= self.batch_max_rows or (time.monotonic() - self._started) * 1000 >= self.batch_max_ms

    def flush(self, *, all_tables: bool = False) -> None:
        """Apply the batch, each table's changes with its checkpoint in one sink transaction;
        `all_tables`: also move the checkpoints of tables the batch did not change (so a restart
        does not read the binlog again from an idle table's old position)."""
        end = self.end if self.end is not None else self.durable if all_tables else None
        if end is None:
            return
        for table in self.tables.values():
            changes = self._batch.get(table.name)
            if changes is None and (not all_tables or table.skips(end)):
                continue
            change_set = (changes or TypedTableChanges(table.schema, table.converter)).to_change_set()
            checkpoint = Checkpoint(table.checkpoint_key, end.text())
            self.sink.apply_changes(table.target, table.schema, change_set, checkpoint, soft_delete=self.soft_delete)
            table.applied = end
        self.stats.events_total += self._events
        self.stats.batches += 1
        self.stats.applied_lsn = end.ordinal
        self.stats.count(self._kinds)
        self.durable, self.end = end, None
        self._batch, self._kinds, self._events, self._started = {}, {}, 0, None
