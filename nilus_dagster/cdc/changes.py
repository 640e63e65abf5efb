"""Decoded row changes → one ChangeSet per table, the net effect of whole transactions.

Changes are collapsed per key (last one wins, in WAL order); an update that changed the key
deletes the old key; an unchanged TOASTed value is taken from an earlier change of the same key
in the batch, else left to the sink (`_nilus_unchanged`): under an unchanged key the sink keeps
its value, under a changed key the sink copies it from its row at the old key (`ChangeSet.moved`);
a truncate discards what came before it.

This is the hot path of CDC. A row is kept as the positional tuple pgoutput sent (its text values
in the order of the Relation's columns, the row's *layout*), keyed by its key values (the value
itself for a one-column key, else a tuple); columns are only built, with `zip(*rows)`, when the
batch becomes a ChangeSet. TOAST handling runs only for tuples that carry an unchanged value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from typing import Any

import pyarrow as pa

from nilus_dagster.cdc.pgoutput import UNCHANGED_TOAST, TupleData
from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN, ChangeSet, old_key_column
from nilus_dagster.sources.postgres.text_codec import text_to_arrow

Values = dict[str, str | None]  # column → PostgreSQL text value (or None for NULL)
Layout = tuple[str, ...]  # the column names of a positional row, in order
Row = tuple[str | None, ...]

# Row change kinds, as pgoutput spells them (`decode_row_change` in pgoutput.py returns these).
INSERT, UPDATE, DELETE = b"I"[0], b"U"[0], b"D"[0]
# A collapsed entry: (op, lsn, values or key, unchanged columns or None, layout). op "D": a delete,
# whose third item is the key.
_DELETE_OP = "D"
Entry = tuple[str, int, Any, frozenset[str] | None, Layout]


def _key_getter(layout: Layout, key_columns: tuple[str, ...]) -> Callable[[Row], Any]:
    """Key values of a row in `layout`: the value for a one-column key, else a tuple (None for a
    key column the layout lacks)."""
    positions = [layout.index(c) if c in layout else None for c in key_columns]
    if None not in positions:
        if len(positions) == 1:
            return itemgetter(positions[0])  # type: ignore[arg-type]
        return itemgetter(*positions)  # type: ignore[arg-type]

    def key(row: Row) -> Any:
        values = tuple(row[p] if p is not None else None for p in positions)
        return values[0] if len(values) == 1 else values

    return key


class TableChanges:
    """The collapsed state of one table's changes within a batch."""

    def __init__(self, schema: TableSchema, truncate: bool = False) -> None:
        self.truncate = truncate
        self.rows: dict[Any, Entry] = {}
        # new key → the key whose sink row holds its unchanged TOASTed values (the key moved)
        self.moved: dict[Any, Any] = {}
        self.events = 0
        self._layouts: dict[Layout, Layout] = {}  # interned layouts
        self._key_getters: dict[Layout, Callable[[Row], Any]] = {}
        self.schema = schema

    @property
    def schema(self) -> TableSchema:
        return self._schema

    @schema.setter
    def schema(self, schema: TableSchema) -> None:
        """A new schema (evolution): rows map onto its columns by name."""
        self._schema = schema
        self._key_columns = schema.primary_key or tuple(schema.column_names)
        self._key_getters.clear()

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The primary key, or every column for a table without one."""
        return self._key_columns

    def _layout(self, names: Iterable[str]) -> Layout:
        layout = tuple(names)
        return self._layouts.setdefault(layout, layout)

    def _key_getter(self, layout: Layout) -> Callable[[Row], Any]:
        getter = self._key_getters.get(layout)
        if getter is None:
            getter = self._key_getters[layout] = _key_getter(layout, self._key_columns)
        return getter

    # -- the by-name interface ------------------------------------------------------------------
    def insert(self, values: Values, unchanged: set[str], lsn: int, op: str = "I") -> None:
        layout = self._layout(values)
        self.events += 1
        self._upsert(layout, tuple(values.values()), frozenset(unchanged) or None, lsn, op)

    def update(self, new: Values, unchanged: set[str], old: Values | None, lsn: int) -> None:
        layout = self._layout(new)
        old_layout = self._layout(old) if old is not None else layout
        old_row = tuple(old.values()) if old is not None else None
        self.events += 1
        self._update(layout, tuple(new.values()), frozenset(unchanged) or None, old_layout, old_row, lsn)

    def delete(self, old: Values, lsn: int) -> None:
        layout = self._layout(old)
        self.events += 1
        key = self._key_getter(layout)(tuple(old.values()))
        self.rows[key] = (_DELETE_OP, lsn, key, None, layout)

    def truncated(self) -> None:
        self.events += 1
        self.truncate = True
        self.rows.clear()
        self.moved.clear()

    # -- the positional interface (the stream) --------------------------------------------------
    def add_rows(self, names: Sequence[str], changes: Sequence[tuple[Any, ...]], lsn: int) -> None:
        """Fold pgoutput row changes of one relation, in WAL order: each is `(kind, relation_id,
        new, old, old_is_key_only, special)` with tuples in the column order `names`; `special`
        says a tuple holds unchanged-TOAST or binary values."""
        layout = self._layout(names)
        key_of = self._key_getter(layout)
        rows = self.rows
        self.events += len(changes)
        for kind, _, new, old, key_only, special in changes:
            if special:
                self._special_change(layout, kind, new, old, key_only, lsn)
            elif kind == INSERT:
                rows[key_of(new)] = ("I", lsn, new, None, layout)
            elif kind == UPDATE:
                if old is None:
                    rows[key_of(new)] = ("U", lsn, new, None, layout)
                else:
                    self._update(layout, new, None, layout, old, lsn)
            else:
                key = key_of(old)
                rows[key] = (_DELETE_OP, lsn, key, None, layout)

    def _special_change(
        self, layout: Layout, kind: int, new: TupleData | None, old: TupleData | None, key_only: bool, lsn: int
    ) -> None:
        """A change whose tuples hold unchanged-TOAST markers or binary values."""
        old_row = _text_row(old, layout)[0] if old is not None else None
        if kind == DELETE:
            key = self._key_getter(layout)(old_row)
            self.rows[key] = (_DELETE_OP, lsn, key, None, layout)
            return
        assert new is not None
        row, unchanged = _text_row(new, layout)
        if kind == INSERT:
            self._upsert(layout, row, unchanged, lsn, "I")
            return
        if old_row is not None and not key_only and unchanged:
            # REPLICA IDENTITY FULL sent the whole old row: take the unchanged values from it.
            values = list(row)
            for column in unchanged:
                position = layout.index(column)
                values[position] = old_row[position]
            row, unchanged = tuple(values), None
        self._update(layout, row, unchanged, layout, old_row, lsn)

    # -- collapsing -----------------------------------------------------------------------------
    def _update(
        self,
        layout: Layout,
        new: Row,
        unchanged: frozenset[str] | None,
        old_layout: Layout,
        old: Row | None,
        lsn: int,
    ) -> None:
        if old is not None:
            old_key = self._key_getter(old_layout)(old)
            new_key = self._key_getter(layout)(new)
            if old_key != new_key:
                previous = self.rows.get(old_key)
                self.rows[old_key] = (_DELETE_OP, lsn, old_key, None, old_layout)
                origin = self.moved.pop(old_key, old_key)
                if unchanged and previous is not None and previous[0] != _DELETE_OP:
                    new, unchanged = _carry(layout, new, unchanged, previous)  # the key moved: TOAST too
                if unchanged:  # still unknown in the batch: the sink's row at the origin holds them
                    self.rows.pop(new_key, None)  # the new key's earlier entry (a delete) is superseded
                    self.rows[new_key] = ("U", lsn, new, unchanged, layout)
                    self.moved[new_key] = origin
                    return
        self._upsert(layout, new, unchanged, lsn, "U")

    def _upsert(self, layout: Layout, row: Row, unchanged: frozenset[str] | None, lsn: int, op: str) -> None:
        key = self._key_getter(layout)(row)
        if unchanged:
            previous = self.rows.get(key)
            if previous is not None and previous[0] != _DELETE_OP:
                row, unchanged = _carry(layout, row, unchanged, previous)
        self.rows[key] = (op, lsn, row, unchanged, layout)

    # -- output ---------------------------------------------------------------------------------
    def column_array(self, name: str, values: Sequence[Any]) -> pa.Array:
        """The Arrow column of `values` (PostgreSQL text here; a source whose rows hold other values,
        e.g. decoded binlog values, overrides this)."""
        return _text_column(self.schema, name, values)

    def to_change_set(self) -> ChangeSet:
        entries = self.rows.values()
        upserts = [entry for entry in entries if entry[0] != _DELETE_OP]
        deletes = [entry for entry in entries if entry[0] == _DELETE_OP] if len(upserts) < len(entries) else []
        return ChangeSet(
            upserts=_upsert_table(self.schema, upserts, self.column_array),
            deletes=_delete_table(self._key_columns, deletes, self.column_array),
            truncate=self.truncate,
            moved=self._moved_table(),
        )

    def _moved_table(self) -> pa.Table | None:
        """Rows under a new key that still need unchanged TOASTed values from the sink's old row."""
        moved = []
        for new_key, origin in self.moved.items():
            entry = self.rows.get(new_key)
            if entry is not None and entry[0] != _DELETE_OP and entry[3]:
                moved.append((new_key, origin, entry[1], sorted(entry[3])))
        if not moved:
            return None
        keys = self._key_columns
        arrays, names = [], []
        for item, prefix in ((0, ""), (1, "old")):
            values = [m[item] for m in moved]
            per_column = [values] if len(keys) == 1 else [[v[i] for v in values] for i in range(len(keys))]
            for name, texts in zip(keys, per_column, strict=True):
                arrays.append(self.column_array(name, texts))
                names.append(old_key_column(name) if prefix else name)
        arrays.append(pa.array([m[2] for m in moved], type=pa.int64()))
        arrays.append(pa.array([m[3] for m in moved], type=pa.list_(pa.string())))
        return pa.Table.from_arrays(arrays, names=[*names, LSN_COLUMN, UNCHANGED_COLUMN])


