"""Logical column types as BigQuery columns, and Arrow data as a Parquet load into them.

Mapping (lossless, else UnsupportedColumnType naming the column):

- decimal(p,s): NUMERIC(p,s) when p-s <= 29 and s <= 9, BIGNUMERIC(p,s) when p-s <= 38 and s <= 38;
  unconstrained numeric is decimal(38,9), i.e. NUMERIC.
- timestamptz: TIMESTAMP; timestamp: DATETIME; date: DATE; time: TIME; json: JSON; bytes: BYTES;
  uuid and text: STRING; bool: BOOL; int16/32/64: INT64; float32/64: FLOAT64.
- interval: STRING holding an ISO 8601 duration (`P1Y2M3DT4H5M6.5S`). A Parquet load cannot fill
  an INTERVAL column; `CAST(col AS INTERVAL)` reads the text back.
- list<x>: x REPEATED. BigQuery arrays hold no NULL elements: a NULL element fails the write
  naming the column and row (never dropped silently); a NULL array lands as an empty array, as
  BigQuery stores every missing array. Arrays of arrays are rejected.

All columns are NULLABLE: NOT NULL is the source's business, and a source relaxing it must never
break loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from google.cloud.bigquery import SchemaField

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.schema.table import UNCONSTRAINED_DECIMAL
from nilus_dagster.sinks.base import SinkError, UnsupportedColumnType

SINK_NAME = "BigQuery"

NUMERIC_MAX_INTEGER_DIGITS, NUMERIC_MAX_SCALE = 29, 9
BIGNUMERIC_MAX_INTEGER_DIGITS, BIGNUMERIC_MAX_SCALE = 38, 38

_SCALAR_TYPES: dict[str, str] = {
    "bool": "BOOL",
    "int16": "INT64",
    "int32": "INT64",
    "int64": "INT64",
    "float32": "FLOAT64",
    "float64": "FLOAT64",
    "text": "STRING",
    "uuid": "STRING",
    "interval": "STRING",
    "json": "JSON",
    "bytes": "BYTES",
    "date": "DATE",
    "time": "TIME",
    "timestamp": "DATETIME",
    "timestamptz": "TIMESTAMP",
}

# What each BigQuery type is written as in Parquet (also used to fill columns the batch lacks).
_ARROW_TYPES: dict[str, pa.DataType] = {
    "BOOL": pa.bool_(),
    "BOOLEAN": pa.bool_(),
    "INT64": pa.int64(),
    "INTEGER": pa.int64(),
    "FLOAT64": pa.float64(),
    "FLOAT": pa.float64(),
    "STRING": pa.string(),
    "JSON": pa.string(),
    "BYTES": pa.binary(),
    "DATE": pa.date32(),
    "TIME": pa.time64("us"),
    "DATETIME": pa.timestamp("us"),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}

# Kinds PostgreSQL may store out of line (TOAST): only these can arrive as "unchanged".
TOASTABLE_KINDS = frozenset({"text", "json", "bytes", "decimal", "list"})


def bigquery_field(column: Column, table: str) -> SchemaField:
    """The NULLABLE (or REPEATED) BigQuery column for a logical column."""
    column_type, mode = column.type, "NULLABLE"
    if column_type.kind == "list":
        assert column_type.element is not None
        column_type, mode = column_type.element, "REPEATED"
        if column_type.kind == "list":
            raise UnsupportedColumnType(SINK_NAME, table, column, "BigQuery has no arrays of arrays")
    if column_type.kind != "decimal":
        return SchemaField(column.name, _SCALAR_TYPES[column_type.kind], mode=mode)
    field_type, precision, scale = _decimal_type(column, column_type, table)
    return SchemaField(column.name, field_type, mode=mode, precision=precision, scale=scale)


def bigquery_fields(schema: TableSchema) -> list[SchemaField]:
    return [bigquery_field(c, schema.table.qualified) for c in schema.columns]


def _decimal_type(column: Column, column_type: ColumnType, table: str) -> tuple[str, int | None, int | None]:
    if column_type.precision is None:
        return "NUMERIC", None, None  # decimal(38,9): exactly BigQuery's plain NUMERIC
    precision, scale = column_type.precision, column_type.scale or 0
    if scale < 0:
        raise UnsupportedColumnType(SINK_NAME, table, column, "BigQuery has no negative decimal scale")
    if precision - scale <= NUMERIC_MAX_INTEGER_DIGITS and scale <= NUMERIC_MAX_SCALE:
        return "NUMERIC", precision, scale
    if precision - scale <= BIGNUMERIC_MAX_INTEGER_DIGITS and scale <= BIGNUMERIC_MAX_SCALE:
        return "BIGNUMERIC", precision, scale
    raise UnsupportedColumnType(
        SINK_NAME,
        table,
        column,
        f"BIGNUMERIC holds at most {BIGNUMERIC_MAX_INTEGER_DIGITS} integer digits and "
        f"{BIGNUMERIC_MAX_SCALE} decimals; declare the source column with less precision",
    )


def arrow_type_of(field: SchemaField) -> pa.DataType:
    """The Arrow type a BigQuery column is loaded from."""
    if field.field_type in ("NUMERIC", "BIGNUMERIC"):
        precision, scale = field.precision, field.scale
        if precision is None:
            precision, scale = UNCONSTRAINED_DECIMAL if field.field_type == "NUMERIC" else (76, 38)
        scalar: pa.DataType = (pa.decimal128 if precision <= 38 else pa.decimal256)(precision, scale or 0)
    else:
        scalar = _ARROW_TYPES[field.field_type]
    return pa.list_(scalar) if field.mode == "REPEATED" else scalar


def to_load_table(data: pa.Table, schema: TableSchema, fields: Sequence[SchemaField]) -> pa.Table:
    """`data` shaped as `fields`, ready for a Parquet load.

    Source columns are converted (intervals to text, narrow numbers widened, arrays checked for
    NULL elements); other columns present in `data` (metadata) pass through; columns absent from
    `data` are filled with NULLs (a Parquet load must name every column of its schema).
    """
    table_name = schema.table.qualified
    columns: dict[str, pa.ChunkedArray] = {}
    for field in fields:
        if field.name not in data.column_names:
            columns[field.name] = pa.chunked_array([pa.nulls(data.num_rows, arrow_type_of(field))])
        elif field.name in schema.column_names:
            column = schema.column(field.name)
            columns[field.name] = _load_array(data.column(field.name), column, table_name)
        else:
            columns[field.name] = data.column(field.name)
    return pa.table(columns)


def _load_array(values: pa.ChunkedArray, column: Column, table: str) -> pa.ChunkedArray:
    if column.type.kind == "list":
        _reject_null_elements(values, column, table)
        assert column.type.element is not None
        if column.type.element.kind == "interval":
            return pa.chunked_array([_map_list_values(chunk, _intervals_to_text) for chunk in values.chunks])
        return values
    if column.type.kind == "interval":
        return pa.chunked_array([_intervals_to_text(chunk) for chunk in values.chunks], pa.string())
    if column.type.kind in ("int16", "int32"):
        return values.cast(pa.int64())
    if column.type.kind == "float32":
        return values.cast(pa.float64())
    return values


def _reject_null_elements(values: pa.ChunkedArray, column: Column, table: str) -> None:
    row_offset = 0
    for chunk in values.chunks:
        elements = pc.list_flatten(chunk)
        if elements.null_count:
            parents = pc.list_parent_indices(chunk)
            first = pc.filter(parents, elements.is_null())[0].as_py()
            raise SinkError(
                f"BigQuery sink cannot write column '{column.name}' of {table}: row {row_offset + first} "
                f"holds an array with a NULL element and BigQuery arrays cannot hold NULLs "
                f"(filter the NULLs at the source, e.g. array_remove({column.name}, NULL))"
            )
        row_offset += len(chunk)


def _map_list_values(chunk: pa.ListArray, convert: Callable[[pa.Array], pa.Array]) -> pa.ListArray:
    return pa.ListArray.from_arrays(chunk.offsets, convert(chunk.values), mask=chunk.is_null())


def _intervals_to_text(chunk: pa.Array) -> pa.Array:
    return pa.array(
        [None if v is None else iso_duration(v.months, v.days, v.nanoseconds) for v in chunk.to_pylist()],
        pa.string(),
    )


def iso_duration(months: int, days: int, nanoseconds: int) -> str:
    """An interval as ISO 8601 (`P1Y2M3DT4H5M6.5S`); each part keeps its sign, as PostgreSQL's do."""
    years, months = int(months / 12), months - 12 * int(months / 12)
    sign = "-" if nanoseconds < 0 else ""
    hours, rest = divmod(abs(nanoseconds), 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds, fraction = divmod(rest, 1_000_000_000)
    second_text = f"{seconds}.{fraction:09d}".rstrip("0").rstrip(".")
    date_part = "".join(f"{n}{unit}" for n, unit in ((years, "Y"), (months, "M"), (days, "D")) if n)
    time_part = "".join(
        f"{sign}{text}{unit}"
        for text, unit in ((str(hours), "H"), (str(minutes), "M"), (second_text, "S"))
        if text != "0"
    )
    if not date_part and not time_part:
        return "PT0S"
    return f"P{date_part}" + (f"T{time_part}" if time_part else "")
