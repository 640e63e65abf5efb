"""Data statements shared by the SQL sinks: insert, merge and applying a CDC ChangeSet.

Rows arrive through a staged relation (a registered Arrow table in DuckDB, a COPY-filled temp
table in PostgreSQL); everything after staging is the same SQL for both databases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.sinks.base import (
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    ChangeSet,
    SinkTable,
    WriteResult,
)
from nilus_dagster.sinks.sql_dialect import SqlRunner, idents, table_ident

TARGET_ALIAS = "_nilus_target"
SOURCE_ALIAS = "_nilus_source"
# Staged upsert rows carry the index of their group of identical `_nilus_unchanged` lists.
GROUP_COLUMN = "_nilus_group"

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


def _match(columns: Sequence[str], null_safe: bool) -> sql.Composed:
    operator = sql.SQL(" IS NOT DISTINCT FROM ") if null_safe else sql.SQL(" = ")
    return sql.SQL(" AND ").join(
        sql.Composed([sql.Identifier(TARGET_ALIAS, c), operator, sql.Identifier(SOURCE_ALIAS, c)])
        for c in columns
    )


@dataclass(frozen=True)
class UpsertGroup:
    """Staged upsert rows sharing the same set of unchanged (TOASTed) columns."""

    id: int
    unchanged: frozenset[str]


def group_by_unchanged(upserts: pa.Table) -> tuple[pa.Table, list[UpsertGroup]]:
    """Replace `_nilus_unchanged` by a group index: one upsert statement per distinct set."""
    if UNCHANGED_COLUMN not in upserts.column_names:
        ids = pa.array([0] * upserts.num_rows, pa.int32())
        return upserts.append_column(GROUP_COLUMN, ids), [UpsertGroup(0, frozenset())]
    joined = pc.fill_null(pc.binary_join(upserts[UNCHANGED_COLUMN], "\n"), "")
    keys = pc.unique(joined)
    ids = pc.cast(pc.index_in(joined, value_set=keys), pa.int32())
    staged = upserts.drop_columns([UNCHANGED_COLUMN]).append_column(GROUP_COLUMN, ids)
    groups = [UpsertGroup(i, frozenset(k.split("\n")) - {""}) for i, k in enumerate(keys.to_pylist())]
    return staged, groups


def apply_change_set(
    run: SqlRunner,
    stage: Stager,
    target: SinkTable,
    schema: TableSchema,
    changes: ChangeSet,
    *,
    soft_delete: bool,
) -> WriteResult:
    """Truncate, deletes, upserts — inside the caller's transaction (which adds the checkpoint)."""
    if changes.truncate:
        run(delete_all_statement(target))
    if changes.deletes.num_rows:
        _apply_deletes(run, stage, target, schema, changes.deletes, soft_delete)
    if changes.upserts.num_rows:
        _apply_upserts(run, stage, target, schema, changes.upserts)
    return WriteResult(
        rows=changes.upserts.num_rows + changes.deletes.num_rows,
        bytes=changes.upserts.nbytes + changes.deletes.nbytes,
    )


def _apply_deletes(
    run: SqlRunner, stage: Stager, target: SinkTable, schema: TableSchema, deletes: pa.Table, soft: bool
) -> None:
    # Without a primary key the delete carries the whole old row (replica identity full).
    key = list(schema.primary_key) or [n for n in deletes.column_names if n != LSN_COLUMN]
    source = stage("_nilus_deletes", deletes, [*(schema.column(k) for k in key), _LSN])
    condition = sql.SQL("{} AND {}").format(
        _match(key, null_safe=not schema.primary_key), _lsn_guard(sql.Identifier(SOURCE_ALIAS))
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
        run(_insert_unless_applied(target, select, source, schema.column_names))
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


def _insert_unless_applied(
    target: SinkTable,
    select: Sequence[tuple[str, sql.Composable]],
    source: sql.Composable,
    columns: list[str],
) -> sql.Composed:
    """Insert into a key-less table, skipping rows already there from the same LSN (re-apply)."""
    already = sql.SQL("SELECT 1 FROM {t} AS {ta} WHERE {ta}.{lsn} = {sa}.{lsn} AND {match}").format(
        t=table_ident(target),
        ta=sql.Identifier(TARGET_ALIAS),
        sa=sql.Identifier(SOURCE_ALIAS),
        lsn=sql.Identifier(LSN_COLUMN),
        match=_match(columns, null_safe=True),
    )
    statement = "INSERT INTO {t} ({cols}) SELECT {exprs} FROM {s} AS {sa} WHERE NOT EXISTS ({already})"
    return sql.SQL(statement).format(
        t=table_ident(target),
        cols=idents([name for name, _ in select]),
        exprs=sql.SQL(", ").join(expr for _, expr in select),
        s=source,
        sa=sql.Identifier(SOURCE_ALIAS),
        already=already,
    )
