"""Stream a MySQL/MariaDB table as Arrow record batches.

An unbuffered cursor (`SSCursor`: rows stream from the server, memory stays bounded) fetches
`batch_rows` rows at a time; values arrive as the server's text (bytes for binary columns, see
`connection.RAW_CONVERSIONS`) and each column becomes an Arrow array at once, by Arrow casts where
the text form is Arrow's (integers, decimals, floats, dates, timestamps) and value by value only
for BIT and TIME. FLOAT is selected as a DOUBLE (its text is exact; a FLOAT's is 6 digits). A
value that does not fit its logical type raises ValueDecodeError naming the column and the value
(zero dates such as '0000-00-00' included: nothing is nulled or rounded).

The reader never commits: it runs inside the caller's `START TRANSACTION WITH CONSISTENT SNAPSHOT`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pymysql
import pymysql.cursors

from nilus_dagster.schema.arrow import arrow_schema, arrow_type
from nilus_dagster.schema.table import Column, TableSchema
from nilus_dagster.sources.errors import SourceError, ValueDecodeError
from nilus_dagster.sources.mysql.catalog import quote_identifier, quoted_table
from nilus_dagster.sources.mysql.types import cast_target

DEFAULT_BATCH_ROWS = 50_000
_TIME = re.compile(r"(-)?(\d+):(\d\d):(\d\d)(?:\.(\d{1,6}))?")

_Convert = Callable[[Sequence[Any]], pa.Array]


def _by_cast(target: pa.DataType) -> _Convert:
    return lambda values: pa.array(values, pa.string()).cast(target)


def _bits_to_int(values: Sequence[Any]) -> list[int | None]:
    return [None if v is None else int.from_bytes(v, "big") for v in values]


def _bits_to_bool(values: Sequence[Any]) -> pa.Array:
    return pa.array([None if v is None else any(v) for v in values], pa.bool_())


def _time_to_interval(values: Sequence[Any]) -> pa.Array:
    """TIME text ('-838:59:59.5') as a duration: (0 months, 0 days, nanoseconds)."""
    out: list[tuple[int, int, int] | None] = []
    for text in values:
        if text is None:
            out.append(None)
            continue
        match = _TIME.fullmatch(text)
        if match is None:
            raise pa.ArrowInvalid(f"{text!r} is not a TIME value")
        sign, hours, minutes, seconds, fraction = match.groups()
        whole_seconds = int(hours) * 3600 + int(minutes) * 60 + int(seconds)
        micros = whole_seconds * 1_000_000 + int((fraction or "").ljust(6, "0"))
        out.append((0, 0, (-micros if sign else micros) * 1000))
    return pa.array(out, pa.month_day_nano_interval())


def _converter(column: Column) -> _Convert:
    kind, target = column.type.kind, arrow_type(column.type)
    is_bit = column.source_type.lower().startswith("bit")
    if kind == "bool":
        return _bits_to_bool
    if is_bit and kind == "int64":
        return lambda values: pa.array(_bits_to_int(values), pa.int64())
    if is_bit and kind == "decimal":  # BIT(64): up to 2^64-1
        return lambda values: pa.array([None if v is None else str(v) for v in _bits_to_int(values)],
                                       pa.string()).cast(target)
    if kind == "interval":
        return _time_to_interval
    if kind == "bytes":
        return lambda values: pa.array(values, pa.binary())
    if kind in ("text", "json", "uuid") or (kind == "decimal" and column.type.as_text):
        return lambda values: pa.array(values, pa.string())
    if kind == "timestamptz":  # the session is in UTC: the text is the instant's UTC wall clock
        return lambda values: pa.array(values, pa.string()).cast(pa.timestamp("us")).cast(target)
    return _by_cast(target)


def _select_expression(column: Column) -> str:
    """How a column is selected: FLOAT through a DOUBLE, since MariaDB prints a FLOAT with 6
    significant digits (16777216 as '16777200') while a DOUBLE's text holds its exact value."""
    name = quote_identifier(column.name)
    return f"({name} + 0e0) AS {name}" if column.type.kind == "float32" else name


