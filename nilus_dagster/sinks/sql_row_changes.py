"""Statements for the ChangeSet cases beyond upsert-by-key, shared by the SQL sinks.

- Tables without a primary key are multisets: a delete removes exactly `_nilus_count` identical
  live rows (picked by the database's physical row id), an insert adds one row per staged row.
- Rows whose key changed while a TOASTed value stayed unchanged take that value from the sink's
  row at the old key: captured before the deletes, written after the upserts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.sinks.base import (
    COUNT_COLUMN,
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    SinkTable,
    old_key_column,
)
from nilus_dagster.sinks.sql_dialect import SqlRunner, idents, table_ident

TARGET_ALIAS = "_nilus_target"
SOURCE_ALIAS = "_nilus_source"
GROUP_COLUMN = "_nilus_group"
ROW_COLUMN = "_nilus_row"  # a staged row's position: identical rows to delete form one group
CARRY_TABLE = "_nilus_carry"

_LSN = Column(LSN_COLUMN, ColumnType("int64"))
_COUNT = Column(COUNT_COLUMN, ColumnType("int64"))
_ROW = Column(ROW_COLUMN, ColumnType("int64"))
_GROUP = Column(GROUP_COLUMN, ColumnType("int32"))

Stage = Callable[[str, pa.Table, Sequence[Column]], sql.Composable]


@dataclass(frozen=True)
class UpsertGroup:
    """Staged rows sharing the same set of unchanged (TOASTed) columns."""

    id: int
    unchanged: frozenset[str]


def group_by_unchanged(rows: pa.Table) -> tuple[pa.Table, list[UpsertGroup]]:
    """Replace `_nilus_unchanged` by a group index: one statement per distinct set."""
    if UNCHANGED_COLUMN not in rows.column_names:
        ids = pa.array([0] * rows.num_rows, pa.int32())
        return rows.append_column(GROUP_COLUMN, ids), [UpsertGroup(0, frozenset())]
    joined = pc.fill_null(pc.binary_join(rows[UNCHANGED_COLUMN], "\n"), "")
    keys = pc.unique(joined)
    ids = pc.cast(pc.index_in(joined, value_set=keys), pa.int32())
    staged = rows.drop_columns([UNCHANGED_COLUMN]).append_column(GROUP_COLUMN, ids)
    groups = [UpsertGroup(i, frozenset(k.split("\n")) - {""}) for i, k in enumerate(keys.to_pylist())]
    return staged, groups


def match(
    columns: Sequence[str], *, null_safe: bool, left: str = TARGET_ALIAS, right: str = SOURCE_ALIAS
) -> sql.Composed:
    operator = sql.SQL(" IS NOT DISTINCT FROM ") if null_safe else sql.SQL(" = ")
    return sql.SQL(" AND ").join(
        sql.Composed([sql.Identifier(left, c), operator, sql.Identifier(right, c)]) for c in columns
    )


# -- tables without a primary key ---------------------------------------------------------------


def delete_copies(
    run: SqlRunner, stage: Stage, target: SinkTable, schema: TableSchema, deletes: pa.Table, *, row_id: str, soft: bool
) -> None:
    """Remove (or soft-delete) `_nilus_count` live rows equal to each staged row, no more."""
    staged = deletes.append_column(ROW_COLUMN, pa.array(range(deletes.num_rows), type=pa.int64()))
    source = stage("_nilus_deletes", staged, [*schema.columns, _LSN, _COUNT, _ROW])
    ta, sa, rid = sql.Identifier(TARGET_ALIAS), sql.Identifier(SOURCE_ALIAS), sql.Identifier(row_id)
    picked = sql.SQL(
        "SELECT _nilus_rid, _nilus_lsn FROM (SELECT {ta}.{rid} AS _nilus_rid, {sa}.{lsn} AS _nilus_lsn, "
        "{sa}.{count} AS _nilus_n, row_number() OVER (PARTITION BY {sa}.{row} ORDER BY {ta}.{rid}) AS _nilus_rn "
        "FROM {t} AS {ta} JOIN {s} AS {sa} ON {match} WHERE {ta}.{deleted} IS NOT TRUE) AS _nilus_all "
        "WHERE _nilus_rn <= _nilus_n"
    ).format(
        ta=ta,
        sa=sa,
        rid=rid,
        lsn=sql.Identifier(LSN_COLUMN),
        count=sql.Identifier(COUNT_COLUMN),
        row=sql.Identifier(ROW_COLUMN),
        t=table_ident(target),
        s=source,
        match=match(schema.column_names, null_safe=True),
        deleted=sql.Identifier(DELETED_COLUMN),
    )
    if soft:
        statement = sql.SQL(
            "UPDATE {t} SET {deleted} = TRUE, {op} = 'D', {lsn} = _nilus_picked._nilus_lsn, {synced} = now() "
            "FROM ({picked}) AS _nilus_picked WHERE {t}.{rid} = _nilus_picked._nilus_rid"
        )
    else:
        statement = sql.SQL(
            "DELETE FROM {t} USING ({picked}) AS _nilus_picked WHERE {t}.{rid} = _nilus_picked._nilus_rid"
        )
    run(
        statement.format(
            t=table_ident(target),
            picked=picked,
            rid=rid,
            deleted=sql.Identifier(DELETED_COLUMN),
            op=sql.Identifier(OP_COLUMN),
            lsn=sql.Identifier(LSN_COLUMN),
            synced=sql.Identifier(SYNCED_AT_COLUMN),
        )
    )


def insert_rows(
    target: SinkTable, select: Sequence[tuple[str, sql.Composable]], source: sql.Composable
) -> sql.Composed:
    """One sink row per staged row (a key-less table keeps identical rows apart)."""
    return sql.SQL("INSERT INTO {t} ({cols}) SELECT {exprs} FROM {s} AS {sa}").format(
        t=table_ident(target),
        cols=idents([name for name, _ in select]),
        exprs=sql.SQL(", ").join(expr for _, expr in select),
        s=source,
        sa=sql.Identifier(SOURCE_ALIAS),
    )


# -- unchanged TOASTed values under a changed key -----------------------------------------------


def capture_carried(
    run: SqlRunner, stage: Stage, target: SinkTable, schema: TableSchema, moved: pa.Table
) -> list[UpsertGroup]:
    """Before the deletes: copy the carried columns of each moved row's old-key row aside."""
    staged, groups = group_by_unchanged(moved)
    key = list(schema.primary_key)
    old_key = [Column(old_key_column(k), schema.column(k).type) for k in key]
    source = stage("_nilus_moved", staged, [*(schema.column(k) for k in key), *old_key, _LSN, _GROUP])
    carried = sorted({c for g in groups for c in g.unchanged if c in schema.column_names})
    run(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(CARRY_TABLE)))
    run(
        sql.SQL(
            "CREATE TEMP TABLE {carry} AS SELECT {keys}, {sa}.{lsn}, {sa}.{group}, {values} "
            "FROM {s} AS {sa} JOIN {t} AS {ta} ON {on}"
        ).format(
            carry=sql.Identifier(CARRY_TABLE),
            keys=idents(key, SOURCE_ALIAS),
            sa=sql.Identifier(SOURCE_ALIAS),
            lsn=sql.Identifier(LSN_COLUMN),
            group=sql.Identifier(GROUP_COLUMN),
            values=idents(carried, TARGET_ALIAS),
            s=source,
            t=table_ident(target),
            ta=sql.Identifier(TARGET_ALIAS),
            on=sql.SQL(" AND ").join(
                sql.SQL("{} = {}").format(
                    sql.Identifier(TARGET_ALIAS, k), sql.Identifier(SOURCE_ALIAS, old_key_column(k))
                )
                for k in key
            ),
        )
    )
    return groups


