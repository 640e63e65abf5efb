"""A DuckDB table's primary key set aside for a bulk load into an empty table, built once after it.

DuckDB maintains a primary key's ART index row by row while rows are inserted; measured on 2M rows
of 5 columns, inserting into a keyed table took 1.6x as long as inserting into the same table
without the key and running `ALTER TABLE ... ADD PRIMARY KEY` at the end (which builds the index in
one pass). Only an empty table loses its key: it is recreated with the same columns (DuckDB cannot
drop a key constraint), inside the caller's transaction. Adding the key back checks every key is
unique and not null: duplicates refuse the load ("Data contains duplicates") rather than being kept.

A merge into a table with a list column, whose rows carry every column of the table, is applied
as delete-then-insert of the staged keys (`replace_rows`): the same rows as `INSERT ... ON CONFLICT
DO UPDATE`, which DuckDB runs slowly when it updates lists: measured on 100k rows of 20 mixed
columns with a text[], 12 s of CPU against 0.9 s; without the list column the upsert took 0.27 s,
and on 1M rows of 5 scalar columns 0.85 s against 3.7 s for delete-then-insert (so only tables
with lists take this path).
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb
from psycopg import sql

from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.sinks.sql_changes import insert_statement
from nilus_dagster.sinks.sql_dialect import idents, table_ident

_REBUILT = "_nilus_keyless"
DUCKDB_STAGE = "_nilus_merge_stage"


def primary_key(conn: duckdb.DuckDBPyConnection, target: SinkTable) -> list[str]:
    """The table's primary key columns ([] without one, or when the table is missing)."""
    rows = conn.execute(
        "SELECT constraint_column_names FROM duckdb_constraints() "
        "WHERE schema_name = ? AND table_name = ? AND constraint_type = 'PRIMARY KEY'",
        [target.dataset, target.name],
    ).fetchall()  # fetchall: DuckDB 2 refuses the next statement while a result is unfinished
    return list(rows[0][0]) if rows else []


def is_empty(conn: duckdb.DuckDBPyConnection, target: SinkTable) -> bool:
    query = sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(table_ident(target)).as_string()
    return bool(conn.execute(query).fetchall()[0][0])


def drop_key_if_empty(conn: duckdb.DuckDBPyConnection, target: SinkTable) -> list[str]:
    """Recreate the empty keyed table without its key (same columns and types); returns the key
    it had ([] and nothing done for a table without key, or with rows)."""
    key = primary_key(conn, target)
    if not key or _has_indexes(conn, target) or not is_empty(conn, target):
        return []  # an index of the user's would block the DROP: such a table keeps its key
    table = table_ident(target)
    rebuilt = sql.Identifier(target.dataset, _REBUILT)
    for statement in (
        sql.SQL("CREATE TABLE {} AS SELECT * FROM {} LIMIT 0").format(rebuilt, table),
        sql.SQL("DROP TABLE {}").format(table),
        sql.SQL("ALTER TABLE {} RENAME TO {}").format(rebuilt, sql.Identifier(target.name)),
    ):
        conn.execute(statement.as_string())
    return key


def _has_indexes(conn: duckdb.DuckDBPyConnection, target: SinkTable) -> bool:
    rows = conn.execute(
        "SELECT count(*) FROM duckdb_indexes() WHERE schema_name = ? AND table_name = ?",
        [target.dataset, target.name],
    ).fetchall()
    return bool(rows[0][0])


def add_key(conn: duckdb.DuckDBPyConnection, target: SinkTable, key: Sequence[str]) -> None:
    """Give the table its primary key back, unless it already has one."""
    if key and not primary_key(conn, target):
        statement = sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(table_ident(target), idents(key))
        conn.execute(statement.as_string())


def merges_by_replacing(conn: duckdb.DuckDBPyConnection, target: SinkTable, schema: TableSchema) -> bool:
    """A merge is faster as `replace_rows`: the schema has a list column and the table no column
    besides the schema's (so replacing whole rows loses no value)."""
    if not any(column.type.kind == "list" for column in schema.columns):
        return False
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
        [target.dataset, target.name],
    ).fetchall()
    return {row[0] for row in rows} == set(schema.column_names)


def replace_rows(
    conn: duckdb.DuckDBPyConnection, target: SinkTable, schema: TableSchema, source: sql.Composable
) -> None:
    """Upsert `source` by key as: stage it, delete the table's rows of its keys, insert it."""
    stage = sql.Identifier(DUCKDB_STAGE)
    matches = sql.SQL(" AND ").join(
        sql.SQL("{} = {}").format(sql.Identifier(target.name, column), sql.Identifier(DUCKDB_STAGE, column))
        for column in schema.primary_key
    )
    for statement in (
        sql.SQL("CREATE TEMP TABLE {} AS SELECT * FROM {}").format(stage, source),
        sql.SQL("DELETE FROM {} USING {} WHERE {}").format(table_ident(target), stage, matches),
        insert_statement(target, schema.column_names, stage),
        sql.SQL("DROP TABLE {}").format(stage),
    ):
        conn.execute(statement.as_string())
