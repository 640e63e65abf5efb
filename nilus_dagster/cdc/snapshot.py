"""The initial snapshot: tables read in CTID block ranges by parallel workers, inside the slot's
exported snapshot, each partition written atomically with its own checkpoint.

Progress lives in the state store (the plan and done partitions) and in the sink (a checkpoint per
partition, committed with its rows), so a crash resumes at the first unfinished partition; how a
resumed snapshot stays exact is in `cdc/resume.py`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.partitioned import (
    KnownLeaves,
    decode_range,
    known_leaves_checkpoint,
    leaves_in_snapshot,
    plan_leaf_ranges,
    read_known_leaves,
)
from nilus_dagster.cdc.setup import CdcTable, check_leaf
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import (
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    Checkpoint,
    Sink,
    SinkTable,
    WriteStrategy,
)
from nilus_dagster.sinks.sql_dialect import CDC_COLUMNS
from nilus_dagster.sources.postgres.catalog import table_size
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.sources.postgres.reader import read_table
from nilus_dagster.state.records import PipelineKey, SnapshotPartition
from nilus_dagster.state.store import StateStore

LAST_BLOCK = 0xFFFFFFFF  # an open end: the last partition also reads blocks added since planning
SNAPSHOT_OP = "r"  # rows read by the snapshot, as Debezium marks them


def cdc_schema(schema: TableSchema) -> TableSchema:
    """The sink table's schema for a CDC pipeline: source columns plus the metadata columns."""
    return TableSchema(schema.table, schema.columns + CDC_COLUMNS, schema.primary_key)


def with_snapshot_metadata(batch: pa.RecordBatch, lsn: int, synced_at: datetime) -> pa.RecordBatch:
    rows = batch.num_rows
    extra = [  # constant columns, built by Arrow rather than from Python lists
        pa.repeat(pa.scalar(lsn, type=pa.int64()), rows),
        pa.repeat(pa.scalar(SNAPSHOT_OP, type=pa.string()), rows),
        pa.repeat(pa.scalar(synced_at, type=pa.timestamp("us", tz="UTC")), rows),
        pa.repeat(pa.scalar(False, type=pa.bool_()), rows),
    ]
    names = [*batch.schema.names, LSN_COLUMN, OP_COLUMN, SYNCED_AT_COLUMN, DELETED_COLUMN]
    return pa.RecordBatch.from_arrays([*batch.columns, *extra], names=names)


def plan_partitions(pages: int, blocks_per_partition: int) -> list[tuple[int, int]]:
    starts = list(range(0, max(pages, 1), blocks_per_partition))
    return [(start, next_start) for start, next_start in zip(starts, starts[1:] + [LAST_BLOCK], strict=True)]


@dataclass(frozen=True)
class SnapshotTask:
    table: CdcTable
    target: SinkTable
    partition: SnapshotPartition
    leaf: TableName | None = None  # a partitioned table's partition: read `blocks` of this leaf
    blocks: tuple[int, int] | None = None
    fill: bool = False  # re-reads part of a done partition (see cdc/resume.py): no checkpoint of its own

    def read_schema(self) -> TableSchema:
        """The table's columns, read from the leaf when the task is one leaf's range."""
        return self.table.schema if self.leaf is None else replace(self.table.schema, table=self.leaf)

    def ctid_range(self) -> tuple[int, int]:
        return self.blocks or (self.partition.start_block, self.partition.end_block)


class TableRewritten(Exception):
    """A table's file changed (VACUUM FULL, CLUSTER, a rewriting ALTER) while a resumed snapshot
    relied on its rows keeping their places; the next run resyncs it."""


@dataclass
class SnapshotProgress:
    tables_total: int
    partitions_total: int
    partitions_done: int
    rows_done: int
    # per table (schema.table): [partitions done, partitions to do in this run, rows written]
    by_table: dict[str, list[int]] = field(default_factory=dict)


# A partition's batches as its worker reads them: None ends them, an exception fails them.
_Batches = queue.Queue[pa.RecordBatch | BaseException | None]


class SnapshotCancelled(Exception):
    """The run was asked to stop; finished partitions are kept and the next run resumes."""


