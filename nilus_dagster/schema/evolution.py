"""Schema drift between what a sink last saw and what the source has now."""

from __future__ import annotations

from dataclasses import dataclass, field

from nilus_dagster.schema.table import Column, ColumnType, TableSchema

_INT_WIDTH = {"int16": 1, "int32": 2, "int64": 3}
_FLOAT_WIDTH = {"float32": 1, "float64": 2}


def is_widening(old: ColumnType, new: ColumnType) -> bool:
    """True when every value of `old` is exactly representable in `new`."""
    if old == new:
        return True
    if old.kind in _INT_WIDTH and new.kind in _INT_WIDTH:
        return _INT_WIDTH[new.kind] >= _INT_WIDTH[old.kind]
    if old.kind in _FLOAT_WIDTH and new.kind in _FLOAT_WIDTH:
        return _FLOAT_WIDTH[new.kind] >= _FLOAT_WIDTH[old.kind]
    if old.kind == new.kind == "decimal" and None not in (old.precision, new.precision):
        assert old.precision is not None and new.precision is not None
        old_int, new_int = old.precision - (old.scale or 0), new.precision - (new.scale or 0)
        return new_int >= old_int and (new.scale or 0) >= (old.scale or 0)
    return False


@dataclass
class SchemaDiff:
    added: list[Column] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    widened: list[tuple[str, ColumnType, ColumnType]] = field(default_factory=list)
    retyped: list[tuple[str, ColumnType, ColumnType]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.added or self.dropped or self.widened or self.retyped)

    @property
    def evolvable(self) -> bool:
        """What `schema_changes: evolve` applies by itself: added columns, widened types, drops."""
        return not self.retyped

    def describe(self) -> str:
        parts = [f"+{c.name} {c.type.describe()}" for c in self.added]
        parts += [f"-{name}" for name in self.dropped]
        parts += [f"~{n} {a.describe()} -> {b.describe()}" for n, a, b in self.widened + self.retyped]
        return ", ".join(parts) or "no change"


def diff_schemas(old: TableSchema, new: TableSchema) -> SchemaDiff:
    old_columns = {c.name: c for c in old.columns}
    new_names = set(new.column_names)
    diff = SchemaDiff(dropped=[name for name in old.column_names if name not in new_names])
    for column in new.columns:
        previous = old_columns.get(column.name)
        if previous is None:
            diff.added.append(column)
        elif previous.type != column.type:
            bucket = diff.widened if is_widening(previous.type, column.type) else diff.retyped
            bucket.append((column.name, previous.type, column.type))
    return diff
