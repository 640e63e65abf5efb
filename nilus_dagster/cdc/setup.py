"""Before streaming: check the source can do CDC, and keep the pipeline's publication current."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sources.postgres.catalog import read_table_schema, replica_identity


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
    primary key: its rows are matched on all their columns."""

    schema: TableSchema
    identity: str  # pg_class.relreplident: d, n, f, i

    @property
    def name(self) -> TableName:
        return self.schema.table


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
    """Each table's schema and match key; refuses tables whose deletes could not be identified."""
    resolved = []
    for table in tables:
        schema = read_table_schema(conn, table)
        identity = replica_identity(conn, table)
        if table in declared_keys:
            schema = schema.with_primary_key(tuple(declared_keys[table]))
        has_identity = (identity == "d" and _has_primary_key(conn, table)) or identity in ("f", "i")
        if not has_identity:
            raise CdcSetupError(
                f"{table} has no primary key and REPLICA IDENTITY {_IDENTITY_NAMES[identity]}, so its updates "
                f"and deletes cannot be matched: ALTER TABLE {table} REPLICA IDENTITY FULL (then declare "
                "primary_key if some columns identify a row), or add a primary key"
            )
        resolved.append(CdcTable(schema, identity))
    return resolved


_IDENTITY_NAMES = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "USING INDEX"}


def _has_primary_key(conn: psycopg.Connection[Any], table: TableName) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = to_regclass(%s) AND indisprimary)",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchone()
    return bool(row and row[0])


def publication_tables(conn: psycopg.Connection[Any], publication: str) -> set[TableName] | None:
    """The publication's tables, or None when it does not exist."""
    if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
        return None
    rows = conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (publication,)
    ).fetchall()
    return {TableName(s, t) for s, t in rows}


def sync_publication(
    conn: psycopg.Connection[Any], publication: str, tables: Sequence[TableName]
) -> tuple[list[TableName], list[TableName]]:
    """Create the publication or add/drop tables so it matches; returns (added, removed)."""
    current = publication_tables(conn, publication)
    wanted = set(tables)
    name = sql.Identifier(publication)
    if current is None:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                name, sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
            )
        )
        return sorted(wanted), []
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
