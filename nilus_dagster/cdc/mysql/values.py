"""Decoded binlog values (what `mysql-replication` gives: ints, Decimals, datetimes, timedeltas,
sets, bit strings) → the Arrow values of each column's logical type (sources/mysql/types.py).

The binlog carries values in the server's storage form, not as the text a query returns, so these
conversions are the stream's counterpart of the batch reader's text decoding; both must give the
same sink value (the row-by-row tests compare them). Where the storage form loses what a value is,
it is told apart here: a zero TIMESTAMP is stored as epoch 0 (a real TIMESTAMP never is: the range
starts one second later), YEAR 0000 as 0 (the library adds 1900), a zero DATE/DATETIME arrives as
None with a reason, and BINARY(n) comes without its trailing zero bytes. A zero date is refused
naming the column, as batch loads refuse it (sources/mysql/reader.py): no sink can hold it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa

from nilus_dagster.schema import Column, TableSchema, arrow_type

Normalize = Callable[[Any], Any]
_EPOCH = datetime(1970, 1, 1)
_UNSUPPORTED = ("uuid", "inet4", "inet6", "geometry", "point", "linestring", "polygon", "multipoint",
                "multilinestring", "multipolygon", "geometrycollection", "geomcollection", "vector")
EMPTY_SET = "empty set"  # mysql-replication's reason for a None that is the empty SET value ''
_NOT_IN_ROW = ("cols bitmap", "same with before values")  # a partial row image / JSON partial update
_SET_MEMBERS = re.compile(r"'((?:[^']|'')*)'")


class UnstreamableColumn(Exception):
    """A column whose binlog form the stream cannot decode exactly."""


def _base_type(column: Column) -> str:
    return column.source_type.split("(", 1)[0].split(" ", 1)[0].lower()


def unsupported_columns(schema: TableSchema) -> list[str]:
    """Columns of types whose binlog encoding is refused (binary-stored UUID/INET, spatial)."""
    return [f"{c.name} ({c.source_type})" for c in schema.columns if _base_type(c) in _UNSUPPORTED]


def _bits(value: Any) -> int:
    return int(value, 2) if isinstance(value, str) else int(value)


def _set_text(column: Column) -> Normalize:
    members = [m.replace("''", "'") for m in _SET_MEMBERS.findall(column.source_type)]
    order = {member: i for i, member in enumerate(members)}

    def text(value: Any) -> Any:
        if isinstance(value, set | frozenset):
            return ",".join(sorted(value, key=lambda m: order.get(m, len(order))))
        return value

    return text


def _duration(value: timedelta) -> tuple[int, int, int]:
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return (0, 0, micros * 1000)


def normalizer(column: Column) -> Normalize:
    """The function that turns a column's binlog value into its Arrow value (None stays None)."""
    kind, base = column.type.kind, _base_type(column)
    if base == "bit":
        if kind == "bool":
            return lambda v: None if v is None else _bits(v) != 0
        if kind == "decimal":
            return lambda v: None if v is None else Decimal(_bits(v))
        return lambda v: None if v is None else _bits(v)
    if base == "year":
        return lambda v: None if v is None else (0 if v == 1900 else v)
    if base == "set":
        return _set_text(column)
    if base == "binary":
        width = int(re.findall(r"\d+", column.source_type)[0]) if "(" in column.source_type else 1
        return lambda v: None if v is None else _binary(v).ljust(width, b"\0")
    if kind == "decimal":
        return lambda v: None if v is None else (Decimal(v) if isinstance(v, int) else v)
    if kind == "timestamptz":
        return lambda v: None if v is None or v == _EPOCH else v.replace(tzinfo=UTC)
    if kind == "interval":
        return lambda v: None if v is None else _duration(v)
    if kind == "json":
        return lambda v: v if v is None or isinstance(v, str) else json.dumps(v)
    if kind == "text":
        return lambda v: v.decode() if isinstance(v, bytes) else v
    if kind == "bytes":
        return lambda v: None if v is None else _binary(v)
    return lambda v: v


def _binary(value: bytes | str) -> bytes:
    """The library gives an empty binary value as '' (a str)."""
    return value.encode() if isinstance(value, str) else value


def zero_date(column: Column, value: Any, none_reason: str | None) -> bool:
    """The binlog value is a zero (or partly zero) date that will land as NULL."""
    if column.type.kind == "timestamptz":
        return value == _EPOCH
    return value is None and none_reason not in (None, "null")  # the library's reason for a real NULL: "null"


class RowConverter:
    """A table's binlog rows → positional tuples of Arrow-ready values in the schema's order."""

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.names = tuple(schema.column_names)
        self._normalize = [normalizer(c) for c in schema.columns]
        self._dated = [(c.name, c) for c in schema.columns if c.type.kind in ("date", "timestamp", "timestamptz")]

    def row(self, values: dict[str, Any], none_sources: dict[str, str]) -> tuple[Any, ...]:
        if len(values) != len(self.names) or any(name not in values for name in self.names):
            raise UnstreamableColumn(
                f"{self.schema.table}: a binlog row has columns {sorted(values)} but the table streams "
                f"{list(self.names)}: its columns changed outside the stream; reset the pipeline"
            )
        for name, reason in none_sources.items():
            if reason == EMPTY_SET:
                values = {**values, name: ""}
            elif reason in _NOT_IN_ROW:
                raise UnstreamableColumn(
                    f"{self.schema.table}.{name}: a binlog row lacks the column's value ({reason}): the source must "
                    "log whole rows (binlog_row_image = FULL)"
                )
        for name, column in self._dated:
            if zero_date(column, values[name], none_sources.get(name)):
                raise UnstreamableColumn(
                    f"column {self.schema.table}.{name} ({column.source_type}) received a zero or partial date, which "
                    "no sink can hold (nilus refuses it rather than load a wrong value or drop it): set such values "
                    "to NULL or a real date in the source, then reset the pipeline"
                )
        return tuple(f(values[name]) for f, name in zip(self._normalize, self.names, strict=True))

    def column(self, name: str, values: Sequence[Any]) -> pa.Array:
        column = self.schema.column(name)
        try:
            return pa.array(values, type=arrow_type(column.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
            raise UnstreamableColumn(
                f"{self.schema.table}.{name} ({column.source_type}): a binlog value does not fit "
                f"{column.type.describe()}: {error}"
            ) from None
