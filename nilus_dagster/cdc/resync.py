"""Re-snapshot some tables of a pipeline (a resync) without resetting it.

Why it is exact: a temporary slot created with an exported snapshot gives a consistent point L
and a snapshot S in which exactly the transactions committing before L are visible; a slot
streams exactly those committing at or after its start. So, per table, in one sink transaction
the table is emptied (recreated when its columns changed type) and its stream checkpoint set to
RESYNC_MARKER; the partitions are read inside S and appended; then the checkpoint becomes L. The
pipeline's own slot is never acknowledged past what the stream applied before the resync (< L):
the stream, restarted from it, re-delivers the table's changes and skips, for that table, those
committing before L (the stream's rule `commit_lsn < applied_lsn`, PostgreSQL's own rule).

A crash in the middle leaves the marker (and the request open): the next run resyncs the table
again from scratch, with a new temporary slot.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from psycopg import sql

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.replication import ReplicationConnection
from nilus_dagster.cdc.setup import CdcTable, resolve_tables
from nilus_dagster.cdc.snapshot import SnapshotRunner, cdc_schema
from nilus_dagster.cdc.source_facts import TableFacts, read_table_facts
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.schema.evolution import diff_schemas
from nilus_dagster.sinks.base import Checkpoint, Sink, SinkError, SinkTable, WriteStrategy
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

RESYNC_MARKER = "resync"  # a table checkpoint meaning "this sink table is being re-snapshotted"

# (consistent LSN, exported snapshot name, generation) -> a runner for the tables' partitions
RunnerFactory = Callable[[int, str, str], SnapshotRunner]


class UnknownTables(ValueError):
    """Tables named for a resync that the pipeline does not stream."""


def validate_resync_tables(names: Sequence[str | TableName], valid: Sequence[TableName]) -> list[TableName]:
    """The named tables (`schema.table`), or UnknownTables naming the pipeline's tables."""
    if not names:
        raise UnknownTables(f"name at least one table to resync; the pipeline's tables: {_listing(valid)}")
    by_name = {t.qualified: t for t in valid}
    wanted = [n.qualified if isinstance(n, TableName) else str(n).strip() for n in names]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise UnknownTables(
            f"not tables of this pipeline: {', '.join(unknown)}; its tables are: {_listing(valid)} "
            "(name them as schema.table)"
        )
    return [by_name[n] for n in dict.fromkeys(wanted)]


def _listing(valid: Sequence[TableName]) -> str:
    return ", ".join(sorted(t.qualified for t in valid))


def needs_recreate(recorded: TableSchema | None, fresh: TableSchema) -> bool:
    """The sink table cannot take the fresh schema by adding columns: a column was retyped or
    dropped (a rewrite such as ALTER COLUMN TYPE ... USING)."""
    if recorded is None:
        return False
    diff = diff_schemas(recorded, fresh)
    return bool(diff.retyped or diff.widened or diff.dropped)


# (table, its schema, the LSN it is in force from, the catalog facts it is judged by)
SchemaRecorder = Callable[[TableName, TableSchema, int, TableFacts | None], None]


@dataclass
class TableResync:
    """Resyncs tables of one pipeline; see the module docstring."""

    source_connection: str
    source_dsn: str
    sink: Sink
    store: StateStore
    key: PipelineKey
    primary_keys: dict[TableName, tuple[str, ...]]  # declared in the pipeline
    checkpoint_key: Callable[[TableName], str]  # a table's stream checkpoint in the sink
    make_runner: RunnerFactory
    record_schema: SchemaRecorder

    def run(
        self,
        targets: dict[TableName, SinkTable],
        recorded: dict[str, TableSchema],
        on_marked: Callable[[int], None] = lambda lsn: None,
    ) -> tuple[int, int, list[CdcTable]]:
        """Resync the tables; returns the rows written, the LSN from which the stream applies their
        changes, and the tables as the copy saw them (schemas read inside its snapshot).
        `on_marked(lsn)` is told once every table is emptied and marked, before the copy."""
        with ReplicationConnection.connect(self.source_dsn) as replication:
            slot = replication.create_slot(f"nilus_resync_{secrets.token_hex(6)}", export_snapshot=True, temporary=True)
            assert slot.snapshot_name is not None
            lsn = slot.consistent_point
            tables, facts = self._describe(slot.snapshot_name, list(targets))
            for table in tables:  # refuse before anything is emptied
                if needs_recreate(recorded.get(table.name.qualified), table.schema) and not callable(
                    getattr(self.sink, "recreate_table", None)
                ):
                    raise SinkError(
                        f"{self.sink.name} sink cannot retype the columns of {table.name} for a resync "
                        "(the table would have to be recreated)"
                    )
            for table in tables:
                self._empty(table, targets[table.name], recorded.get(table.name.qualified))
                self.record_schema(table.name, table.schema, lsn, facts.get(table.name))
            on_marked(lsn)
            # The connection stays open and idle while the workers read inside its snapshot.
            runner = self.make_runner(lsn, slot.snapshot_name, f"resync-{format_lsn(lsn)}")
            rows = runner.run([(t, targets[t.name]) for t in tables])
        return rows, lsn, tables

    def _describe(
        self, snapshot_name: str, names: list[TableName]
    ) -> tuple[list[CdcTable], dict[TableName, TableFacts | None]]:
        """The tables' schemas and catalog facts as of the snapshot the copy reads."""
        with connect_source(self.source_connection, self.source_dsn, autocommit=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            tables = [t.carried_for(self.sink) for t in resolve_tables(conn, names, self.primary_keys)]
            facts = {t.name: read_table_facts(conn, t.name) for t in tables}
            conn.execute("COMMIT")
        return tables, facts

    def _empty(self, table: CdcTable, target: SinkTable, recorded: TableSchema | None) -> None:
        """Empty the sink table and mark it as being resynced, in one sink transaction."""
        self.store.clear_snapshot(self.key.tenant, self.key.pipeline, table.name.qualified)
        marker = Checkpoint(self.checkpoint_key(table.name), RESYNC_MARKER)
        if needs_recreate(recorded, table.schema):
            self.sink.recreate_table(target, table.schema, marker)  # type: ignore[attr-defined]
            return
        self.sink.prepare_table(target, table.schema, cdc=True)
        self.sink.write(target, cdc_schema(table.schema), [], WriteStrategy.REPLACE, marker)
