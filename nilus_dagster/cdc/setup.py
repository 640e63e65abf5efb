"""Before streaming: check the source can do CDC, and keep the pipeline's publication current."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, carried_schema
from nilus_dagster.sources.postgres.catalog import (
    generated_columns,
    read_table_schema,
    relation_kind,
    replica_identity,
)
from nilus_dagster.sources.postgres.partitions import Leaf, ancestors, partition_leaves


class CdcSetupError(Exception):
    """The source cannot stream this pipeline yet; the message says what to change."""


def replication_name(prefix: str, *parts: str) -> str:
    """A slot/publication name unique to its parts: lowercase, at most 63 characters.

    Names that are not already lowercase or would be too long get a hash of the exact parts, so
    two pipelines never share a slot. Slots are per cluster, so their parts include the database.
    """
    plain = "_".join((prefix, *parts))
    safe = re.sub(r"[^a-z0-9_]", "_", plain.lower())
    if safe == plain and len(plain) <= 63:
        return plain
    digest = hashlib.sha1("\0".join(parts).encode()).hexdigest()[:8]
    return f"{safe[:54]}_{digest}"


@dataclass(frozen=True)
class CdcTable:
    """A source table as CDC sees it. A table without a key (REPLICA IDENTITY FULL) keeps an empty
    primary key: its rows are matched on all their columns.

    `schema` holds the published columns only: stored generated columns (`generated_columns`) are
    not sent by pgoutput before PostgreSQL 18, so CDC leaves them out of the snapshot and the sink
    alike rather than fill them in one and NULL in the other. A partitioned table (`partitioned`)
    is published under its own name (publish_via_partition_root) and snapshotted leaf by leaf."""

    schema: TableSchema
    identity: str  # pg_class.relreplident: d, n, f, i
    partitioned: bool = False
    generated_columns: tuple[str, ...] = ()

    @property
    def name(self) -> TableName:
        return self.schema.table

    def carried_for(self, sink: Sink) -> CdcTable:
        """The table with its values carried the way `sink` holds them exactly (`carried_schema`)."""
        return replace(self, schema=carried_schema(sink, self.schema))


def _setting(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def check_server(conn: psycopg.Connection[Any], slot_name: str) -> None:
    """wal_level, the role's replication privilege, and a free slot when one must be created."""
    if _setting(conn, "wal_level") != "logical":
        raise CdcSetupError(
            "the source's wal_level is not logical: run ALTER SYSTEM SET wal_level = logical and restart PostgreSQL"
        )
    row = conn.execute("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (row and row[0]):
        raise CdcSetupError(
            "the source role may not replicate: ALTER ROLE <user> WITH REPLICATION (and grant SELECT "
            "on the pipeline's tables)"
        )
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE slot_name = %s), count(*), current_setting('max_replication_slots')::int "
        "FROM pg_replication_slots",
        (slot_name,),
    ).fetchone()
    assert row is not None
    exists, used, limit = row
    if not exists and used >= limit:
        raise CdcSetupError(
            f"no free replication slot ({used} of max_replication_slots = {limit} in use): drop an unused "
            "slot or raise max_replication_slots"
        )


def resolve_tables(
    conn: psycopg.Connection[Any], tables: Sequence[TableName], declared_keys: Mapping[TableName, Sequence[str]]
) -> list[CdcTable]:
    """Each table's schema and match key; refuses tables whose deletes could not be identified,
    and a partition listed together with its partitioned parent (its rows would land twice)."""
    _refuse_partition_with_parent(conn, tables)
    resolved = []
    for table in tables:
        kind = relation_kind(conn, table)
        schema = read_table_schema(conn, table, generated=False)
        identity = replica_identity(conn, table)
        if table in declared_keys:
            schema = schema.with_primary_key(tuple(declared_keys[table]))
        if kind == "p":
            _check_partitioned(table, schema, identity, partition_leaves(conn, table))
            identity = "d" if schema.primary_key else "f"
        else:
            _refuse_inheritance_children(conn, table)
            has_identity = (identity == "d" and _has_primary_key(conn, table)) or identity in ("f", "i")
            if not has_identity:
                raise CdcSetupError(
                    f"{table} has no primary key and REPLICA IDENTITY {_IDENTITY_NAMES[identity]}, so its updates "
                    f"and deletes cannot be matched: ALTER TABLE {table} REPLICA IDENTITY FULL (then declare "
                    "primary_key if some columns identify a row), or add a primary key"
                )
        resolved.append(CdcTable(schema, identity, kind == "p", generated_columns(conn, table)))
    return resolved


