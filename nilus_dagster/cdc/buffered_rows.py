"""DDL inside an open source transaction: the rows buffered before it are rewritten to the layout
that follows it, so one layout is folded at the Commit."""

from __future__ import annotations

from collections.abc import Callable, MutableSequence
from typing import Any

from nilus_dagster.cdc.pgoutput import TupleData

RowRewrite = Callable[[TupleData | None], TupleData | None]


def rewrite_rows(
    transaction: MutableSequence[Any], relation_id: int, rewrite: RowRewrite, *, old_key_only: bool = True
) -> None:
    """Rewrite, in place (run_stream appends through a bound method), the new and old rows of the
    relation's buffered changes; a key-only old row is kept as it is unless `old_key_only` is False."""
    for i, change in enumerate(transaction):
        if change[1] == relation_id:
            kind, rid, new_row, old_row, key_only, special = change
            old = old_row if key_only and old_key_only else rewrite(old_row)
            transaction[i] = (kind, rid, rewrite(new_row), old, key_only, special)


def filling(names: tuple[str, ...], fill: dict[str, str | None]) -> RowRewrite:
    """Rows written before the DDL read the added columns' values (`fill`, by column name)."""
    positions = [(names.index(column), value) for column, value in fill.items() if column in names]

    def filled(data: TupleData | None) -> TupleData | None:
        if data is None:
            return None
        values = list(data)
        for position, value in positions:
            values[position] = value
        return tuple(values)

    return filled


def remapping(old: tuple[str, ...], new: tuple[str, ...]) -> RowRewrite:
    """Rows in the old column layout re-mapped by name: a dropped column goes, an added one is NULL."""
    position = {name: i for i, name in enumerate(old)}
    picks = [position.get(name) for name in new]

    def remap(data: TupleData | None) -> TupleData | None:
        return None if data is None else tuple(None if i is None else data[i] for i in picks)

    return remap
