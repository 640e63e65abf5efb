"""Resume an interrupted initial snapshot of a keyed table exactly, keeping its done partitions.

The first snapshot S1 (slot point L1) is gone after a crash. The remaining partitions are read
inside a temporary slot's exported snapshot S2 (point L2) and merged by key, their rows tagged
L2; the table's stream starts at L1, and the LSN-guarded apply never lets an older change
regress a row tagged L2. That alone is not exact: a row updated after the crash may have moved
into a done partition's blocks, and replaying its update where the sink lacks the row would
lose a value the update left unchanged (unchanged TOAST). So the done partitions are read again
at S2 too, but only their tuples that may be newer than S1: `xmin` at or above S1's xmin.
A tuple older than that existed at S1 in the same place (tuples never move without a new
version, except by a table rewrite, which changes the table's file: such a table is resynced
instead), so its row is already in the sink, unchanged since. Every row visible at S2 is then in
the sink at S2's value or newer, and the replay from L1 applies exactly the rest.

Tables without a key (merging needs one), or whose file changed since S1, are resynced
(cdc/resync.py). The S1 facts (its xmin, each table's file) are recorded when the slot is made.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.cdc.replication import ReplicationConnection
from nilus_dagster.cdc.resync import RunnerFactory
from nilus_dagster.cdc.setup import CdcTable
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.sources.postgres.connection import connect_source

FACTS_KEY = "snapshot_facts"  # in the pipeline state's detail: {"xmin": int, "filenodes": {table: int}}
_XID_WRAP = 1 << 32


def filenode(conn: psycopg.Connection[Any], table: TableName) -> int | None:
    name = sql.Identifier(table.schema, table.name).as_string(conn)
    row = conn.execute("SELECT pg_relation_filenode(%s::regclass)", (name,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def snapshot_facts(source_connection: str, source_dsn: str, snapshot_name: str, tables: list[CdcTable]) -> dict:
    """What a resume needs to know of the exported snapshot `snapshot_name` (read inside it)."""
    with connect_source(source_connection, source_dsn, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
        row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
        assert row is not None
        facts = {"xmin": int(row[0]), "filenodes": {t.name.qualified: filenode(conn, t.name) for t in tables}}
        conn.execute("COMMIT")
    return facts


def resumable(conn: psycopg.Connection[Any], table: CdcTable, facts: dict | None) -> bool:
    """A keyed table whose file is the one its done partitions were read from."""
    if not table.schema.primary_key or not facts:
        return False
    recorded = facts.get("filenodes", {}).get(table.name.qualified)
    return recorded is not None and recorded == filenode(conn, table.name)


def newer_than_snapshot(conn: psycopg.Connection[Any], snapshot_xmin: int) -> tuple[str, tuple[Any, ...]]:
    """A condition (SQL, params) true for tuples whose `xmin` may be at or above `snapshot_xmin`.

    `xmin` is a 32-bit xid; its epoch is the current one unless it is above the current xid's
    low bits (then the previous one). Frozen tuples keep their xid; any mistake only ever
    re-reads a row, which is harmless."""
    row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    current = int(row[0])
    epoch_base, low = current - current % _XID_WRAP, current % _XID_WRAP
    condition = "(CASE WHEN xmin::text::bigint > %s THEN %s ELSE %s END + xmin::text::bigint) >= %s"
    return condition, (low, epoch_base - _XID_WRAP, epoch_base, snapshot_xmin)


@dataclass
class SnapshotResume:
    """Finishes the interrupted initial snapshot of keyed tables; see the module docstring."""

    source_connection: str
    source_dsn: str
    facts: dict
    snapshot_lsn: int  # L1: the interrupted snapshot's point, where these tables' stream starts
    generation: str  # the interrupted snapshot's (its partition checkpoints)
    make_runner: RunnerFactory

    def run(self, tables: list[tuple[CdcTable, SinkTable]]) -> int:
        expected = {t.name: int(self.facts["filenodes"][t.name.qualified]) for t, _ in tables}
        with ReplicationConnection.connect(self.source_dsn) as replication:
            slot = replication.create_slot(f"nilus_resume_{secrets.token_hex(6)}", export_snapshot=True, temporary=True)
            assert slot.snapshot_name is not None
            with connect_source(self.source_connection, self.source_dsn, autocommit=True) as conn:
                refill = newer_than_snapshot(conn, int(self.facts["xmin"]))
            runner = self.make_runner(slot.consistent_point, slot.snapshot_name, self.generation)
            runner.stream_from_lsn = self.snapshot_lsn
            runner.refill = refill
            runner.expected_filenodes = expected
            return runner.run(tables)
