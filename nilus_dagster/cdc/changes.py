"""Decoded row changes → one ChangeSet per table, the net effect of whole transactions.

Changes are collapsed per key (last one wins, in WAL order); an update that changed the key
deletes the old key; an unchanged TOASTed value is taken from an earlier change of the same key
in the batch, else left to the sink (`_nilus_unchanged`); a truncate discards what came before it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa

from nilus_dagster.cdc.pgoutput import UNCHANGED_TOAST, TupleData
from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN, ChangeSet
from nilus_dagster.sources.postgres.text_codec import text_to_arrow

Values = dict[str, str | None]  # column → PostgreSQL text value (or None for NULL)


@dataclass
class _Upsert:
    values: Values
    unchanged: set[str]
    op: str
    lsn: int


@dataclass
class _Delete:
    key: tuple[str | None, ...]
    lsn: int


@dataclass
class TableChanges:
    """The collapsed state of one table's changes within a batch."""

    schema: TableSchema
    truncate: bool = False
    rows: dict[tuple[str | None, ...], _Upsert | _Delete] = field(default_factory=dict)
    events: int = 0

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The primary key, or every column for a table without one."""
        return self.schema.primary_key or tuple(self.schema.column_names)

    def _key(self, values: Values) -> tuple[str | None, ...]:
        return tuple(values.get(column) for column in self.key_columns)

    def insert(self, values: Values, unchanged: set[str], lsn: int, op: str = "I") -> None:
        self.events += 1
        key = self._key(values)
        previous = self.rows.get(key)
        if unchanged and isinstance(previous, _Upsert):
            carried = unchanged - previous.unchanged
            for column in carried:
                values[column] = previous.values.get(column)
            unchanged = unchanged & previous.unchanged
        self.rows[key] = _Upsert(values, unchanged, op, lsn)

    def update(self, new: Values, unchanged: set[str], old: Values | None, lsn: int) -> None:
        if old is not None:
            old_key = self._key(old)
            if old_key != self._key(new):
                previous = self.rows.get(old_key)
                self.rows[old_key] = _Delete(old_key, lsn)
                if unchanged and isinstance(previous, _Upsert):  # the key moved: carry the TOAST along
                    for column in unchanged - previous.unchanged:
                        new[column] = previous.values.get(column)
                    unchanged = unchanged & previous.unchanged
        self.insert(new, unchanged, lsn, op="U")

    def delete(self, old: Values, lsn: int) -> None:
        self.events += 1
        key = self._key(old)
        self.rows[key] = _Delete(key, lsn)

    def truncated(self) -> None:
        self.events += 1
        self.truncate = True
        self.rows.clear()

    def to_change_set(self) -> ChangeSet:
        upserts = [r for r in self.rows.values() if isinstance(r, _Upsert)]
        deletes = [r for r in self.rows.values() if isinstance(r, _Delete)]
        return ChangeSet(
            upserts=_upsert_table(self.schema, upserts),
            deletes=_delete_table(self.schema, self.key_columns, deletes),
            truncate=self.truncate,
        )


def _text_column(schema: TableSchema, name: str, texts: list[str | None]) -> pa.Array:
    column = schema.column(name)
    return text_to_arrow(pa.array(texts, type=pa.string()), column.type, column=f"{schema.table}.{name}")


def _upsert_table(schema: TableSchema, rows: list[_Upsert]) -> pa.Table:
    arrays = [_text_column(schema, c.name, [r.values.get(c.name) for r in rows]) for c in schema.columns]
    arrays.append(pa.array([r.lsn for r in rows], type=pa.int64()))
    arrays.append(pa.array([r.op for r in rows], type=pa.string()))
    arrays.append(pa.array([sorted(r.unchanged) if r.unchanged else None for r in rows], type=pa.list_(pa.string())))
    names = [*schema.column_names, LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN]
    return pa.Table.from_arrays(arrays, names=names)


def _delete_table(schema: TableSchema, key_columns: tuple[str, ...], rows: list[_Delete]) -> pa.Table:
    arrays = [_text_column(schema, name, [r.key[i] for r in rows]) for i, name in enumerate(key_columns)]
    arrays.append(pa.array([r.lsn for r in rows], type=pa.int64()))
    return pa.Table.from_arrays(arrays, names=[*key_columns, LSN_COLUMN])


def empty_change_set(schema: TableSchema) -> ChangeSet:
    return TableChanges(schema).to_change_set()


def tuple_values(column_names: Iterable[str], data: TupleData) -> tuple[Values, set[str]]:
    """A pgoutput tuple as text values by column name, and the columns left unchanged (TOAST)."""
    values: Values = {}
    unchanged: set[str] = set()
    for name, value in zip(column_names, data, strict=True):
        if value is UNCHANGED_TOAST:
            unchanged.add(name)
            values[name] = None
        elif isinstance(value, bytes):  # binary format is never requested; keep it honest anyway
            values[name] = value.decode()
        else:
            values[name] = value  # type: ignore[assignment]
    return values, unchanged
