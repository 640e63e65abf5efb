"""Poison rows: changes with a value the sink's column type cannot take (e.g. numeric NaN into a
DECIMAL, `infinity` into a timestamp).

A batch is decoded column by column, vectorized (cdc/changes.py). Only when that raises
`ValueDecodeError` are the table's rows looked at one by one, and only in the columns that failed:
`find_poison` names each row (its key, commit LSN, text values) and why; `drop_poison` takes them
out of the batch, so the others can be applied. The decode is the same one the batch uses, so
whatever it accepts for a sink (e.g. NaN where the sink can hold it) is never poison.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nilus_dagster.cdc.changes import TableChanges, _text_column
from nilus_dagster.cdc.multiset_changes import MultisetChanges
from nilus_dagster.schema.table import ColumnType
from nilus_dagster.sinks.base import ChangeSet
from nilus_dagster.sources.postgres.text_codec import ValueDecodeError

Changes = TableChanges | MultisetChanges
_NOT_FINITE = {"nan", "infinity", "-infinity", "+infinity", "inf", "-inf"}


class PoisonRowRefused(ValueDecodeError):
    """A row the sink cannot take, refused by `on_error: fail` (or where a hold is impossible)."""


@dataclass(frozen=True)
class PoisonRow:
    """A change of one row the sink cannot take, and the first value that makes it so."""

    entry: Any  # its key in TableChanges.rows (or its row in MultisetChanges.counts)
    op: str  # I, U, D
    commit_lsn: int
    key: list[str | None]  # the key values (a key-less table: the whole row), as text
    row: dict[str, str | None]  # the values it carries, as text (a delete: its key)
    column: str
    value: str | None
    error_kind: str
    message: str

    @property
    def key_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key).encode()).hexdigest()[:32]


def find_poison(changes: Changes) -> list[PoisonRow]:
    """The rows of the batch whose values do not decode (each once, named by its first bad value)."""
    candidates = list(_candidates(changes))
    schema = changes.schema
    found: dict[int, PoisonRow] = {}
    for column in schema.columns:
        texts = [row.get(column.name) for _, _, _, _, row in candidates]
        try:
            _text_column(schema, column.name, texts)
            continue
        except ValueDecodeError:
            pass
        for index, text in enumerate(texts):  # the failing column only: value by value
            if index in found:
                continue
            try:
                _text_column(schema, column.name, [text])
            except ValueDecodeError as error:
                entry, op, lsn, key, row = candidates[index]
                found[index] = PoisonRow(entry, op, lsn, key, row, column.name, text,
                                         error_kind(column.type, text), str(error))
    return [found[index] for index in sorted(found)]


def drop_poison(changes: Changes, poison: list[PoisonRow]) -> None:
    """Take the poison rows out of the batch (the rest is applied as if they never came)."""
    for row in poison:
        if isinstance(changes, TableChanges):
            changes.rows.pop(row.entry, None)
            changes.moved.pop(row.entry, None)
        else:
            changes.counts.pop(row.entry, None)


def error_kind(column_type: ColumnType, value: str | None) -> str:
    """A short class of the refusal, for filtering the dead-letter queue."""
    text = (value or "").strip().lower()
    if text in _NOT_FINITE:
        return "not_finite"
    if column_type.kind == "list":
        return "array_value"
    return f"{column_type.kind}_out_of_range" if column_type.kind in ("decimal", "date", "timestamp",
                                                                      "timestamptz", "time") else "unrepresentable"


def _candidates(changes: Changes) -> Any:
    """(entry, op, commit lsn, key texts, {column: text}) for every row change in the batch."""
    names = changes.schema.column_names
    if isinstance(changes, TableChanges):
        key_columns = changes.key_columns
        for entry, (op, lsn, row, _unchanged, layout) in changes.rows.items():
            if op == "D":
                key = list(row) if len(key_columns) > 1 else [row]
                yield entry, op, lsn, key, dict(zip(key_columns, key, strict=True))
                continue
            values = dict(zip(layout, row, strict=True))
            yield entry, op, lsn, [values.get(c) for c in key_columns], {n: values.get(n) for n in names}
        return
    for row, (count, lsn, op) in changes.counts.items():
        if count:
            yield row, ("D" if count < 0 else op), lsn, list(row), dict(zip(names, row, strict=True))


# Called with (stream table, its batch, the decode error, inside a spilled transaction a hold cannot
# undo?): returns
# the batch's ChangeSet without its poison rows, or None to apply nothing to the table (held).
PoisonHandler = Callable[[Any, Changes, ValueDecodeError, bool], "ChangeSet | None"]


def change_set_of(
    table: Any, changes: Changes, on_poison: PoisonHandler | None, *, spanning: bool = False
) -> ChangeSet | None:
    """The batch's ChangeSet; a value that does not decode goes to `on_poison` (without: raised)."""
    try:
        return changes.to_change_set()
    except ValueDecodeError as error:
        if on_poison is None:
            raise
        return on_poison(table, changes, error, spanning)
