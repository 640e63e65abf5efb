"""What the SQL sinks (DuckDB, PostgreSQL) share: type mapping, table DDL and checkpoints.

Statements are built once with `psycopg.sql` (identifiers quoted the standard way, which DuckDB
reads too); a sink runs them through its `SqlRunner`. Only the type names, the parameter marker
and the schema holding the checkpoint table differ per dialect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import sql

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.sinks.base import (
    CHECKPOINT_TABLE,
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    Checkpoint,
    SinkTable,
    SinkTableMissing,
    UnsupportedColumnType,
)

# Columns a CDC sink table carries besides the source columns (see `prepare_table(..., cdc=True)`).
CDC_COLUMNS: tuple[Column, ...] = (
    Column(LSN_COLUMN, ColumnType("int64")),
    Column(OP_COLUMN, ColumnType("text")),
    Column(SYNCED_AT_COLUMN, ColumnType("timestamptz")),
    Column(DELETED_COLUMN, ColumnType("bool")),
)


class SqlRunner(Protocol):
    """Runs one statement with positional parameters; returns the rows (empty for DML/DDL)."""

    def __call__(self, statement: sql.Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


class TypeRejected(Exception):
    """A logical type the dialect cannot hold; the reason becomes UnsupportedColumnType's."""


@dataclass(frozen=True)
class SqlDialect:
    """Per-database spelling of types and parameters."""

    sink_name: str
    simple_types: dict[str, str]
    decimal_type: Callable[[int | None, int | None], str]  # raises TypeRejected
    list_type: Callable[[str, ColumnType], str]  # (element DDL, element type); raises TypeRejected
    param: sql.Composable
    default_schema: str
    row_id: str  # the pseudo-column naming a physical row (DuckDB rowid, PostgreSQL ctid)

    def type_ddl(self, column_type: ColumnType) -> str:
        if column_type.kind == "decimal":
            return self.decimal_type(column_type.precision, column_type.scale)
        if column_type.kind == "list":
            assert column_type.element is not None
            return self.list_type(self.type_ddl(column_type.element), column_type.element)
        return self.simple_types[column_type.kind]

    def column_type_ddl(self, target: SinkTable, column: Column) -> sql.SQL:
        """The column's type, or UnsupportedColumnType naming the column."""
        try:
            return sql.SQL(self.type_ddl(column.type))  # type: ignore[arg-type]
        except TypeRejected as e:
            raise UnsupportedColumnType(self.sink_name, target.qualified, column, str(e)) from None

    def column_ddl(self, target: SinkTable, column: Column) -> sql.Composed:
        """`"name" TYPE`, or UnsupportedColumnType naming the column."""
        return sql.SQL("{} {}").format(sql.Identifier(column.name), self.column_type_ddl(target, column))

    def checkpoint_table(self) -> sql.Identifier:
        return sql.Identifier(self.default_schema, CHECKPOINT_TABLE)


def table_ident(target: SinkTable) -> sql.Identifier:
    return sql.Identifier(target.dataset, target.name)


def idents(names: Sequence[str], qualifier: str | None = None) -> sql.Composed:
    """`"a", "b"` or, with a qualifier, `q."a", q."b"`."""
    if qualifier is None:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)
    return sql.SQL(", ").join(sql.Identifier(qualifier, n) for n in names)


def sink_columns(schema: TableSchema, cdc: bool) -> tuple[Column, ...]:
    return schema.columns + CDC_COLUMNS if cdc else schema.columns


def column_ddls(dialect: SqlDialect, target: SinkTable, columns: Sequence[Column]) -> list[sql.Composed]:
    """DDL for every column; raises UnsupportedColumnType before anything runs."""
    return [dialect.column_ddl(target, c) for c in columns]


def existing_columns(run: SqlRunner, dialect: SqlDialect, target: SinkTable) -> list[str]:
    rows = run(
        sql.SQL(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = {p} AND table_name = {p} ORDER BY ordinal_position"
        ).format(p=dialect.param),
        (target.dataset, target.name),
    )
    return [r[0] for r in rows]


def ensure_table(
    run: SqlRunner,
    dialect: SqlDialect,
    target: SinkTable,
    schema: TableSchema,
    *,
    cdc: bool,
    checkpoint_key: str | None = None,
) -> list[str]:
    """Create the schema and table if missing, add missing columns; return the added names.

    Columns the sink has but the source lost are kept (new rows get NULL there). With
    `checkpoint_key`, a missing table whose checkpoint is stored raises SinkTableMissing instead
    of being recreated (it was dropped: recreating it would hold only the newer changes).
    """
    columns = sink_columns(schema, cdc)
    ddls = column_ddls(dialect, target, columns)
    present = existing_columns(run, dialect, target)
    if not present and checkpoint_key is not None:
        stored = load_checkpoint(run, dialect, checkpoint_key)
        if stored is not None:
            raise SinkTableMissing(dialect.sink_name, target.qualified, stored)
    if not present:
        run(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(target.dataset)))
        parts = list(ddls)
        if schema.primary_key:
            parts.append(sql.SQL("PRIMARY KEY ({})").format(idents(schema.primary_key)))
        run(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                table_ident(target), sql.SQL(", ").join(parts)
            )
        )
        return []
    added = []
    for column, ddl in zip(columns, ddls, strict=True):
        if column.name not in present:
            run(sql.SQL("ALTER TABLE {} ADD COLUMN {}").format(table_ident(target), ddl))
            added.append(column.name)
    return added


def widen_columns(run: SqlRunner, dialect: SqlDialect, target: SinkTable, columns: Sequence[Column]) -> None:
    """Give existing columns a wider type (every old value fits); the caller checked it widens."""
    for column in columns:
        run(
            sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                table_ident(target), sql.Identifier(column.name), dialect.column_type_ddl(target, column)
            )
        )


def save_checkpoint(run: SqlRunner, dialect: SqlDialect, checkpoint: Checkpoint) -> None:
    """Upsert the checkpoint row (creating the table if missing); call inside the data's transaction."""
    run(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL, "
            "updated_at TIMESTAMPTZ NOT NULL)"
        ).format(dialect.checkpoint_table())
    )
    upsert_checkpoint(run, dialect, checkpoint)


def upsert_checkpoint(run: SqlRunner, dialect: SqlDialect, checkpoint: Checkpoint) -> None:
    """Upsert the checkpoint row into the existing checkpoint table."""
    table = dialect.checkpoint_table()
    run(
        sql.SQL(
            "INSERT INTO {} (key, value, updated_at) VALUES ({p}, {p}, now()) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at"
        ).format(table, p=dialect.param),
        (checkpoint.key, checkpoint.value),
    )


def load_checkpoint(run: SqlRunner, dialect: SqlDialect, key: str) -> str | None:
    exists = run(
        sql.SQL(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = {p} AND table_name = {p}"
        ).format(p=dialect.param),
        (dialect.default_schema, CHECKPOINT_TABLE),
    )
    if not exists:
        return None
    rows = run(
        sql.SQL("SELECT value FROM {} WHERE key = {}").format(dialect.checkpoint_table(), dialect.param),
        (key,),
    )
    return rows[0][0] if rows else None
