"""The snapshot steps of a CDC run (a mixin of `CdcRun`): create the slot, record the schemas in
force at its consistent point, and copy the tables at its exported snapshot."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.replication import ReplicationConnection
from nilus_dagster.cdc.resume import FACTS_KEY, snapshot_facts
from nilus_dagster.cdc.run_config import CdcPipelineConfig, CdcProgress
from nilus_dagster.cdc.setup import CdcTable
from nilus_dagster.cdc.snapshot import SnapshotProgress, SnapshotRunner, cdc_schema
from nilus_dagster.cdc.source_facts import TableFacts, read_table_facts
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink, SinkTable, WriteStrategy
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.store import StateStore


class SnapshotSteps:
    """Needs the run's collaborators and helpers (declared for type checkers only)."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        sink: Sink
        store: StateStore
        slot: str
        _walsender_pid: int | None
        should_stop: Callable[[], bool]
        _facts: dict[TableName, TableFacts]
        _report: Callable[..., None]
        _record_offset: Callable[..., None]
        _targets: Callable[[list[CdcTable]], list[tuple[CdcTable, SinkTable]]]

    def _snapshot_runner(self, consistent_lsn: int, snapshot_name: str | None, generation: str) -> SnapshotRunner:
        config = self.config
        progress = CdcProgress("snapshot")

        def report(snapshot: SnapshotProgress) -> None:
            progress.snapshot_rows = snapshot.rows_done
            progress.snapshot_partitions_done = snapshot.partitions_done
            progress.snapshot_partitions_total = snapshot.partitions_total
            progress.snapshot_tables = {
                table: {"partitions_done": done, "partitions_total": total, "rows": rows,
                        "percent": round(100.0 * done / total, 1) if total else 100.0}
                for table, (done, total, rows) in snapshot.by_table.items()
            }
            self._report(progress)

        return SnapshotRunner(
            source_connection=config.source_connection,
            source_dsn=config.source_dsn,
            key=config.key,
            sink=self.sink,
            store=self.store,
            consistent_lsn=consistent_lsn,
            checkpoint_prefix=config.checkpoint_prefix,
            generation=generation,
            snapshot_name=snapshot_name,
            workers=config.snapshot_workers,
            partition_blocks=config.snapshot_partition_blocks,
            should_stop=self.should_stop,
            on_progress=report,
        )

    def _record_schemas(self, tables: list[CdcTable], lsn: int) -> None:
        with connect_source(self.config.source_connection, self.config.source_dsn, autocommit=True) as conn:
            for table in tables:
                facts = read_table_facts(conn, table.name)
                self._record_schema(table.name, table.schema, lsn, facts and facts.restricted_to(table.schema))

    def _record_schema(self, table: TableName, schema: TableSchema, lsn: int, facts: TableFacts | None) -> None:
        """The schema in force from `lsn` on, with the catalog facts the next change is judged by."""
        recorded = schema.to_json()
        if facts is not None:
            recorded["source_facts"] = facts.to_json()
            self._facts[table] = facts
        self.store.append_schema(
            self.config.key,
            connector_name=self.config.key.pipeline,
            table_name=table.qualified,
            table_schema=recorded,
            lsn=format_lsn(lsn),
        )

    def _create_slot_and_snapshot(self, tables: list[CdcTable], identifier: str) -> int:
        """A new slot: its exported snapshot is the exact starting point of the stream."""
        config = self.config
        with ReplicationConnection.connect(config.source_dsn) as replication:
            self._walsender_pid = replication.backend_pid  # a retry ends it should the server keep it
            slot = replication.create_slot(self.slot, export_snapshot=config.snapshot == "initial")
            self.store.clear_snapshot(config.key.tenant, config.key.pipeline)
            facts = {}
            if slot.snapshot_name is not None:  # read inside it while it lives: what a resume needs
                facts[FACTS_KEY] = snapshot_facts(
                    config.source_connection, config.source_dsn, slot.snapshot_name, tables
                )
            self.store.set_pipeline_state(
                config.key,
                "active",
                {
                    "system_identifier": identifier,
                    "slot": self.slot,
                    "publication": config.publication,
                    "consistent_lsn": format_lsn(slot.consistent_point),
                    **facts,
                },
            )
            self._record_schemas(tables, slot.consistent_point)
            runner = self._snapshot_runner(slot.consistent_point, slot.snapshot_name, format_lsn(slot.consistent_point))
            if config.snapshot == "never":
                runner.mark_streaming_start(self._targets(tables))
                rows = 0
            else:
                self._empty_targets(tables)  # a new snapshot is the whole truth: no older rows may stay
                rows = runner.run(self._targets(tables))
        self._record_offset(slot.consistent_point, force=True)
        return rows

    def _empty_targets(self, tables: list[CdcTable]) -> None:
        for table, target in self._targets(tables):
            self.sink.prepare_table(target, table.schema, cdc=True)
            self.sink.write(target, cdc_schema(table.schema), [], WriteStrategy.REPLACE)

