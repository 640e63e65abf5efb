"""The PostgreSQL `BatchSnapshot`: a REPEATABLE READ READ ONLY transaction, COPY reads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from nilus_dagster.schema.table import TableName, TableSchema
from nilus_dagster.sources.batch import CursorRange
from nilus_dagster.sources.postgres.catalog import read_table_schema
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.sources.postgres.reader import read_table


class PostgresSnapshot:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def table_schema(self, table: TableName) -> TableSchema:
        return read_table_schema(self.conn, table)

    def _cast(self, schema: TableSchema, column: str) -> sql.Composable:
        return sql.SQL(schema.column(column).source_type)  # type: ignore[arg-type]

    def max_cursor(self, schema: TableSchema, column: str, above: str | None) -> str | None:
        table = sql.Identifier(schema.table.schema, schema.table.name)
        name = sql.Identifier(column)
        lower = (sql.SQL("{c} > %s::{t}").format(c=name, t=self._cast(schema, column))
                 if above is not None else sql.SQL("true"))
        row = self.conn.execute(
            sql.SQL("SELECT max({c})::text FROM {tbl} WHERE {lower}").format(c=name, tbl=table, lower=lower),
            (above,) if above is not None else (),
        ).fetchone()
        return row[0] if row else None

    def estimated_rows(self, table: TableName) -> int | None:
        regclass = sql.Identifier(table.schema, table.name).as_string(self.conn)
        row = self.conn.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (regclass,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None

    def read(self, schema: TableSchema, cursor: CursorRange | None) -> Iterator[pa.RecordBatch]:
        if cursor is None:
            return read_table(self.conn, schema)
        name, cast = sql.Identifier(cursor.column), self._cast(schema, cursor.column)
        where = sql.SQL("{c} <= %s::{t}").format(c=name, t=cast)
        params: tuple[str, ...] = (cursor.upper,)
        if cursor.lower is not None:
            where = sql.SQL("{c} > %s::{t} AND {w}").format(c=name, t=cast, w=where)
            params = (cursor.lower, cursor.upper)
        return read_table(self.conn, schema, where=where.as_string(self.conn), params=params)


@contextmanager
def postgres_snapshot(connection_name: str, dsn: str) -> Iterator[PostgresSnapshot]:
    with connect_source(connection_name, dsn, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SET LOCAL TIME ZONE 'UTC'")
        yield PostgresSnapshot(conn)
        conn.execute("COMMIT")
