"""Row-by-row comparison of a source table with its copy in a sink, values normalized."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
from google.cloud import bigquery
from psycopg.types.json import set_json_loads

Row = tuple[Any, ...]
_EXACT = decimal.Context(prec=200)


def normalize(value: Any) -> Any:
    """One comparable form per value: JSON parsed, UUIDs as text, instants in UTC, lists as tuples."""
    if isinstance(value, str) and value[:1] in "{[" and value[-1:] in "}]":
        try:
            return json.dumps(json.loads(value), sort_keys=True)
        except ValueError:
            return value
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC)
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, list | tuple):
        return tuple(normalize(v) for v in value)
    if isinstance(value, Decimal):
        # the default context rounds; NaN equals nothing, not even NaN: compare specials by name
        return value.normalize(_EXACT) if value.is_finite() else ("numeric", str(value))
    return value


def _normalized(rows: list[Row]) -> list[Row]:
    return [tuple(normalize(v) for v in row) for row in rows]


def source_rows(dsn: str, table: str, columns: list[str], order_by: str) -> list[Row]:
    cols = ", ".join(f'"{c}"' for c in columns)
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        set_json_loads(bytes.decode, conn)  # JSON as text on both sides, normalized alike
        return _normalized(conn.execute(f"SELECT {cols} FROM {table} ORDER BY {order_by}").fetchall())


def postgres_sink_rows(dsn: str, table: str, columns: list[str], order_by: str) -> list[Row]:
    return source_rows(dsn, table, columns, order_by)


def duckdb_rows(path: Path | str, table: str, columns: list[str], order_by: str) -> list[Row]:
    cols = ", ".join(f'"{c}"' for c in columns)
    with duckdb.connect(str(path), read_only=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return _normalized(conn.execute(f"SELECT {cols} FROM {table} ORDER BY {order_by}").fetchall())


def bigquery_rows(client: bigquery.Client, table: str, columns: list[str], order_by: str) -> list[Row]:
    """Rows of a BigQuery table (`project.dataset.table`, or a parenthesized query), JSON as text."""
    source = table if table.startswith("(") else f"`{table}`"
    cols = ", ".join(f"`{c}`" for c in columns)
    result = client.query(f"SELECT {cols} FROM {source} ORDER BY {order_by}").result()
    json_columns = {i for i, field in enumerate(result.schema) if field.field_type == "JSON"}
    rows = [
        tuple(json.dumps(v) if i in json_columns and v is not None else v for i, v in enumerate(row.values()))
        for row in result
    ]
    return _normalized(rows)


def assert_same_rows(expected: list[Row], actual: list[Row]) -> None:
    assert len(actual) == len(expected), f"{len(actual)} rows in the sink, {len(expected)} in the source"
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert got == want, f"row {index} differs:\n source {want}\n sink   {got}"
