"""Logical types to Arrow types: Arrow is the batch currency between sources and sinks."""

from __future__ import annotations

import pyarrow as pa

from nilus_dagster.schema.table import UNCONSTRAINED_DECIMAL, ColumnType, TableSchema

_SIMPLE: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "text": pa.string(),
    "json": pa.string(),
    "uuid": pa.string(),
    "bytes": pa.binary(),
    "date": pa.date32(),
    "time": pa.time64("us"),
    "timestamp": pa.timestamp("us"),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    "interval": pa.month_day_nano_interval(),
}

# Field metadata that keeps the logical kind where Arrow alone is ambiguous (json/uuid are strings).
LOGICAL_KIND_KEY = b"nilus.kind"


def arrow_type(column_type: ColumnType) -> pa.DataType:
    if column_type.kind == "decimal" and column_type.as_text:
        return pa.string()
    if column_type.kind == "decimal":
        precision, scale = (
            (column_type.precision, column_type.scale) if column_type.precision is not None else UNCONSTRAINED_DECIMAL
        )
        assert scale is not None
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if column_type.kind == "list":
        assert column_type.element is not None
        return pa.list_(arrow_type(column_type.element))
    return _SIMPLE[column_type.kind]


def arrow_schema(schema: TableSchema) -> pa.Schema:
    return pa.schema(
        [
            pa.field(c.name, arrow_type(c.type), nullable=c.nullable, metadata={LOGICAL_KIND_KEY: c.type.kind})
            for c in schema.columns
        ]
    )