def _describe(schema: TableSchema, column: Column) -> str:
    return f"{schema.table}.{column.name} ({column.source_type or column.type.describe()})"


def _decode_error(schema: TableSchema, column: Column, convert: _Convert, values: Sequence[Any]) -> ValueDecodeError:
    """The error naming the first value `convert` rejects (an error path: value by value)."""
    for value in values:
        try:
            convert([value])
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError, ValueError) as error:
            if isinstance(value, str) and (value.startswith("0000-00-00") or "-00" in value[:10]):
                return ValueDecodeError(
                    f"column {_describe(schema, column)} holds the zero or partial date {value!r}, which no "
                    "sink can hold (nilus refuses it rather than load a wrong value or drop it): set such "
                    f"values to NULL or a real date in the source, e.g. UPDATE {quoted_table(schema.table)} "
                    f"SET {quote_identifier(column.name)} = NULL WHERE {quote_identifier(column.name)} < '0001-01-01'"
                )
            return ValueDecodeError(
                f"column {_describe(schema, column)}: value {value!r} does not fit {column.type.describe()} ({error})"
            )
    return ValueDecodeError(f"column {_describe(schema, column)}: values do not convert to {column.type.describe()}")


def cursor_condition(schema: TableSchema, column: str, lower: bool, upper: bool) -> str:
    """`col > CAST(%s AS t)` / `col <= CAST(%s AS t)` (joined by AND) with `%s` placeholders."""
    target = cast_target(schema.column(column).type)
    placeholder = f"CAST(%s AS {target})" if target else "%s"
    name = quote_identifier(column)
    parts = ([f"{name} > {placeholder}"] if lower else []) + ([f"{name} <= {placeholder}"] if upper else [])
    return " AND ".join(parts) or "TRUE"


def read_table(
    conn: pymysql.Connection,
    schema: TableSchema,
    *,
    where: str | None = None,
    params: Sequence[Any] = (),
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Yield the table's rows (optionally filtered by `where`, with `%s` placeholders bound from
    `params`) as batches of exactly `arrow_schema(schema)`; an empty result yields one empty batch."""
    if not schema.columns:
        raise SourceError(f"table {schema.table} has no columns to read")
    target = arrow_schema(schema)
    converters = [_converter(column) for column in schema.columns]
    columns = ", ".join(_select_expression(c) for c in schema.columns)
    query = f"SELECT {columns} FROM {quoted_table(schema.table)}" + (f" WHERE {where}" if where else "")
    yielded = False
    for rows in _fetched(conn, query, tuple(params), batch_rows):
        yield _to_batch(schema, target, converters, rows)
        yielded = True
    if not yielded:
        yield pa.RecordBatch.from_pylist([], schema=target)


def _fetched(conn: pymysql.Connection, query: str, params: tuple[Any, ...], batch_rows: int) -> Iterator[list[Any]]:
    """The query's rows, `batch_rows` at a time. Abandoning the iterator leaves the rest of the
    result unread (closing the cursor would read it all): the snapshot's connection is then closed.

    (Fetching one batch ahead on a thread was tried: no measurable gain, PyMySQL's parsing holds
    the GIL.)"""
    cursor = conn.cursor(pymysql.cursors.SSCursor)
    cursor.execute(query, params or None)
    while rows := cursor.fetchmany(batch_rows):
        yield rows
    cursor.close()


def _to_batch(
    schema: TableSchema, target: pa.Schema, converters: Sequence[_Convert], rows: Sequence[tuple[Any, ...]]
) -> pa.RecordBatch:
    arrays = []
    for column, convert, values in zip(schema.columns, converters, zip(*rows, strict=True), strict=True):
        try:
            arrays.append(convert(values))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError, ValueError):
            raise _decode_error(schema, column, convert, values) from None
    return pa.RecordBatch.from_arrays(arrays, schema=target)
