"""Helpers for binlog CDC tests: a MariaDB source table, an engine run into DuckDB, and the
row-by-row comparison of the source with its sink copy."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql
from table_compare import assert_same_rows, duckdb_rows, normalize, postgres_sink_rows

from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcRunResult, CdcTableConfig, run_cdc_pipeline
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.connections import DuckDBConnection
from nilus_dagster.state import PipelineKey
from nilus_dagster.state.store import StateStore


def mysql_connect(dsn: str) -> pymysql.Connection:
    parts = urlsplit(dsn)
    return pymysql.connect(
        host=parts.hostname, port=parts.port, user=unquote(parts.username or ""),
        password=unquote(parts.password or ""), database=parts.path.lstrip("/") or None,
        autocommit=True, charset="utf8mb4", init_command="SET time_zone = '+00:00'",
    )


def execute(dsn: str, *statements: str) -> None:
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def database(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def engine_config(dsn: str, tables: list[str], pipeline: str = "binlog", **options: Any) -> CdcPipelineConfig:
    return CdcPipelineConfig(
        key=PipelineKey("acme", pipeline, "default"),
        source_connection="src",
        source_dsn=dsn,
        tables=tuple(
            CdcTableConfig(TableName(database(dsn), t), SinkTable("replica", t)) for t in tables
        ),
        batch_max_ms=100,
        **options,
    )


def run_engine(config: CdcPipelineConfig, duckdb_path: Path, state_dsn: str, **kwargs: Any) -> CdcRunResult:
    sink = open_sink("sink", DuckDBConnection(type="duckdb", path=str(duckdb_path)), dataset="replica")
    try:
        with StateStore(state_dsn).open() as store:
            return run_cdc_pipeline(config, sink, store, run_id="test", stop_at_caught_up=True, **kwargs)
    finally:
        sink.close()


def _source_value(value: Any, kind: str) -> Any:
    """A pymysql value as the sink holds it: TIMESTAMP (read in UTC) as an instant, BIT as a number."""
    if value is None:
        return None
    if kind == "timestamptz":
        return value.replace(tzinfo=dt.UTC)
    if kind == "bit":
        return int.from_bytes(value, "big")
    if kind == "bit1":
        return any(value)
    return value


def mysql_rows(dsn: str, table: str, columns: list[str], order_by: str, kinds: dict[str, str]) -> list[tuple]:
    cols = ", ".join(f"`{c}`" for c in columns)
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT {cols} FROM `{table}` ORDER BY {order_by}")
        rows = cursor.fetchall()
    return [
        tuple(normalize(_source_value(v, kinds.get(c, ""))) for v, c in zip(row, columns, strict=True)) for row in rows
    ]


def assert_replica_matches(dsn: str, location: Path | str, table: str, columns: list[str], order_by: str,
                           kinds: dict[str, str] | None = None, *, sink: str = "duckdb") -> None:
    """The source table equals its live sink rows (a DuckDB file, or a PostgreSQL sink's DSN)."""
    expected = mysql_rows(dsn, table, columns, order_by, kinds or {})
    live = f"(SELECT * FROM replica.{table} WHERE NOT coalesce(_nilus_deleted, false)) t"
    reader = duckdb_rows if sink == "duckdb" else postgres_sink_rows
    assert_same_rows(expected, reader(str(location), live, columns, order_by))
