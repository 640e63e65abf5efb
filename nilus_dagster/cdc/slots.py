"""Replication slots and the cluster's identity, through an ordinary connection; the replication
layer's errors.

`slot_status` reads pg_replication_slots, `drop_slot` drops, `system_identifier` and
`ensure_same_system` tell one cluster from another, `fetch_type_info` describes type OIDs for
`pgoutput.relation_schema()`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from nilus_dagster.cdc.lsn import Lsn, parse_lsn
from nilus_dagster.cdc.pgoutput import PgTypeInfo


class ReplicationError(RuntimeError):
    """Base class of the replication layer's errors."""


class SlotLost(ReplicationError):
    """The replication slot does not exist (dropped) or was invalidated: the change history is gone
    and the pipeline needs a new snapshot."""


class SlotInUse(ReplicationError):
    """Another connection is streaming from the slot (e.g. a previous run that is still alive)."""


class ServerClosed(ReplicationError):
    """The server ended the replication connection (shutdown, terminated backend, network)."""


class SystemMismatch(ReplicationError):
    """The server is a different PostgreSQL cluster than the one the recorded state belongs to."""


@dataclass(frozen=True, slots=True)
class SlotStatus:
    exists: bool
    active: bool = False
    wal_status: str | None = None  # reserved / extended / unreserved / lost
    restart_lsn: Lsn | None = None
    confirmed_flush_lsn: Lsn | None = None
    retained_wal_bytes: int | None = None  # WAL the server keeps for this slot


_SLOT_STATUS_SQL = """
SELECT active, wal_status, restart_lsn::text, confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()
"""


def slot_status(conn: psycopg.Connection, slot: str) -> SlotStatus:
    """The slot's state in pg_replication_slots of the connection's database."""
    row = conn.execute(_SLOT_STATUS_SQL, [slot]).fetchone()
    if row is None:
        return SlotStatus(exists=False)
    active, wal_status, restart, confirmed, retained = row
    return SlotStatus(
        exists=True,
        active=active,
        wal_status=wal_status,
        restart_lsn=parse_lsn(restart) if restart else None,
        confirmed_flush_lsn=parse_lsn(confirmed) if confirmed else None,
        retained_wal_bytes=retained,
    )


def slot_exists(conn: psycopg.Connection, slot: str) -> bool:
    return slot_status(conn, slot).exists


def drop_slot(conn: psycopg.Connection, slot: str, *, missing_ok: bool = True) -> bool:
    """Drop the slot; returns False when it did not exist (and `missing_ok`)."""
    if not slot_exists(conn, slot):
        if missing_ok:
            return False
        raise SlotLost(f"replication slot '{slot}' does not exist")
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    except psycopg.errors.ObjectInUse as error:
        raise SlotInUse(f"replication slot '{slot}' is in use: {error}") from error
    return True


def system_identifier(conn: psycopg.Connection) -> str:
    """The cluster's unique identifier (changes when a cluster is re-initialised, not on restart)."""
    row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert row is not None
    return row[0]


def ensure_same_system(conn: psycopg.Connection, expected: str) -> None:
    """Raise SystemMismatch when offsets recorded on cluster `expected` would be applied elsewhere."""
    actual = system_identifier(conn)
    if actual != expected:
        raise SystemMismatch(
            f"the source is PostgreSQL system {actual}, but the saved CDC state belongs to system "
            f"{expected}: the LSNs would be meaningless there; re-snapshot the pipeline"
        )


# Domains resolve to their base type (as the catalog reader does), so a column's type is the same
# whether it was read from the catalog at snapshot time or from a Relation message.
_TYPE_SQL = """
SELECT t.oid, coalesce(b.typname, t.typname), coalesce(eb.typname, e.typname),
       coalesce(b.typtype, t.typtype) = 'e'
FROM pg_type t
LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
LEFT JOIN pg_type e ON e.oid = coalesce(b.typelem, t.typelem) AND coalesce(b.typcategory, t.typcategory) = 'A'
LEFT JOIN pg_type eb ON e.typtype = 'd' AND eb.oid = e.typbasetype
WHERE t.oid = ANY(%s)
"""


def fetch_type_info(conn: psycopg.Connection, type_oids: Iterable[int]) -> dict[int, PgTypeInfo]:
    """pg_type facts for `relation_schema()` about OIDs missing from `BUILTIN_TYPES` (enums, domains,
    extension types...)."""
    oids = sorted(set(type_oids))
    if not oids:
        return {}
    rows = conn.execute(_TYPE_SQL, [oids]).fetchall()
    return {oid: PgTypeInfo(name, element, is_enum) for oid, name, element, is_enum in rows}