def _carry(layout: Layout, row: Row, unchanged: frozenset[str], previous: Entry) -> tuple[Row, frozenset[str] | None]:
    """Take unchanged TOASTed values from an earlier upsert of the same key in the batch."""
    _, _, previous_row, previous_unchanged, previous_layout = previous
    previous_unchanged = previous_unchanged or frozenset()
    carried = unchanged - previous_unchanged
    if carried:
        values = list(row)
        for column in carried:
            if column in layout:
                values[layout.index(column)] = (
                    previous_row[previous_layout.index(column)] if column in previous_layout else None
                )
        row = tuple(values)
    return row, (unchanged & previous_unchanged) or None


def _text_row(data: TupleData, layout: Layout) -> tuple[Row, frozenset[str] | None]:
    """A tuple with unchanged-TOAST markers (→ None, and named) or binary values (→ text)."""
    values: list[str | None] = []
    unchanged: list[str] = []
    for name, value in zip(layout, data, strict=True):
        if value is UNCHANGED_TOAST:
            unchanged.append(name)
            values.append(None)
        elif isinstance(value, bytes):  # binary format is never requested; keep it honest anyway
            values.append(value.decode())
        else:
            values.append(value)  # type: ignore[arg-type]
    return tuple(values), frozenset(unchanged) or None


