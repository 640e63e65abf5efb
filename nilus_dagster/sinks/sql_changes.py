"""Data statements shared by the SQL sinks: insert, merge and applying a CDC ChangeSet.

Rows arrive through a staged relation (a registered Arrow table in DuckDB, a COPY-filled temp
table in PostgreSQL); everything after staging is the same SQL for both databases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pyarrow as pa
from psycopg import sql

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.sinks.base import (
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    ChangeSet,
    SinkTable,
    WriteResult,
)
from nilus_dagster.sinks.sql_dialect import SqlRunner, idents, table_ident
from nilus_dagster.sinks.sql_row_changes import (
    GROUP_COLUMN,
    SOURCE_ALIAS,
    TARGET_ALIAS,
    capture_carried,
    delete_copies,
    group_by_unchanged,
    insert_rows,
    match,
    write_carried,
)

_LSN = Column(LSN_COLUMN, ColumnType("int64"))
_OP = Column(OP_COLUMN, ColumnType("text"))
_GROUP = Column(GROUP_COLUMN, ColumnType("int32"))
_TRUE = sql.SQL("TRUE")


class Stager(Protocol):
    """Makes `table` (holding exactly `columns`) readable as a relation named `name`."""

    def __call__(self, name: str, table: pa.Table, columns: Sequence[Column]) -> sql.Composable: ...


def insert_statement(target: SinkTable, columns: Sequence[str], source: sql.Composable) -> sql.Composed:
    return sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM {s}").format(
        t=table_ident(target), c=idents(columns), s=source
    )


def upsert_statement(
    target: SinkTable,
    select: Sequence[tuple[str, sql.Composable]],
    source: sql.Composable,
    key: Sequence[str],
    update: Sequence[str],
    *,
    where: sql.Composable = _TRUE,
    lsn_guard: bool = False,
) -> sql.Composed:
    """INSERT ... SELECT ... ON CONFLICT (key) DO UPDATE the `update` columns.

    `select` pairs each target column with its expression over `_nilus_source`. With `lsn_guard`
    a row already at a newer LSN is left alone, so an older change re-applied never regresses it.
    """
    conflict = sql.SQL("DO NOTHING")
    if update:
        conflict = sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in update)
        )
        if lsn_guard:
            conflict = sql.SQL("{} WHERE {}").format(conflict, _lsn_guard(sql.SQL("EXCLUDED")))
    return sql.SQL(
        "INSERT INTO {t} AS {ta} ({cols}) SELECT {exprs} FROM {s} AS {sa} WHERE {where} "
        "ON CONFLICT ({key}) {conflict}"
    ).format(
        t=table_ident(target),
        ta=sql.Identifier(TARGET_ALIAS),
        cols=idents([name for name, _ in select]),
        exprs=sql.SQL(", ").join(expr for _, expr in select),
        s=source,
        sa=sql.Identifier(SOURCE_ALIAS),
        where=where,
        key=idents(key),
        conflict=conflict,
    )


def merge_statement(target: SinkTable, schema: TableSchema, source: sql.Composable) -> sql.Composed:
    """Upsert the staged rows by primary key (batch `merge`)."""
    select = [(c, sql.Identifier(SOURCE_ALIAS, c)) for c in schema.column_names]
    update = [c for c in schema.column_names if c not in schema.primary_key]
    return upsert_statement(target, select, source, schema.primary_key, update)


def delete_all_statement(target: SinkTable) -> sql.Composed:
    """DELETE (not TRUNCATE): MVCC-safe, readers keep seeing the old rows until commit."""
    return sql.SQL("DELETE FROM {}").format(table_ident(target))


def _lsn_guard(source: sql.Composable) -> sql.Composed:
    target_lsn = sql.Identifier(TARGET_ALIAS, LSN_COLUMN)
    return sql.SQL("({t} IS NULL OR {t} <= {s}.{lsn})").format(
        t=target_lsn, s=source, lsn=sql.Identifier(LSN_COLUMN)
    )


def apply_change_set(
    run: SqlRunner,
    stage: Stager,
    target: SinkTable,
    schema: TableSchema,
    changes: ChangeSet,
    *,
    soft_delete: bool,
    row_id: str,
) -> WriteResult:
    """Truncate, deletes, upserts — inside the caller's transaction (which adds the checkpoint).

    `row_id` is the dialect's physical row id, used to delete exactly N of identical rows in a
    table without a primary key. Moved rows' unchanged values are captured before the deletes.
    """
    if changes.truncate:
        run(delete_all_statement(target))
    carried = None
    if changes.moved is not None and changes.moved.num_rows and schema.primary_key:
        carried = capture_carried(run, stage, target, schema, changes.moved)
    if changes.deletes.num_rows:
        if schema.primary_key:
            _apply_deletes(run, stage, target, schema, changes.deletes, soft_delete)
        else:
            delete_copies(run, stage, target, schema, changes.deletes, row_id=row_id, soft=soft_delete)
    if changes.upserts.num_rows:
        _apply_upserts(run, stage, target, schema, changes.upserts)
    if carried is not None:
        write_carried(run, target, schema, carried)
    return WriteResult(
        rows=changes.upserts.num_rows + changes.deletes.num_rows,
        bytes=changes.upserts.nbytes + changes.deletes.nbytes,
    )


def _apply_deletes(
    run: SqlRunner, stage: Stager, target: SinkTable, schema: TableSchema, deletes: pa.Table, soft: bool
) -> None:
    key = list(schema.primary_key)
    source = stage("_nilus_deletes", deletes, [*(schema.column(k) for k in key), _LSN])
    condition = sql.SQL("{} AND {}").format(
        match(key, null_safe=False), _lsn_guard(sql.Identifier(SOURCE_ALIAS))
    )
    if soft:
        statement = sql.SQL(
            "UPDATE {t} AS {ta} SET {deleted} = TRUE, {op} = 'D', {lsn} = {sa}.{lsn}, {synced} = now() "
            "FROM {s} AS {sa} WHERE {cond}"
        )
    else:
        statement = sql.SQL("DELETE FROM {t} AS {ta} USING {s} AS {sa} WHERE {cond}")
    run(
        statement.format(
            t=table_ident(target),
            ta=sql.Identifier(TARGET_ALIAS),
            s=source,
            sa=sql.Identifier(SOURCE_ALIAS),
            cond=condition,
            deleted=sql.Identifier(DELETED_COLUMN),
            op=sql.Identifier(OP_COLUMN),
            lsn=sql.Identifier(LSN_COLUMN),
            synced=sql.Identifier(SYNCED_AT_COLUMN),
        )
    )


def _apply_upserts(
    run: SqlRunner, stage: Stager, target: SinkTable, schema: TableSchema, upserts: pa.Table
) -> None:
    staged, groups = group_by_unchanged(upserts)
    source = stage("_nilus_upserts", staged, [*schema.columns, _LSN, _OP, _GROUP])
    src = sql.Identifier(SOURCE_ALIAS)
    select: list[tuple[str, sql.Composable]] = [
        *((c, sql.SQL("{}.{}").format(src, sql.Identifier(c))) for c in schema.column_names),
        (LSN_COLUMN, sql.SQL("{}.{}").format(src, sql.Identifier(LSN_COLUMN))),
        (OP_COLUMN, sql.SQL("{}.{}").format(src, sql.Identifier(OP_COLUMN))),
        (SYNCED_AT_COLUMN, sql.SQL("now()")),
        (DELETED_COLUMN, sql.SQL("FALSE")),
    ]
    if not schema.primary_key:
        run(insert_rows(target, select, source))
        return
    metadata = [LSN_COLUMN, OP_COLUMN, SYNCED_AT_COLUMN, DELETED_COLUMN]
    for group in groups:
        update = [c for c in schema.column_names if c not in schema.primary_key and c not in group.unchanged]
        where = sql.SQL("{} = {}").format(sql.Identifier(SOURCE_ALIAS, GROUP_COLUMN), sql.Literal(group.id))
        run(
            upsert_statement(
                target, select, source, schema.primary_key, update + metadata, where=where, lsn_guard=True
            )
        )
