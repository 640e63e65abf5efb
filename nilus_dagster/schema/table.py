"""Logical column types and table schemas shared by every source and sink.

A sink never sees a PostgreSQL type name: it maps these logical types to its own DDL. That keeps
type decisions (precision, time zones, arrays) in one place and lets a sink reject what it cannot
hold by naming the column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

TypeKind = Literal[
    "bool",
    "int16",
    "int32",
    "int64",
    "float32",
    "float64",
    "decimal",
    "text",
    "json",
    "uuid",
    "bytes",
    "date",
    "time",
    "timestamp",
    "timestamptz",
    "interval",
    "list",
]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

# Unconstrained NUMERIC has no declared precision; it lands as DECIMAL(38, 9) and a value that does
# not fit fails the load naming the column (never a silent rounding).
UNCONSTRAINED_DECIMAL = (38, 9)


@dataclass(frozen=True)
class SinkLimits:
    """Values a sink refuses although their logical type holds them (checked, vectorized, when
    text values are decoded for it: a row with one is a poison row, see cdc/poison.py)."""

    sink: str  # named in the refusal
    max_year: int | None = None  # dates and timestamps (timestamptz: in UTC)
    null_elements: bool = True  # a list may hold NULL elements


@dataclass(frozen=True)
class ColumnType:
    """A logical type. `precision`/`scale` for decimals, `element` for lists."""

    kind: TypeKind
    precision: int | None = None
    scale: int | None = None
    element: ColumnType | None = None
    # How the values travel, not what they are: a decimal carried as its exact PostgreSQL text (an
    # Arrow string) rather than an Arrow decimal, for a sink whose numeric holds every source value
    # (NaN, ±Infinity, any number of digits). Equality, JSON and the schema history ignore it.
    as_text: bool = field(default=False, compare=False, repr=False)
    # What the sink refuses among the values (`SinkLimits`); like `as_text`, ignored by equality and JSON.
    limits: SinkLimits | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        if self.kind == "decimal":
            return f"decimal({self.precision},{self.scale})"
        if self.kind == "list":
            assert self.element is not None
            return f"list<{self.element.describe()}>"
        return self.kind

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.precision is not None:
            out["precision"] = self.precision
            out["scale"] = self.scale
        if self.element is not None:
            out["element"] = self.element.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ColumnType:
        element = data.get("element")
        return cls(
            kind=data["kind"],
            precision=data.get("precision"),
            scale=data.get("scale"),
            element=cls.from_json(element) if element else None,
        )


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    nullable: bool = True
    source_type: str = ""  # the source's own spelling, e.g. "numeric(38,9)", kept for messages

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.to_json(),
            "nullable": self.nullable,
            "source_type": self.source_type,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Column:
        return cls(
            name=data["name"],
            type=ColumnType.from_json(data["type"]),
            nullable=data.get("nullable", True),
            source_type=data.get("source_type", ""),
        )


@dataclass(frozen=True, order=True)
class TableName:
    """A `schema.table` name, as written in pipeline YAML."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        parts = text.split(".")
        if len(parts) != 2 or not all(_IDENTIFIER.match(p) for p in parts):
            raise ValueError(
                f"'{text}' is not a table name: write it as schema.table, e.g. public.orders "
                "(letters, digits and underscores, not starting with a digit)"
            )
        return cls(parts[0], parts[1])

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def __str__(self) -> str:
        return self.qualified


@dataclass(frozen=True)
class TableSchema:
    """A table's columns in source order and its primary key (possibly empty)."""

    table: TableName
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = field(default=())

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"column '{name}' is not in {self.table}")

    def with_primary_key(self, key: tuple[str, ...]) -> TableSchema:
        missing = [k for k in key if k not in self.column_names]
        if missing:
            raise ValueError(f"primary key column(s) {missing} are not in {self.table}")
        return TableSchema(self.table, self.columns, key)

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table.qualified,
            "columns": [c.to_json() for c in self.columns],
            "primary_key": list(self.primary_key),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TableSchema:
        return cls(
            table=TableName.parse(data["table"]),
            columns=tuple(Column.from_json(c) for c in data["columns"]),
            primary_key=tuple(data.get("primary_key", ())),
        )


def _numeric_as_text(column_type: ColumnType) -> ColumnType:
    if column_type.kind == "decimal":
        return replace(column_type, as_text=True)
    if column_type.kind == "list" and column_type.element is not None:
        return replace(column_type, element=_numeric_as_text(column_type.element))
    return column_type


def numerics_as_text(schema: TableSchema) -> TableSchema:
    """The schema with its decimal columns (and decimal list elements) carried as exact text."""
    columns = tuple(replace(c, type=_numeric_as_text(c.type)) for c in schema.columns)
    return replace(schema, columns=columns)


def _limited(column_type: ColumnType, limits: SinkLimits) -> ColumnType:
    element = _limited(column_type.element, limits) if column_type.element is not None else None
    return replace(column_type, element=element, limits=limits)


def with_limits(schema: TableSchema, limits: SinkLimits) -> TableSchema:
    """The schema with the sink's value limits on every column (and list element) type."""
    columns = tuple(replace(c, type=_limited(c.type, limits)) for c in schema.columns)
    return replace(schema, columns=columns)
