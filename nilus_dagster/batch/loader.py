"""Load one source table into a sink: read inside one source snapshot, write atomically.

The source (PostgreSQL or MySQL/MariaDB) is a `BatchSnapshot` (see `nilus_dagster.sources.batch`).

Incremental loads read rows whose cursor is above the high-water mark and at most the maximum
seen in the same snapshot. The sink stores the new mark in the same transaction as the rows
(a crash cannot separate them); the state store copy is advanced only after that commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from nilus_dagster.schema import TableSchema
from nilus_dagster.schema.arrow import arrow_schema
from nilus_dagster.schema.evolution import SchemaDiff, diff_schemas
from nilus_dagster.sinks.base import MarkCheckpoint, Sink, SinkTable, WriteStrategy, carried_schema
from nilus_dagster.sources.batch import BatchSnapshot, CursorRange, open_batch_snapshot
from nilus_dagster.spec.pipelines import SourceTable
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore


class BatchLoadError(Exception):
    """A load refused to start or could not finish; nothing half-written was committed."""


@dataclass(frozen=True)
class BatchTableLoad:
    """Everything one table load needs, resolved from the pipeline declaration."""

    key: PipelineKey
    source_connection: str
    source_dsn: str
    table: SourceTable
    target: SinkTable
    strategy: WriteStrategy
    schema_changes: str = "evolve"
    source_type: str = "postgres"  # the source connection's type: postgres or mysql

    @property
    def checkpoint_key(self) -> str:
        return f"{self.key.tenant}/{self.key.pipeline}/{self.table.table.qualified}"


@dataclass
class BatchLoadResult:
    rows: int
    bytes: int
    duration_s: float
    schema: TableSchema
    previous_mark: str | None = None
    high_water_mark: str | None = None
    added_columns: list[str] = field(default_factory=list)
    schema_change: str | None = None
    table_rows: int | None = None  # rows in the sink table at the commit, if the sink says
    inserted: int | None = None  # merge: new rows (the other rows written updated existing ones)


def _source_schema(source: BatchSnapshot, load: BatchTableLoad) -> TableSchema:
    schema = source.table_schema(load.table.table)
    if load.table.primary_key:
        try:
            schema = schema.with_primary_key(tuple(load.table.primary_key))
        except ValueError as exc:
            raise BatchLoadError(f"{load.table.name}: primary_key override: {exc}") from None
    if load.strategy is WriteStrategy.MERGE and not schema.primary_key:
        raise BatchLoadError(
            f"{load.table.name} has no primary key, so strategy merge cannot match rows: "
            "declare primary_key for the table, or use strategy append or replace"
        )
    if load.table.cursor and load.table.cursor not in schema.column_names:
        raise BatchLoadError(
            f"{load.table.name}: cursor column '{load.table.cursor}' does not exist "
            f"(columns: {', '.join(schema.column_names)})"
        )
    return schema


def _check_schema_policy(store: StateStore, load: BatchTableLoad, schema: TableSchema) -> SchemaDiff | None:
    """Apply `schema_changes` against the schema last recorded for this table."""
    recorded = store.latest_schemas(load.key.tenant, load.key.pipeline).get(load.table.table.qualified)
    if recorded is None:
        return None
    diff = diff_schemas(TableSchema.from_json(recorded.table_schema), schema)
    if diff.is_empty:
        return diff
    if load.schema_changes == "fail" or (load.schema_changes == "evolve" and not diff.evolvable):
        raise BatchLoadError(
            f"{load.table.name}: the source schema changed ({diff.describe()}) and schema_changes is "
            f"'{load.schema_changes}'; nothing was loaded"
        )
    if load.schema_changes == "pause":
        store.set_pipeline_state(
            load.key,
            "pending_schema_approval",
            {"table": load.table.name, "proposed_schema": schema.to_json(), "diff": diff.describe()},
        )
        raise BatchLoadError(
            f"{load.table.name}: the source schema changed ({diff.describe()}); the pipeline is paused "
            "until the change is approved"
        )
    return diff


def _cursor_range(
    source: BatchSnapshot, load: BatchTableLoad, schema: TableSchema, previous: str | None
) -> tuple[str | None, CursorRange | None, bool]:
    """(new mark, range to read, whether anything is new) for an incremental read; no range for a full read."""
    if not load.table.cursor:
        return None, None, True
    new_mark = source.max_cursor(schema, load.table.cursor, previous)
    if new_mark is None:  # nothing new: read nothing, keep the mark
        return previous, None, False
    return new_mark, CursorRange(load.table.cursor, previous, new_mark), True


def _sink_schema(schema: TableSchema, strategy: WriteStrategy) -> TableSchema:
    """An `append` target keeps every load's rows, so the same source key lands many times: it
    gets no key constraint (a full-table append would violate it on its second load)."""
    return TableSchema(schema.table, schema.columns, ()) if strategy is WriteStrategy.APPEND else schema


PROGRESS_INTERVAL_S = 10.0
ProgressCallback = Callable[[int, "int | None"], Any]  # (rows read so far, estimated total or None)


def _reporting(batches: Iterable[pa.RecordBatch], total: int | None, on_progress: ProgressCallback | None):  # noqa: ANN202
    """The batches, telling `on_progress` how many rows were read at most every PROGRESS_INTERVAL_S."""
    if on_progress is None:
        yield from batches
        return
    rows, last = 0, time.monotonic()
    for batch in batches:
        rows += batch.num_rows
        if time.monotonic() - last >= PROGRESS_INTERVAL_S:
            last = time.monotonic()
            on_progress(rows, total)
        yield batch


def load_table(
    load: BatchTableLoad, sink: Sink, store: StateStore, on_progress: ProgressCallback | None = None
) -> BatchLoadResult:
    """Copy one table into the sink with the load's strategy; see the module docstring.
    `on_progress(rows_read, estimated_total)` is called while a long read goes on."""
    started = time.monotonic()
    with open_batch_snapshot(load.source_type, load.source_connection, load.source_dsn) as source:
        schema = carried_schema(sink, _source_schema(source, load))
        sink.check_table(load.target, schema, cdc=False, strategy=load.strategy)  # refuse before writing
        diff = _check_schema_policy(store, load, schema)
        previous = stored = None
        if load.table.cursor:
            stored = sink.read_checkpoint(load.checkpoint_key)
            previous = stored or store.get_cursor(load.key, load.table.name)
        mark, cursor_range, anything_new = _cursor_range(source, load, schema, previous)
        sink_schema = _sink_schema(schema, load.strategy)
        added = sink.prepare_table(load.target, sink_schema)
        if diff is not None and diff.widened:
            sink.widen_columns(load.target, [schema.column(name) for name, _, _ in diff.widened])
        if anything_new:
            estimate = None if load.table.cursor else source.estimated_rows(load.table.table)
            batches = _reporting(source.read(schema, cursor_range), estimate, on_progress)
        else:
            batches = iter([pa.RecordBatch.from_pylist([], schema=arrow_schema(schema))])
        checkpoint = MarkCheckpoint(load.checkpoint_key, mark, previous=stored) if mark is not None else None
        written = sink.write(load.target, sink_schema, batches, load.strategy, checkpoint)
    if diff is None or not diff.is_empty:
        store.append_schema(
            load.key,
            connector_name=load.key.pipeline,
            table_name=load.table.table.qualified,
            table_schema=schema.to_json(),
            lsn=None,
        )
    if load.table.cursor and mark is not None:
        store.set_cursor(load.key, load.table.name, load.table.cursor, mark)
    return BatchLoadResult(
        rows=written.rows,
        bytes=written.bytes,
        duration_s=time.monotonic() - started,
        schema=schema,
        previous_mark=previous,
        high_water_mark=mark,
        added_columns=added,
        schema_change=diff.describe() if diff and not diff.is_empty else None,
        table_rows=written.table_rows,
        inserted=written.inserted,
    )
