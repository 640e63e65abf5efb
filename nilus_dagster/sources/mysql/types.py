"""MySQL/MariaDB column types to logical column types (from `information_schema.COLUMNS`).

Every mapping is exact; see README "MySQL and MariaDB sources" for the table:

* unsigned BIGINT holds up to 2^64-1, beyond int64: it travels as decimal(20,0), which every sink
  holds exactly (smaller unsigned integers widen to the next signed integer);
* DECIMAL(p,s) keeps its precision and scale (up to 65,30): a sink that cannot hold it refuses the
  table naming the column, before any data moves;
* DATETIME is a wall-clock timestamp (no zone); TIMESTAMP an instant, read in UTC;
* TIME ranges over ±838:59:59, so it is a duration (logical `interval`), not a time of day;
* BIT(1) is a boolean, BIT(n) an unsigned integer (int64 up to 63 bits, decimal(20,0) for 64);
* ENUM and SET travel as their text (a SET as its comma-separated members);
* MariaDB's JSON is LONGTEXT with a `json_valid` check: the catalog reads it back as json.
"""

from __future__ import annotations

from nilus_dagster.schema.table import ColumnType

UNSIGNED_BIGINT = ColumnType("decimal", precision=20, scale=0)

_SIGNED: dict[str, ColumnType] = {
    "tinyint": ColumnType("int16"),
    "smallint": ColumnType("int16"),
    "mediumint": ColumnType("int32"),
    "int": ColumnType("int32"),
    "integer": ColumnType("int32"),
    "bigint": ColumnType("int64"),
}
_UNSIGNED: dict[str, ColumnType] = {
    "tinyint": ColumnType("int16"),
    "smallint": ColumnType("int32"),
    "mediumint": ColumnType("int32"),
    "int": ColumnType("int64"),
    "integer": ColumnType("int64"),
    "bigint": UNSIGNED_BIGINT,
}
_BY_NAME: dict[str, ColumnType] = {
    "float": ColumnType("float32"),
    "double": ColumnType("float64"),
    "real": ColumnType("float64"),
    "year": ColumnType("int16"),
    "date": ColumnType("date"),
    "datetime": ColumnType("timestamp"),
    "timestamp": ColumnType("timestamptz"),
    "time": ColumnType("interval"),
    "json": ColumnType("json"),
    "uuid": ColumnType("uuid"),
    **{name: ColumnType("text") for name in (
        "char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum", "set", "inet4", "inet6",
    )},
    **{name: ColumnType("bytes") for name in (
        "binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob",
        # spatial values travel as MySQL's internal form (a 4-byte SRID, then WKB)
        "geometry", "point", "linestring", "polygon", "multipoint", "multilinestring", "multipolygon",
        "geometrycollection", "geomcollection",
    )},
}
TEXT_FALLBACK = ColumnType("text")


def column_type(data_type: str, column_type_text: str, precision: int | None, scale: int | None,
                *, is_json: bool = False) -> ColumnType:
    """Logical type from `DATA_TYPE`, `COLUMN_TYPE` (e.g. 'bigint(20) unsigned'), NUMERIC_PRECISION/SCALE."""
    name = data_type.lower()
    unsigned = "unsigned" in column_type_text.lower()
    if is_json:
        return ColumnType("json")
    if name in _SIGNED:
        return (_UNSIGNED if unsigned else _SIGNED)[name]
    if name in ("decimal", "numeric", "dec", "fixed"):
        return ColumnType("decimal", precision=precision or 10, scale=scale or 0)
    if name == "bit":
        bits = precision or 1
        if bits == 1:
            return ColumnType("bool")
        return ColumnType("int64") if bits < 64 else UNSIGNED_BIGINT
    if name in ("float", "double") and unsigned:  # deprecated UNSIGNED floats: same values, no sign
        return _BY_NAME[name]
    return _BY_NAME.get(name, TEXT_FALLBACK)


def cast_target(logical: ColumnType) -> str | None:
    """The `CAST(? AS ...)` target that compares a cursor mark (text) with the column exactly; None
    for text cursors (compared as strings under the column's collation)."""
    kind = logical.kind
    if kind in ("int16", "int32", "int64"):
        return "SIGNED"
    if kind == "decimal":
        return f"DECIMAL({logical.precision},{logical.scale})"
    if kind in ("timestamp", "timestamptz"):
        return "DATETIME(6)"
    if kind == "date":
        return "DATE"
    if kind in ("float32", "float64"):
        return "DOUBLE"
    return None
