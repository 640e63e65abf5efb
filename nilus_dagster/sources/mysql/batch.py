"""The MySQL/MariaDB `BatchSnapshot`: one `START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY`.

REPEATABLE READ and a consistent snapshot taken at the start: the cursor maximum and every row
read come from the same InnoDB read view. The session is in UTC (see `connection`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pymysql

from nilus_dagster.schema.table import TableName, TableSchema
from nilus_dagster.sources.batch import CursorRange
from nilus_dagster.sources.mysql import catalog
from nilus_dagster.sources.mysql.connection import connect_mysql
from nilus_dagster.sources.mysql.reader import cursor_condition, read_table


class MySQLSnapshot:
    def __init__(self, conn: pymysql.Connection) -> None:
        self.conn = conn

    def table_schema(self, table: TableName) -> TableSchema:
        return catalog.read_table_schema(self.conn, table)

    def max_cursor(self, schema: TableSchema, column: str, above: str | None) -> str | None:
        where = cursor_condition(schema, column, lower=above is not None, upper=False)
        with self.conn.cursor() as cursor:
            cursor.execute(
                f"SELECT CAST(MAX({catalog.quote_identifier(column)}) AS CHAR) "
                f"FROM {catalog.quoted_table(schema.table)} WHERE {where}",
                (above,) if above is not None else None,
            )
            row = cursor.fetchone()
        return row[0] if row else None

    def estimated_rows(self, table: TableName) -> int | None:
        return catalog.estimated_rows(self.conn, table)

    def read(self, schema: TableSchema, cursor: CursorRange | None) -> Iterator[pa.RecordBatch]:
        if cursor is None:
            return read_table(self.conn, schema)
        where = cursor_condition(schema, cursor.column, lower=cursor.lower is not None, upper=True)
        params = (cursor.upper,) if cursor.lower is None else (cursor.lower, cursor.upper)
        return read_table(self.conn, schema, where=where, params=params)


@contextmanager
def mysql_snapshot(connection_name: str, dsn: str) -> Iterator[MySQLSnapshot]:
    conn = connect_mysql(connection_name, dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        yield MySQLSnapshot(conn)
        conn.commit()
    finally:
        conn.close()
