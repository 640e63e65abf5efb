"""The changes of a table without a primary key, as a multiset: identical rows are distinct rows.

Under REPLICA IDENTITY FULL every update and delete carries the whole old row. An insert adds one
copy of its row, a delete (or the old side of an update) removes one copy. Within a batch the
changes are netted per identical row (a count, never a collapse), so the ChangeSet says exactly
how many copies of each row value to insert or remove.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from nilus_dagster.cdc.changes import DELETE, INSERT, Layout, Row, TableChanges, Values, _text_column, _text_row
from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import COUNT_COLUMN, LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN, ChangeSet


class UnmatchableChange(Exception):
    """A change of a key-less table that cannot be matched to a sink row (no whole old row)."""


class MultisetChanges:
    """The net effect of a batch on a key-less table: a count per distinct row value."""

    def __init__(self, schema: TableSchema, truncate: bool = False) -> None:
        self.truncate = truncate
        self.events = 0
        # row value (in the schema's column order) → [net count, last lsn, last op]
        self.counts: dict[Row, list[Any]] = {}
        self._canonical: dict[Layout, Callable[[Row], Row]] = {}
        self.schema = schema

    @property
    def schema(self) -> TableSchema:
        return self._schema

    @schema.setter
    def schema(self, schema: TableSchema) -> None:
        if self.counts and tuple(schema.column_names) != tuple(self._schema.column_names):
            # Rows counted under the old columns map onto the new ones by name (added → NULL).
            old, new = self._schema.column_names, schema.column_names
            remap = _remapper(tuple(old), tuple(new))
            merged: dict[Row, list[Any]] = {}
            for row, entry in self.counts.items():
                _add(merged, remap(row), entry[0], entry[1], entry[2])
            self.counts = merged
        self._schema = schema
        self._canonical.clear()

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(self._schema.column_names)

    def _canonical_of(self, layout: Layout) -> Callable[[Row], Row]:
        canonical = self._canonical.get(layout)
        if canonical is None:
            canonical = self._canonical[layout] = _remapper(layout, tuple(self._schema.column_names))
        return canonical

    # -- the by-name interface ------------------------------------------------------------------
    def insert(self, values: Values, unchanged: set[str], lsn: int, op: str = "I") -> None:
        self.events += 1
        self._require_whole(unchanged)
        _add(self.counts, self._canonical_of(tuple(values))(tuple(values.values())), 1, lsn, op)

    def update(self, new: Values, unchanged: set[str], old: Values | None, lsn: int) -> None:
        self.events += 1
        if old is None:
            raise UnmatchableChange(f"{self._schema.table}: an update without its old row cannot be matched")
        old_row = tuple(old.values())
        new_row = list(new.values())
        layout = tuple(new)
        for column in unchanged:  # REPLICA IDENTITY FULL: the old row holds the unchanged value
            new_row[layout.index(column)] = old.get(column)
        _add(self.counts, self._canonical_of(tuple(old))(old_row), -1, lsn, "D")
        _add(self.counts, self._canonical_of(layout)(tuple(new_row)), 1, lsn, "U")

    def delete(self, old: Values, lsn: int) -> None:
        self.events += 1
        _add(self.counts, self._canonical_of(tuple(old))(tuple(old.values())), -1, lsn, "D")

    def truncated(self) -> None:
        self.events += 1
        self.truncate = True
        self.counts.clear()

    # -- the positional interface (the stream) --------------------------------------------------
    def add_rows(self, names: Sequence[str], changes: Sequence[tuple[Any, ...]], lsn: int) -> None:
        """Fold pgoutput row changes of one relation in WAL order (see TableChanges.add_rows)."""
        layout = tuple(names)
        canonical = self._canonical_of(layout)
        counts = self.counts
        self.events += len(changes)
        for kind, _, new, old, key_only, special in changes:
            if kind == INSERT:
                row = _whole_row(new, layout, special, self._schema)
                _add(counts, canonical(row), 1, lsn, "I")
                continue
            if old is None or key_only:
                raise UnmatchableChange(
                    f"{self._schema.table} has no primary key and its change at this position carries no "
                    "whole old row: set REPLICA IDENTITY FULL on it (ALTER TABLE ... REPLICA IDENTITY FULL)"
                )
            old_row = _whole_row(old, layout, special, self._schema)
            _add(counts, canonical(old_row), -1, lsn, "D")
            if kind == DELETE:
                continue
            row, unchanged = _text_row(new, layout) if special else (new, None)
            if unchanged:  # the old row is whole: take the unchanged values from it
                values = list(row)
                for column in unchanged:
                    position = layout.index(column)
                    values[position] = old_row[position]
                row = tuple(values)
            _add(counts, canonical(row), 1, lsn, "U")

    def _require_whole(self, unchanged: set[str]) -> None:
        if unchanged:
            raise UnmatchableChange(f"{self._schema.table}: an insert cannot carry unchanged values")

    # -- output ---------------------------------------------------------------------------------
    def to_change_set(self) -> ChangeSet:
        inserts: list[tuple[Row, int, str]] = []
        deletes: list[tuple[Row, int, int]] = []
        for row, (count, lsn, op) in self.counts.items():
            if count > 0:
                inserts.extend([(row, lsn, op)] * count)
            elif count < 0:
                deletes.append((row, lsn, -count))
        return ChangeSet(upserts=self._upserts(inserts), deletes=self._deletes(deletes), truncate=self.truncate)

    def _value_columns(self, rows: Sequence[Row]) -> list[pa.Array]:
        names = self._schema.column_names
        columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
        return [_text_column(self._schema, name, list(texts)) for name, texts in zip(names, columns, strict=True)]

    def _upserts(self, inserts: list[tuple[Row, int, str]]) -> pa.Table:
        arrays = self._value_columns([row for row, _, _ in inserts])
        arrays.append(pa.array([lsn for _, lsn, _ in inserts], type=pa.int64()))
        arrays.append(pa.array([op for _, _, op in inserts], type=pa.string()))
        arrays.append(pa.nulls(len(inserts), type=pa.list_(pa.string())))
        names = [*self._schema.column_names, LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN]
        return pa.Table.from_arrays(arrays, names=names)

    def _deletes(self, deletes: list[tuple[Row, int, int]]) -> pa.Table:
        arrays = self._value_columns([row for row, _, _ in deletes])
        arrays.append(pa.array([lsn for _, lsn, _ in deletes], type=pa.int64()))
        arrays.append(pa.array([count for _, _, count in deletes], type=pa.int64()))
        return pa.Table.from_arrays(arrays, names=[*self._schema.column_names, LSN_COLUMN, COUNT_COLUMN])


def _add(counts: dict[Row, list[Any]], row: Row, delta: int, lsn: int, op: str) -> None:
    entry = counts.get(row)
    if entry is None:
        counts[row] = [delta, lsn, op]
        return
    entry[0] += delta
    entry[1] = lsn
    if delta > 0:
        entry[2] = op


def _remapper(layout: Layout, columns: tuple[str, ...]) -> Callable[[Row], Row]:
    """Rows in `layout` → rows in `columns` order (a column the layout lacks is NULL)."""
    if layout == columns:
        return lambda row: row
    positions = [layout.index(c) if c in layout else None for c in columns]
    return lambda row: tuple(row[p] if p is not None else None for p in positions)


def _whole_row(data: Any, layout: Layout, special: bool, schema: TableSchema) -> Row:
    """A tuple as text values; a key-less table's tuples must be whole (no unchanged values)."""
    if not special:
        return data
    row, unchanged = _text_row(data, layout)
    if unchanged:
        raise UnmatchableChange(
            f"{schema.table}: a row of a table without a primary key arrived with unchanged TOASTed values "
            f"({', '.join(sorted(unchanged))}) in its old or inserted image, so it cannot be matched"
        )
    return row


def new_table_changes(schema: TableSchema) -> TableChanges | MultisetChanges:
    """The collapsing state for one table: by key, or as a multiset when it has no key."""
    return TableChanges(schema) if schema.primary_key else MultisetChanges(schema)
