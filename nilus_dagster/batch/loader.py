"""Load one source table into a sink: read with COPY inside one snapshot, write atomically.

Incremental loads read rows whose cursor is above the high-water mark and at most the maximum
seen in the same snapshot. The sink stores the new mark in the same transaction as the rows
(a crash cannot separate them); the state store copy is advanced only after that commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from nilus_dagster.schema import TableSchema
from nilus_dagster.schema.evolution import SchemaDiff, diff_schemas
from nilus_dagster.sinks.base import MarkCheckpoint, Sink, SinkTable, WriteStrategy, carried_schema
from nilus_dagster.sources.postgres.catalog import read_table_schema
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.sources.postgres.reader import read_table
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


def _source_schema(conn: psycopg.Connection, load: BatchTableLoad) -> TableSchema:
    schema = read_table_schema(conn, load.table.table)
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


def _cursor_bounds(
    conn: psycopg.Connection, load: BatchTableLoad, schema: TableSchema, previous: str | None
) -> tuple[str | None, sql.Composable | None, tuple[str, ...]]:
    """(new mark, WHERE clause, params) for an incremental read; no clause for a full read."""
    if not load.table.cursor:
        return None, None, ()
    column = sql.Identifier(load.table.cursor)
    cast = sql.SQL(schema.column(load.table.cursor).source_type)  # type: ignore[arg-type]
    table = sql.Identifier(load.table.table.schema, load.table.table.name)
    lower = sql.SQL("{c} > %s::{t}").format(c=column, t=cast) if previous is not None else sql.SQL("true")
    lower_params: tuple[str, ...] = (previous,) if previous is not None else ()
    row = conn.execute(
        sql.SQL("SELECT max({c})::text FROM {tbl} WHERE {lower}").format(c=column, tbl=table, lower=lower),
        lower_params,
    ).fetchone()
    new_mark = row[0] if row else None
    if new_mark is None:  # nothing new: read nothing, keep the mark
        return previous, sql.SQL("false"), ()
    upper = sql.SQL("{lower} AND {c} <= %s::{t}").format(lower=lower, c=column, t=cast)
    return new_mark, upper, (*lower_params, new_mark)


def _sink_schema(schema: TableSchema, strategy: WriteStrategy) -> TableSchema:
    """An `append` target keeps every load's rows, so the same source key lands many times: it
    gets no key constraint (a full-table append would violate it on its second load)."""
    return TableSchema(schema.table, schema.columns, ()) if strategy is WriteStrategy.APPEND else schema


PROGRESS_INTERVAL_S = 10.0
ProgressCallback = Callable[[int, "int | None"], Any]  # (rows read so far, estimated total or None)


def _estimated_rows(conn: psycopg.Connection, load: BatchTableLoad) -> int | None:
    """The planner's row estimate of a full load's table (None if never analyzed, or incremental)."""
    if load.table.cursor:
        return None
    table = sql.Identifier(load.table.table.schema, load.table.table.name).as_string(conn)
    row = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


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
    with connect_source(load.source_connection, load.source_dsn, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SET LOCAL TIME ZONE 'UTC'")
        schema = carried_schema(sink, _source_schema(conn, load))
        sink.check_table(load.target, schema, cdc=False, strategy=load.strategy)  # refuse before writing
        diff = _check_schema_policy(store, load, schema)
        previous = stored = None
        if load.table.cursor:
            stored = sink.read_checkpoint(load.checkpoint_key)
            previous = stored or store.get_cursor(load.key, load.table.name)
        mark, where, params = _cursor_bounds(conn, load, schema, previous)
        sink_schema = _sink_schema(schema, load.strategy)
        added = sink.prepare_table(load.target, sink_schema)
        if diff is not None and diff.widened:
            sink.widen_columns(load.target, [schema.column(name) for name, _, _ in diff.widened])
        batches = read_table(conn, schema, where=where.as_string(conn) if where else None, params=params)
        batches = _reporting(batches, _estimated_rows(conn, load), on_progress)
        checkpoint = MarkCheckpoint(load.checkpoint_key, mark, previous=stored) if mark is not None else None
        written = sink.write(load.target, sink_schema, batches, load.strategy, checkpoint)
        conn.execute("COMMIT")
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