@dataclass
class SnapshotRunner:
    """Reads and writes every unfinished partition of the given tables."""

    source_connection: str
    source_dsn: str
    key: PipelineKey
    sink: Sink
    store: StateStore
    consistent_lsn: int
    checkpoint_prefix: str
    generation: str  # one per snapshot (the slot's consistent point, or when a table was added)
    snapshot_name: str | None = None  # None: resuming without the exported snapshot
    workers: int = 2
    partition_blocks: int = 4096
    should_stop: Callable[[], bool] = lambda: False
    on_progress: Callable[[SnapshotProgress], None] = lambda progress: None
    # A resumed snapshot (cdc/resume.py): the stream's start, when it is not `consistent_lsn`; a
    # condition (SQL, params) selecting the rows of done partitions to read again; the file each
    # table must still have (checked under the workers' table lock).
    stream_from_lsn: int | None = None
    refill: tuple[str, tuple[Any, ...]] | None = None
    expected_filenodes: dict[TableName, int] = field(default_factory=dict)

    def partition_checkpoint(self, table: TableName, partition_no: int) -> str:
        return f"{self.checkpoint_prefix}/snapshot/{self.generation}/{table.qualified}/{partition_no}"

    def plan(self, tables: list[tuple[CdcTable, SinkTable]]) -> list[SnapshotTask]:
        """The unfinished partitions, planning tables seen for the first time."""
        tasks = []
        with connect_source(self.source_connection, self.source_dsn, autocommit=True) as conn:
            for table, target in tables:
                leaves = self._planned_leaves(conn, table, target) if table.partitioned else None
                if leaves is None:
                    size = table_size(conn, table.name)
                    ranges, rows = plan_partitions(size.pages, self.partition_blocks), size.rows_estimate
                else:
                    ranges, rows = plan_leaf_ranges(conn, leaves, lambda p: plan_partitions(p, self.partition_blocks))
                plan = self.store.plan_snapshot(self.key, table.name.qualified, ranges, rows)
                for partition in plan:
                    if partition.done:
                        if self.refill is not None:
                            tasks.append(replace(_task(table, target, partition, leaves), fill=True))
                        continue
                    if self.sink.read_checkpoint(self.partition_checkpoint(table.name, partition.partition_no)):
                        # committed in the sink, not yet marked in the store (a crash in between)
                        self.store.mark_partition_done(self.key, table.name.qualified, partition.partition_no, 0)
                        if self.refill is not None:
                            tasks.append(replace(_task(table, target, partition, leaves), fill=True))
                        continue
                    tasks.append(_task(table, target, partition, leaves))
        return tasks

    def _planned_leaves(
        self, conn: psycopg.Connection[Any], table: CdcTable, target: SinkTable
    ) -> tuple[TableName, ...]:
        """A partitioned table's leaves for this generation: as recorded in the sink (a resumed
        snapshot), else as the snapshot being read sees them, recorded before any row is written."""
        known = read_known_leaves(self.sink, self.checkpoint_prefix, table.name)
        if known is not None and known.generation == self.generation:
            return known.leaves
        leaves = leaves_in_snapshot(conn, table.name, self.snapshot_name)
        for leaf in leaves:
            check_leaf(table.name, table.schema, leaf)
        known = KnownLeaves(self.generation, tuple(leaf.name for leaf in leaves))
        checkpoint = known_leaves_checkpoint(self.checkpoint_prefix, table.name, known)
        self.sink.write(target, cdc_schema(table.schema), [], WriteStrategy.APPEND, checkpoint)
        return known.leaves

    def run(self, tables: list[tuple[CdcTable, SinkTable]]) -> int:
        """Snapshot the tables; returns the rows written. Raises SnapshotCancelled on stop.

        A sink with a `bulk_session()` (DuckDB) keeps its file open for the whole snapshot.
        """
        bulk_session = getattr(self.sink, "bulk_session", None)
        with bulk_session() if callable(bulk_session) else nullcontext():
            return self._run(tables)

    def _run(self, tables: list[tuple[CdcTable, SinkTable]]) -> int:
        for table, target in tables:
            self.sink.prepare_table(target, table.schema, cdc=True)
        if self._resumed:
            self._restore_keys(tables)  # a resumed snapshot merges, by key
        else:
            self._defer_keys(tables)
        tasks = self.plan(tables)
        progress = SnapshotProgress(len(tables), len(tasks), 0, 0)
        for task in tasks:
            if not task.fill:
                progress.by_table.setdefault(task.table.name.qualified, [0, 0, 0])[1] += 1
        self.on_progress(progress)  # the copy begins (phase `snapshot`, 0 of N partitions)
        rows = self._read_and_write(tasks, progress) if tasks else 0
        self._restore_keys(tables)
        self.mark_streaming_start(tables)
        return rows

    @property
    def _resumed(self) -> bool:
        return self.stream_from_lsn is not None or not self.snapshot_name

    def _defer_keys(self, tables: list[tuple[CdcTable, SinkTable]]) -> None:
        """A sink that builds a primary key faster at once (DuckDB) loads a fresh snapshot's empty
        tables without it; `_restore_keys` builds it after the last partition, or before a resumed
        snapshot goes on (a crash in between leaves the table without its key until then)."""
        defer = getattr(self.sink, "defer_primary_key", None)
        if callable(defer):
            for _, target in tables:
                defer(target)

    def _restore_keys(self, tables: list[tuple[CdcTable, SinkTable]]) -> None:
        restore = getattr(self.sink, "restore_primary_key", None)
        if callable(restore):
            for table, target in tables:
                restore(target, table.schema.primary_key)

    def mark_streaming_start(self, tables: list[tuple[CdcTable, SinkTable]]) -> None:
        """Each table's stream checkpoint: its changes apply from the snapshot point on."""
        for table, target in tables:
            self.sink.prepare_table(target, table.schema, cdc=True)
            self.sink.write(
                target,
                cdc_schema(table.schema),
                [],
                WriteStrategy.APPEND,
                Checkpoint(
                    f"{self.checkpoint_prefix}/{table.name.qualified}",
                    format_lsn(self.consistent_lsn if self.stream_from_lsn is None else self.stream_from_lsn),
                ),
            )

    def _read_and_write(self, tasks: list[SnapshotTask], progress: SnapshotProgress) -> int:
        """Workers read partitions; this thread writes each one as its batches arrive (one sink
        transaction per partition, with its checkpoint), so reading and writing overlap."""
        pending: queue.Queue[SnapshotTask] = queue.Queue()
        for task in tasks:
            pending.put(task)
        results: queue.Queue[tuple[SnapshotTask, _Batches] | BaseException] = queue.Queue(maxsize=self.workers * 2)
        stop = threading.Event()
        threads = [
            threading.Thread(target=self._worker, args=(pending, results, stop), daemon=True, name=f"snapshot-{i}")
            for i in range(min(self.workers, len(tasks)))
        ]
        for thread in threads:
            thread.start()
        remaining = len(tasks)
        try:
            while remaining:
                written = self._write_group(results, remaining)
                remaining -= len(written)
                for task, rows in written:  # committed: the store follows the sink
                    self._partition_written(task, rows, progress)
        finally:
            stop.set()
            while True:  # unblock workers waiting on a full queue
                try:
                    results.get_nowait()
                except queue.Empty:
                    break
        return progress.rows_done

    def _write_group(
        self, results: queue.Queue[tuple[SnapshotTask, _Batches] | BaseException], remaining: int
    ) -> list[tuple[SnapshotTask, int]]:
        """Write arriving partitions, each with its checkpoint, in one sink transaction: a sink with
        `grouped_writes()` (DuckDB) takes up to `snapshot_group_partitions` partitions until
        `snapshot_group_rows` rows, others one.
        A crash loses the group's partitions only; their checkpoints commit with their rows."""
        grouped = getattr(self.sink, "grouped_writes", None)
        budget = int(getattr(self.sink, "snapshot_group_rows", 0)) if callable(grouped) else 0
        most = min(remaining, int(getattr(self.sink, "snapshot_group_partitions", 1)) if budget else 1)
        strategy = WriteStrategy.MERGE if self._resumed else WriteStrategy.APPEND
        written: list[tuple[SnapshotTask, int]] = []
        group_rows = 0
        with grouped() if callable(grouped) else nullcontext():
            while len(written) < most and (not written or group_rows < budget):
                item = self._next_result(results)
                if isinstance(item, BaseException):
                    raise item
                task, batches = item
                checkpoint = Checkpoint(self.partition_checkpoint(task.table.name, task.partition.partition_no), "done")
                result = self.sink.write(
                    task.target,
                    cdc_schema(task.table.schema),
                    self._arriving(batches),
                    strategy,
                    None if task.fill else checkpoint,
                )
                written.append((task, result.rows))
                group_rows += result.rows
        return written

    def _partition_written(self, task: SnapshotTask, rows: int, progress: SnapshotProgress) -> None:
        if not task.fill:
            self.store.mark_partition_done(self.key, task.table.name.qualified, task.partition.partition_no, rows)
            table_progress = progress.by_table[task.table.name.qualified]
            table_progress[0] += 1
            table_progress[2] += rows
        progress.partitions_done += 1
        progress.rows_done += rows
        self.on_progress(progress)

    def _next_result(
        self, results: queue.Queue[tuple[SnapshotTask, _Batches] | BaseException]
    ) -> tuple[SnapshotTask, _Batches] | BaseException:
        """Wait on the main thread in short steps, so a stop request is seen promptly."""
        while True:
            if self.should_stop():
                raise SnapshotCancelled("snapshot stopped; finished partitions are kept")
            try:
                return results.get(timeout=0.2)
            except queue.Empty:
                continue

    def _arriving(self, batches: _Batches) -> Iterator[pa.RecordBatch]:
        """A partition's batches as its worker reads them; its error (or a stop request) raises here,
        so the sink's transaction for the partition rolls back."""
        while True:
            try:
                item = batches.get(timeout=0.2)
            except queue.Empty:
                if self.should_stop():
                    raise SnapshotCancelled("snapshot stopped; finished partitions are kept") from None
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _worker(
        self,
        pending: queue.Queue[SnapshotTask],
        results: queue.Queue[tuple[SnapshotTask, _Batches] | BaseException],
        stop: threading.Event,
    ) -> None:
        batches: _Batches | None = None  # those of the partition being read
        try:
            with connect_source(self.source_connection, self.source_dsn, autocommit=True) as conn:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                if self.snapshot_name:
                    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot_name)))
                checked: set[TableName] = set()
                for task in _drain(pending, stop):
                    if task.table.name in self.expected_filenodes and task.table.name not in checked:
                        _lock_and_check_file(conn, task.table.name, self.expected_filenodes[task.table.name])
                        checked.add(task.table.name)
                    synced_at = datetime.now(UTC)
                    batches = queue.Queue()  # unbounded: at most one partition, as when read whole
                    while not stop.is_set():
                        try:
                            results.put((task, batches), timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    where, params = self.refill if task.fill and self.refill else (None, ())
                    for batch in read_table(
                        conn, task.read_schema(), where=where, params=params, ctid_range=task.ctid_range()
                    ):
                        if stop.is_set():
                            raise SnapshotCancelled("snapshot stopped while reading a partition")
                        batches.put(with_snapshot_metadata(batch, self.consistent_lsn, synced_at))
                    batches.put(None)
                    batches = None
                conn.execute("COMMIT")
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
            if batches is not None:
                batches.put(error)  # the partition being written fails with it
            if not stop.is_set():
                results.put(error)


def _task(
    table: CdcTable, target: SinkTable, partition: SnapshotPartition, leaves: tuple[TableName, ...] | None
) -> SnapshotTask:
    if leaves is None:
        return SnapshotTask(table, target, partition)
    leaf_index, blocks = decode_range(partition.start_block, partition.end_block)
    return SnapshotTask(table, target, partition, leaves[leaf_index], blocks)


def _lock_and_check_file(conn: Any, table: TableName, expected: int) -> None:
    """Hold the table (until the worker's transaction ends) and check it kept its file."""
    name = sql.Identifier(table.schema, table.name)
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(name))
    row = conn.execute("SELECT pg_relation_filenode(%s::regclass)", (f"{name.as_string(conn)}",)).fetchone()
    if row is None or row[0] != expected:
        raise TableRewritten(f"{table} was rewritten since its snapshot began; the next run resyncs it")


def _drain(pending: queue.Queue[SnapshotTask], stop: threading.Event) -> Iterator[SnapshotTask]:
    while not stop.is_set():
        try:
            yield pending.get_nowait()
        except queue.Empty:
            return