def write_carried(run: SqlRunner, target: SinkTable, schema: TableSchema, groups: Sequence[UpsertGroup]) -> None:
    """After the upserts: the rows at the new keys get the captured values (same change only)."""
    key = list(schema.primary_key)
    carry = sql.Identifier(CARRY_TABLE)
    for group in groups:
        columns = sorted(c for c in group.unchanged if c in schema.column_names)
        if not columns:
            continue
        group_id = group.id
        run(
            sql.SQL(
                "UPDATE {t} SET {sets} FROM {carry} WHERE {on} AND {t}.{lsn} = {carry}.{lsn} AND {carry}.{g} = {id}"
            ).format(
                t=table_ident(target),
                sets=sql.SQL(", ").join(
                    sql.SQL("{} = {}.{}").format(sql.Identifier(c), carry, sql.Identifier(c)) for c in columns
                ),
                carry=carry,
                on=sql.SQL(" AND ").join(
                    sql.SQL("{}.{} = {}.{}").format(table_ident(target), sql.Identifier(k), carry, sql.Identifier(k))
                    for k in key
                ),
                lsn=sql.Identifier(LSN_COLUMN),
                g=sql.Identifier(GROUP_COLUMN),
                id=sql.Literal(group_id),
            )
        )
    run(sql.SQL("DROP TABLE {}").format(carry))
