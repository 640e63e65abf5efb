"""Table schemas, replica identity and sizes from PostgreSQL's catalog.

These functions only run queries: they never commit or roll back, so they can run inside a caller's
snapshot transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from nilus_dagster.schema.table import Column, TableName, TableSchema
from nilus_dagster.sources.errors import SourceError
from nilus_dagster.sources.postgres.partitions import partition_leaves
from nilus_dagster.sources.postgres.types import column_type


class TableNotFound(SourceError):
    def __init__(self, table: TableName, database: str, user: str) -> None:
        self.table = table
        self.database = database
        super().__init__(
            f"table {table} does not exist in database '{database}' (or user '{user}' cannot see it); "
            "check the schema and table name in the pipeline"
        )


@dataclass(frozen=True)
class TableSize:
    """`pages`: the table's current block count (CTID partitions cover 0..pages); `rows_estimate`:
    the planner's row count scaled to those pages (0 when the table was never analyzed)."""

    pages: int
    rows_estimate: int


_RELATION_SQL = """
SELECT c.oid, c.relkind, c.relreplident, c.relpages, c.reltuples::float8,
       pg_relation_size(c.oid) / current_setting('block_size')::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
"""

# One query for all columns: domains resolved to their base type (and typmod), arrays to their
# element type, primary key position of each column. Stored generated columns are left out when
# %(generated)s is false (logical replication before PostgreSQL 18 does not publish them).
_COLUMNS_SQL = """
WITH RECURSIVE attribute AS (
    SELECT a.attnum, a.attname, a.attnotnull, format_type(a.atttypid, a.atttypmod) AS source_type,
           a.atttypid AS type_oid, a.atttypmod AS typmod, false AS domain_not_null
    FROM pg_attribute a
    WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped AND (%(generated)s OR a.attgenerated = '')
    UNION ALL
    SELECT a.attnum, a.attname, a.attnotnull, a.source_type, t.typbasetype,
           CASE WHEN a.typmod <> -1 THEN a.typmod ELSE t.typtypmod END, a.domain_not_null OR t.typnotnull
    FROM attribute a JOIN pg_type t ON t.oid = a.type_oid AND t.typtype = 'd'
), primary_key AS (
    SELECT k.attnum, k.position
    FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
    WHERE i.indrelid = %(oid)s AND i.indisprimary
)
SELECT a.attname, a.attnotnull OR a.domain_not_null, a.source_type, a.typmod,
       base.typname, base_ns.nspname, base.typtype,
       element.typname, element_ns.nspname, element.typtype,
       pk.position
FROM attribute a
JOIN pg_type base ON base.oid = a.type_oid AND base.typtype <> 'd'
JOIN pg_namespace base_ns ON base_ns.oid = base.typnamespace
LEFT JOIN pg_type element_or_domain ON base.typcategory = 'A' AND element_or_domain.oid = base.typelem
LEFT JOIN pg_type element ON element.oid = CASE WHEN element_or_domain.typtype = 'd'
                                                THEN element_or_domain.typbasetype
                                                ELSE element_or_domain.oid END
LEFT JOIN pg_namespace element_ns ON element_ns.oid = element.typnamespace
LEFT JOIN primary_key pk ON pk.attnum = a.attnum
ORDER BY a.attnum
"""


@dataclass(frozen=True)
class _Relation:
    oid: int
    kind: str  # pg_class.relkind: r table, p partitioned table, v view, m materialized view, f foreign
    replica_identity: str
    stats_pages: int
    stats_rows: float
    pages: int


def _relation(conn: psycopg.Connection[Any], table: TableName) -> _Relation:
    row = conn.execute(_RELATION_SQL, (table.schema, table.name)).fetchone()
    if row is None:
        database, user = conn.execute("SELECT current_database(), current_user").fetchone() or ("?", "?")
        raise TableNotFound(table, database, user)
    return _Relation(*row)


def _lookup_name(type_name: str, namespace: str, type_type: str) -> str:
    """The name `types.column_type` looks up: only base types may match a built-in's name."""
    return type_name if type_type == "b" else f"{namespace}.{type_name}"


def read_table_schema(conn: psycopg.Connection[Any], table: TableName, *, generated: bool = True) -> TableSchema:
    """Columns (attnum order, logical types), nullability and primary key of `table`.

    `generated=False` leaves out stored generated columns (what pgoutput publishes before PG 18)."""
    relation = _relation(conn, table)
    columns: list[Column] = []
    key_positions: dict[str, int] = {}
    for (name, not_null, source_type, typmod, type_name, namespace, type_type,
         element_name, element_namespace, element_type_type, key_position) in conn.execute(
            _COLUMNS_SQL, {"oid": relation.oid, "generated": generated}):
        logical = column_type(
            _lookup_name(type_name, namespace, type_type),
            typmod,
            element_type_name=(
                _lookup_name(element_name, element_namespace, element_type_type) if element_name else None
            ),
            is_enum=type_type == "e",
        )
        columns.append(Column(name, logical, nullable=not not_null, source_type=source_type))
        if key_position is not None:
            key_positions[name] = key_position
    primary_key = tuple(sorted(key_positions, key=key_positions.__getitem__))
    return TableSchema(table, tuple(columns), primary_key)


def replica_identity(conn: psycopg.Connection[Any], table: TableName) -> str:
    """`pg_class.relreplident`: 'd' default (primary key), 'n' nothing, 'f' full, 'i' index."""
    return _relation(conn, table).replica_identity


def relation_kind(conn: psycopg.Connection[Any], table: TableName) -> str:
    """`pg_class.relkind`: 'r' table, 'p' partitioned table, 'v' view, 'm' materialized view, 'f' foreign."""
    return _relation(conn, table).kind


def generated_columns(conn: psycopg.Connection[Any], table: TableName) -> tuple[str, ...]:
    """The stored generated columns of `table`, in attnum order."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = 's' ORDER BY attnum",
        (_relation(conn, table).oid,),
    ).fetchall()
    return tuple(name for (name,) in rows)


def table_size(conn: psycopg.Connection[Any], table: TableName) -> TableSize:
    """Real block count (from the relation's size on disk) and an estimated row count.

    A partitioned table holds no blocks itself (its `relpages` is 0): its size is the sum of its
    leaf partitions' (each leaf has its own CTID space, so snapshots plan per leaf)."""
    relation = _relation(conn, table)
    if relation.kind == "p":
        sizes = [table_size(conn, leaf.name) for leaf in partition_leaves(conn, table) if leaf.kind == "r"]
        return TableSize(sum(s.pages for s in sizes), sum(s.rows_estimate for s in sizes))
    if relation.stats_rows < 0:  # never vacuumed or analyzed
        rows = 0.0
    elif relation.stats_pages > 0:  # the planner's density applied to the current size
        rows = relation.stats_rows / relation.stats_pages * relation.pages
    else:
        rows = relation.stats_rows
    return TableSize(pages=relation.pages, rows_estimate=round(rows))