def check_leaf(parent: TableName, schema: TableSchema, leaf: Leaf) -> None:
    """A leaf partition must publish its updates and deletes in a form the parent's key matches.

    Replica identity is per partition: with a primary key on the parent each leaf's DEFAULT sends
    the key (FULL sends the whole row, also fine); without one every leaf must be FULL."""
    if leaf.kind != "r":
        raise CdcSetupError(
            f"{parent}'s partition {leaf.name} is a foreign table: its changes are not in this server's WAL, so "
            f"CDC cannot stream them; detach it or stream {parent}'s other partitions as separate tables"
        )
    keyed = bool(schema.primary_key)
    if leaf.replica_identity == "f" or (keyed and leaf.replica_identity == "d" and leaf.has_primary_key):
        return
    identity = _IDENTITY_NAMES[leaf.replica_identity]
    if keyed:
        fix = f"ALTER TABLE {leaf.name} REPLICA IDENTITY DEFAULT (it has the parent's primary key) or FULL"
    else:
        fix = f"ALTER TABLE {leaf.name} REPLICA IDENTITY FULL (on every partition: replica identity is per partition)"
    raise CdcSetupError(
        f"{parent}'s partition {leaf.name} has REPLICA IDENTITY {identity}, so its updates and deletes cannot be "
        f"matched to {parent}'s rows: {fix}"
    )


def _check_partitioned(parent: TableName, schema: TableSchema, identity: str, leaves: list[Leaf]) -> None:
    """Without a key the parent itself must be FULL too: published via the root, a change's old row
    is flagged by the root's replica identity, and only FULL marks it as the whole row."""
    if not schema.primary_key and identity != "f":
        raise CdcSetupError(
            f"{parent} is partitioned without a primary key and has REPLICA IDENTITY {_IDENTITY_NAMES[identity]}, so "
            f"its updates and deletes cannot be matched: ALTER TABLE {parent} REPLICA IDENTITY FULL and the same on "
            "every partition (replica identity is per partition), or add a primary key"
        )
    for leaf in leaves:
        check_leaf(parent, schema, leaf)


def _refuse_partition_with_parent(conn: psycopg.Connection[Any], tables: Sequence[TableName]) -> None:
    listed = set(tables)
    for table in tables:
        for parent in ancestors(conn, table):
            if parent in listed:
                raise CdcSetupError(
                    f"{table} is a partition of {parent}, and both are in the pipeline: its rows would land "
                    f"twice (in both sink tables); list only {parent} (its partitions are included) or only "
                    "the partitions"
                )


def _refuse_inheritance_children(conn: psycopg.Connection[Any], table: TableName) -> None:
    """A table with (legacy INHERITS) children reads their rows too, but publishes only its own."""
    children = partition_leaves(conn, table)
    if children:
        names = ", ".join(str(c.name) for c in children[:5])
        raise CdcSetupError(
            f"{table} has inheritance children ({names}): a snapshot would read their rows while the stream "
            f"publishes only {table}'s own, so the sink would drift; stream each table separately (a partitioned "
            "table, declared PARTITION BY, is supported)"
        )


_IDENTITY_NAMES = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _has_primary_key(conn: psycopg.Connection[Any], table: TableName) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = to_regclass(%s) AND indisprimary)",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchone()
    return bool(row and row[0])


def publication_tables(conn: psycopg.Connection[Any], publication: str) -> set[TableName] | None:
    """The tables added to the publication (a partitioned table as itself, not its partitions), or
    None when it does not exist."""
    if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
        return None
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
        "JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = %s",
        (publication,),
    ).fetchall()
    return {TableName(s, t) for s, t in rows}


def _via_root_missing(conn: psycopg.Connection[Any], publication: str) -> list[TableName]:
    """Partitioned tables the publication has been publishing under their partitions' names."""
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_publication p JOIN pg_publication_rel r ON r.prpubid = p.oid "
        "JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE p.pubname = %s AND NOT p.pubviaroot AND c.relkind = 'p'",
        (publication,),
    ).fetchall()
    return [TableName(s, t) for s, t in rows]


def sync_publication(
    conn: psycopg.Connection[Any], publication: str, tables: Sequence[TableName], *, slot_exists: bool = False
) -> tuple[list[TableName], list[TableName]]:
    """Create the publication or add/drop tables so it matches; returns (added, removed).

    The publication publishes partitioned tables under their own name (publish_via_partition_root),
    so one sink table receives every partition's changes, also of partitions attached later. An
    existing publication without that option gets it; if it already held a partitioned table while
    a slot decoded it, those changes came under the partitions' names and were not applied: refused.
    """
    current = publication_tables(conn, publication)
    wanted = set(tables)
    name = sql.Identifier(publication)
    if current is None:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                name, sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
            )
        )
        return sorted(wanted), []
    published_under_leaves = _via_root_missing(conn, publication)
    if published_under_leaves and slot_exists:
        raise CdcSetupError(
            f"publication {publication} publishes {', '.join(map(str, published_under_leaves))} without "
            "publish_via_partition_root, so its changes arrived under the partitions' names and were not applied; "
            "reset the pipeline (job <tenant>__<pipeline>__reset) to re-snapshot it"
        )
    viaroot = conn.execute("SELECT pubviaroot FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if viaroot is not None and not viaroot[0]:
        conn.execute(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(name))
    added, removed = sorted(wanted - current), sorted(current - wanted)
    for table in added:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(name, sql.Identifier(table.schema, table.name))
        )
    for table in removed:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(name, sql.Identifier(table.schema, table.name))
        )
    return added, removed
