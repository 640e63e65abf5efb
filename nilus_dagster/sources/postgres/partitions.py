"""Partition and inheritance trees from PostgreSQL's catalog.

These are plain MVCC queries on `pg_inherits` (not `pg_partition_tree()`, which reads the latest
catalog): inside a `SET TRANSACTION SNAPSHOT` transaction they answer as of that snapshot, so the
leaves a snapshot reads are exactly the leaves whose rows that snapshot sees under the parent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.schema.table import TableName


@dataclass(frozen=True, order=True)
class Leaf:
    """A partition that holds rows: `kind` 'r' (a table) or 'f' (a foreign table)."""

    name: TableName
    kind: str
    replica_identity: str  # pg_class.relreplident of the leaf (replica identity is per partition)
    has_primary_key: bool


_LEAVES_SQL = """
WITH RECURSIVE tree AS (
    SELECT i.inhrelid AS oid FROM pg_inherits i WHERE i.inhparent = %(oid)s::regclass
    UNION ALL
    SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid
)
SELECT n.nspname, c.relname, c.relkind, c.relreplident,
       EXISTS (SELECT 1 FROM pg_index x WHERE x.indrelid = c.oid AND x.indisprimary)
FROM tree JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'f')
ORDER BY n.nspname, c.relname
"""

_ANCESTORS_SQL = """
WITH RECURSIVE up AS (
    SELECT i.inhparent AS oid FROM pg_inherits i WHERE i.inhrelid = %(oid)s::regclass
    UNION ALL
    SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
)
SELECT n.nspname, c.relname FROM up JOIN pg_class c ON c.oid = up.oid JOIN pg_namespace n ON n.oid = c.relnamespace
"""


def _regclass(conn: psycopg.Connection[Any], table: TableName) -> str:
    return sql.Identifier(table.schema, table.name).as_string(conn)


def partition_leaves(conn: psycopg.Connection[Any], table: TableName) -> list[Leaf]:
    """The leaf partitions of a partitioned table (at any depth), sorted by name; [] for others."""
    rows = conn.execute(_LEAVES_SQL, {"oid": _regclass(conn, table)}).fetchall()
    return [Leaf(TableName(schema, name), kind, identity, has_key) for schema, name, kind, identity, has_key in rows]


def ancestors(conn: psycopg.Connection[Any], table: TableName) -> list[TableName]:
    """The partitioned (or inheritance) parents of `table`, nearest first."""
    rows = conn.execute(_ANCESTORS_SQL, {"oid": _regclass(conn, table)}).fetchall()
    return [TableName(schema, name) for schema, name in rows]
