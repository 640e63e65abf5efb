"""PostgreSQL types to logical column types, shared by the batch reader and the CDC decoder."""

from __future__ import annotations

from nilus_dagster.schema.table import ColumnType

_BY_NAME: dict[str, ColumnType] = {
    "bool": ColumnType("bool"),
    "int2": ColumnType("int16"),
    "int4": ColumnType("int32"),
    "int8": ColumnType("int64"),
    "oid": ColumnType("int64"),
    "float4": ColumnType("float32"),
    "float8": ColumnType("float64"),
    "text": ColumnType("text"),
    "varchar": ColumnType("text"),
    "bpchar": ColumnType("text"),
    "name": ColumnType("text"),
    "citext": ColumnType("text"),
    "json": ColumnType("json"),
    "jsonb": ColumnType("json"),
    "uuid": ColumnType("uuid"),
    "bytea": ColumnType("bytes"),
    "date": ColumnType("date"),
    "time": ColumnType("time"),
    "timestamp": ColumnType("timestamp"),
    "timestamptz": ColumnType("timestamptz"),
    "interval": ColumnType("interval"),
}

# Types with no logical equivalent travel as their canonical text form (lossless, never dropped):
# inet, cidr, macaddr, money, xml, tsvector, ranges, geometric types, bit strings, timetz...
TEXT_FALLBACK = ColumnType("text")


def numeric_type(typmod: int) -> ColumnType:
    """NUMERIC(p,s) from its typmod; -1 means unconstrained."""
    if typmod < 4:
        return ColumnType("decimal")
    packed = typmod - 4
    precision = (packed >> 16) & 0xFFFF
    scale = packed & 0xFFFF
    if scale > 0x7FFF:  # PostgreSQL 15+ allows negative scale; store it as an integer scale of 0
        scale = 0
    return ColumnType("decimal", precision=precision, scale=scale)


def column_type(type_name: str, typmod: int = -1, *, element_type_name: str | None = None,
                is_enum: bool = False) -> ColumnType:
    """Logical type for a PostgreSQL type given by `pg_type.typname` (arrays start with '_')."""
    if element_type_name is not None:
        element = column_type(element_type_name, typmod)
        return ColumnType("list", element=element)
    if type_name == "numeric":
        return numeric_type(typmod)
    if is_enum:
        return ColumnType("text")
    return _BY_NAME.get(type_name, TEXT_FALLBACK)
