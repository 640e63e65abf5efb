"""Snapshot throughput: our initial snapshot into DuckDB vs one binary COPY into nothing."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import duckdb

from cdcbench.common import COLUMNS_DDL, SOURCE_DB, Cluster, Measurement, Timer, fill
from cdcbench.timed_sink import TimedSink
from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcTableConfig, run_cdc_pipeline
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sources.postgres.catalog import read_table_schema
from nilus_dagster.sources.postgres.reader import read_table
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

TABLE = "public.snap_rows"
PUBLICATION = "bench_snap_pub"
TARGET = SinkTable("bench", "snap_rows")
OURS, COPY, DLT = "nilus-snapshot", "COPY binary", "dlt pyarrow"


def prepare_source(cluster: Cluster, rows: int) -> None:
    """Create and fill the table, then VACUUM ANALYZE it (hint bits set, page count known)."""
    with cluster.connect() as conn:
        conn.execute(f"CREATE TABLE {TABLE} ({COLUMNS_DDL})")
        fill(conn, TABLE, 1, rows, max(1, rows // 500_000))
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")


def run_ours(
    cluster: Cluster,
    store: StateStore,
    rows: int,
    run_no: int,
    workdir: Path,
    workers: int = 2,
    profile: AbstractContextManager[Any] | None = None,
) -> Measurement:
    """A fresh pipeline's first run (slot + exported snapshot + CTID partitions), timed whole."""
    name = f"snap{run_no}"
    config = CdcPipelineConfig(
        key=PipelineKey("bench", name, f"nilus:v1:{name}:bench"),
        source_connection="bench",
        source_dsn=cluster.dsn(),
        tables=(CdcTableConfig(TableName.parse(TABLE), TARGET),),
        snapshot="initial",
        snapshot_workers=workers,
        publication_name=PUBLICATION,
    )
    path = workdir / f"{name}.duckdb"
    sink, cpu_start = TimedSink(DuckDBSink(path)), time.process_time()
    try:
        with profile or nullcontext(), Timer() as timer:
            result = run_cdc_pipeline(config, sink, store, run_id=name, stop_at_caught_up=True)  # type: ignore[arg-type]
        cpu = time.process_time() - cpu_start
        if result.snapshot_rows != rows or count_rows(path) != rows:
            raise AssertionError(f"our snapshot wrote {result.snapshot_rows} rows, expected {rows}")
    finally:
        with cluster.connect() as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (config.slot(SOURCE_DB),),
            )
        path.unlink(missing_ok=True)
    note = f"{workers} workers; main thread in sink {sink.total:.1f}s; process CPU {cpu:.1f}s"
    return Measurement(OURS, "snapshot", timer.seconds, rows, note)


def count_rows(path: Path) -> int:
    with duckdb.connect(str(path), read_only=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TARGET.qualified}").fetchone()
    return int(row[0]) if row else 0


def run_copy(cluster: Cluster, rows: int) -> Measurement:
    """One `COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)`, drained by psycopg and dropped."""
    received = 0
    query = f"COPY (SELECT * FROM {TABLE}) TO STDOUT (FORMAT binary)"
    with cluster.connect() as conn, Timer() as timer, conn.cursor().copy(query) as copy:
        for data in copy:
            received += len(data)
    return Measurement(COPY, "snapshot", timer.seconds, rows, f"{received / 1e6:.0f} MB, into nothing")


def run_reader_only(cluster: Cluster, rows: int, profile: AbstractContextManager[Any] | None = None) -> Measurement:
    """Our source reader alone (CSV COPY → Arrow, one connection, whole table): the read side's cost."""
    with cluster.connect() as conn:
        schema = read_table_schema(conn, TableName.parse(TABLE))
        with profile or nullcontext(), Timer() as timer:
            got = sum(batch.num_rows for batch in read_table(conn, schema))
    if got != rows:
        raise AssertionError(f"the reader returned {got} rows, expected {rows}")
    return Measurement("nilus reader", "snapshot", timer.seconds, rows, "read_table only, 1 connection, no sink")