def _text_column(schema: TableSchema, name: str, texts: Sequence[str | None]) -> pa.Array:
    column = schema.column(name)
    return text_to_arrow(pa.array(texts, type=pa.string()), column.type, column=f"{schema.table}.{name}")


def _columns(names: Sequence[str], entries: list[Entry], item: int) -> list[Sequence[Any]]:
    """The values of `entries[i][item]` (positional rows) as one sequence per column of `names`."""
    if not entries:
        return [() for _ in names]
    names = tuple(names)
    first = entries[0][4]  # layouts are interned per TableChanges: compare by identity
    if first == names and all(entry[4] is first for entry in entries):
        rows = list(map(itemgetter(item), entries))
        return [list(map(itemgetter(i), rows)) for i in range(len(names))]
    columns: list[list[Any]] = [[] for _ in names]
    for entry in entries:
        layout, row = entry[4], entry[item]
        for column, name in zip(columns, names, strict=True):
            column.append(row[layout.index(name)] if name in layout else None)
    return columns  # type: ignore[return-value]


ColumnBuilder = Callable[[str, Sequence[Any]], pa.Array]


def _upsert_table(schema: TableSchema, rows: list[Entry], column: ColumnBuilder) -> pa.Table:
    names = schema.column_names
    arrays = [column(name, texts) for name, texts in zip(names, _columns(names, rows, 2), strict=True)]
    arrays.append(pa.array(list(map(itemgetter(1), rows)), type=pa.int64()))
    arrays.append(pa.array(list(map(itemgetter(0), rows)), type=pa.string()))
    unchanged_type = pa.list_(pa.string())
    if any(map(itemgetter(3), rows)):
        arrays.append(pa.array([sorted(r[3]) if r[3] else None for r in rows], type=unchanged_type))
    else:
        arrays.append(pa.nulls(len(rows), type=unchanged_type))
    return pa.Table.from_arrays(arrays, names=[*names, LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN])


def _delete_table(key_columns: tuple[str, ...], rows: list[Entry], column: ColumnBuilder) -> pa.Table:
    keys = list(map(itemgetter(2), rows))
    if len(key_columns) == 1:
        key_values: list[Sequence[Any]] = [keys]
    else:
        key_values = [list(map(itemgetter(i), keys)) for i in range(len(key_columns))]
    arrays = [column(name, values) for name, values in zip(key_columns, key_values, strict=True)]
    arrays.append(pa.array(list(map(itemgetter(1), rows)), type=pa.int64()))
    return pa.Table.from_arrays(arrays, names=[*key_columns, LSN_COLUMN])
