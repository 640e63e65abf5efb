"""Table schemas and sizes from MySQL's/MariaDB's `information_schema`.

A pipeline's table name `shop.orders` is table `orders` in database `shop`. These functions only
run queries, so they can run inside the caller's snapshot transaction.
"""

from __future__ import annotations

import re

import pymysql

from nilus_dagster.schema.table import Column, TableName, TableSchema
from nilus_dagster.sources.errors import SourceError
from nilus_dagster.sources.mysql.types import column_type

_TABLE_SQL = """
SELECT TABLE_TYPE, ENGINE, TABLE_ROWS FROM information_schema.TABLES
WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s
"""
_COLUMNS_SQL = """
SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE, NUMERIC_PRECISION, NUMERIC_SCALE
FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s
ORDER BY ORDINAL_POSITION
"""
_PRIMARY_KEY_SQL = """
SELECT COLUMN_NAME FROM information_schema.STATISTICS
WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX
"""
# MariaDB's JSON is an alias of LONGTEXT with a CHECK (json_valid(`column`)) named after the column.
_MARIADB_JSON_SQL = """
SELECT CONSTRAINT_NAME, CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS
WHERE CONSTRAINT_SCHEMA = %s AND TABLE_NAME = %s AND CHECK_CLAUSE LIKE 'json_valid(%%'
"""
_JSON_VALID = re.compile(r"json_valid\(`((?:[^`]|``)+)`\)", re.IGNORECASE)


class MySQLTableNotFound(SourceError):
    def __init__(self, table: TableName, user: str) -> None:
        self.table = table
        super().__init__(
            f"table {table} does not exist (MySQL database '{table.schema}', table '{table.name}'), or user "
            f"'{user}' cannot see it; check the name in the pipeline (database.table), or "
            f"GRANT SELECT ON `{table.schema}`.* TO the pipeline's user"
        )


def quote_identifier(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def quoted_table(table: TableName) -> str:
    return f"{quote_identifier(table.schema)}.{quote_identifier(table.name)}"


def is_mariadb(conn: pymysql.Connection) -> bool:
    return "mariadb" in conn.get_server_info().lower()


def _query(conn: pymysql.Connection, query: str, params: tuple[object, ...]) -> list[tuple[object, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(query, params)
        return list(cursor.fetchall())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _table_row(conn: pymysql.Connection, table: TableName) -> tuple[object, ...]:
    rows = _query(conn, _TABLE_SQL, (table.schema, table.name))
    if not rows:
        user = _query(conn, "SELECT CURRENT_USER()", ())[0][0]
        raise MySQLTableNotFound(table, _text(user))
    return rows[0]


def _json_columns(conn: pymysql.Connection, table: TableName) -> set[str]:
    if not is_mariadb(conn):
        return set()  # MySQL has a real JSON type (DATA_TYPE 'json')
    found = set()
    for _, clause in _query(conn, _MARIADB_JSON_SQL, (table.schema, table.name)):
        match = _JSON_VALID.fullmatch(_text(clause).strip())
        if match:
            found.add(match[1].replace("``", "`"))
    return found


def read_table_schema(conn: pymysql.Connection, table: TableName) -> TableSchema:
    """Columns (ordinal order, logical types), nullability and primary key of `table`."""
    _table_row(conn, table)
    json_columns = _json_columns(conn, table)
    columns = []
    for name, data_type, type_text, nullable, precision, scale in _query(
        conn, _COLUMNS_SQL, (table.schema, table.name)
    ):
        name, type_text = _text(name), _text(type_text)
        logical = column_type(
            _text(data_type), type_text,
            int(precision) if precision is not None else None, int(scale) if scale is not None else None,
            is_json=name in json_columns,
        )
        columns.append(Column(name, logical, nullable=_text(nullable) == "YES", source_type=type_text))
    key = tuple(_text(row[0]) for row in _query(conn, _PRIMARY_KEY_SQL, (table.schema, table.name)))
    return TableSchema(table, tuple(columns), key)


def estimated_rows(conn: pymysql.Connection, table: TableName) -> int | None:
    """`information_schema.TABLES.TABLE_ROWS`: InnoDB's estimate (None for views)."""
    rows = _table_row(conn, table)[2]
    return int(rows) if rows is not None else None
