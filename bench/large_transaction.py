"""One huge source transaction through the real CDC pipeline into DuckDB: peak RSS and time.

    python bench/large_transaction.py [--rows 5000000] [--batch-max-rows 50000] [--transactions 1]
                                      [--sink duckdb|postgres|bigquery] [--out FILE]

On a throwaway PostgreSQL 16: a pipeline streams an empty table (its slot exists), then ONE
transaction inserts `--rows` rows and updates every one of them (2 x rows changes). A fresh
process (so that its peak RSS is the CDC run's alone) runs the pipeline until caught up; it
reports its peak RSS (getrusage ru_maxrss), the time and the engine's counters. Then the DuckDB
table is compared with the source row by row, in id ranges. `--sink postgres` writes into a
database of the same cluster instead (the sink's transaction then lives in the server, not in
the measured process). `--transactions N` writes N such transactions one after the other, each
on its own `--rows` new rows (e.g. `--rows 600 --batch-max-rows 500 --transactions 300`: many
transactions just over the bound, as a catch-up meets them). `--sink bigquery` writes into the
local-bigquery emulator the tests use (tests/bigquery_emulator.py; the chunks go to a shadow
table in the emulator's process): keep `--rows` to what the emulator takes in reasonable time
(e.g. 200000).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the BigQuery emulator

import duckdb  # noqa: E402
import psycopg  # noqa: E402
from bigquery_emulator import running_emulator  # noqa: E402
from cdcbench.common import COLUMNS_DDL, ROWS_SELECT, STATE_DB, Cluster, throwaway_cluster  # noqa: E402

from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcTableConfig, run_cdc_pipeline  # noqa: E402
from nilus_dagster.schema import TableName  # noqa: E402
from nilus_dagster.sinks.base import Sink, SinkTable  # noqa: E402
from nilus_dagster.sinks.bigquery import BigQuerySink  # noqa: E402
from nilus_dagster.sinks.duckdb import DuckDBSink  # noqa: E402
from nilus_dagster.sinks.postgres import PostgresSink  # noqa: E402
from nilus_dagster.state.records import PipelineKey  # noqa: E402
from nilus_dagster.state.store import StateStore  # noqa: E402

TABLE = "public.big_tx"
TARGET = SinkTable("bench", "big_tx")
COLUMNS = "id, name, amount, created_at, qty"
COMPARE_RANGE = 200_000
PROFILE = os.environ.get("BENCH_PROFILE")  # a file: cProfile the CDC runs into it


def config(source_dsn: str, batch_max_rows: int) -> CdcPipelineConfig:
    return CdcPipelineConfig(
        key=PipelineKey("bench", "bigtx", "nilus:v1:bigtx:bench"),
        source_connection="bench",
        source_dsn=source_dsn,
        tables=(CdcTableConfig(TableName.parse(TABLE), TARGET),),
        batch_max_rows=batch_max_rows,
    )


SINK_DB = "sink"


BIGQUERY = "bigquery+"  # a sink location: the emulator's URL behind this prefix
BIGQUERY_PROJECT = "test-project"


def open_bench_sink(location: str) -> Sink:
    if location.startswith(BIGQUERY):
        return BigQuerySink(BIGQUERY_PROJECT, dataset=TARGET.dataset, api_endpoint=location.removeprefix(BIGQUERY))
    return PostgresSink(location) if location.startswith("postgresql://") else DuckDBSink(location)


def run_pipeline(source_dsn: str, state_dsn: str, sink_location: str, batch_max_rows: int) -> dict[str, Any]:
    """One CDC run until caught up, in this process; returns what it measured."""
    started = time.perf_counter()
    with StateStore(state_dsn).open() as store:
        result = run_cdc_pipeline(
            config(source_dsn, batch_max_rows), open_bench_sink(sink_location), store, run_id=f"bench-{time.time()}",
            stop_at_caught_up=True,
        )
    stats = result.stats
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
        "events": stats.events_total,
        "chunked_transactions": stats.chunked_transactions,
        "peak_buffered_changes": stats.peak_buffered_changes,
    }


def run_child(cluster: Cluster, sink_location: str, batch_max_rows: int) -> dict[str, Any]:
    args = [cluster.dsn(), cluster.dsn(STATE_DB), sink_location, str(batch_max_rows)]
    profile = ["-m", "cProfile", "-o", str(PROFILE)] if PROFILE else []
    done = subprocess.run([sys.executable, *profile, __file__, "--child", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the CDC run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def big_transactions(cluster: Cluster, rows: int, transactions: int) -> float:
    started = time.perf_counter()
    with cluster.connect() as conn:
        for first in range(1, rows * transactions, rows):
            with conn.transaction():
                conn.execute(f"INSERT INTO {TABLE} {ROWS_SELECT}", (first, first + rows - 1))
                conn.execute(f"UPDATE {TABLE} SET qty = qty + 1, name = name || '-updated', amount = amount + 0.25 "
                             "WHERE id >= %s", (first,))
    return time.perf_counter() - started


def normalized(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(i, n, a, c.astimezone(dt.UTC), q) for i, n, a, c, q in rows]


class BigQueryReader:
    """The few calls `compare` makes, over the emulator."""

    def __init__(self, location: str) -> None:
        self.sink = BigQuerySink(BIGQUERY_PROJECT, dataset=TARGET.dataset, api_endpoint=location.removeprefix(BIGQUERY))
        self.rows: list[tuple[Any, ...]] = []

    def __enter__(self) -> BigQueryReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink.close()

    def execute(self, query: str) -> BigQueryReader:
        if query.startswith("SET "):
            return self
        query = query.replace(f"FROM {TARGET.qualified}", f"FROM `{BIGQUERY_PROJECT}.{TARGET.qualified}`")
        self.rows = [tuple(row.values()) for row in self.sink.client.query(query).result()]
        return self

    def fetchone(self) -> tuple[Any, ...]:
        return self.rows[0]

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows


def open_sink_reader(location: str) -> Any:
    if location.startswith(BIGQUERY):
        return BigQueryReader(location)
    if location.startswith("postgresql://"):
        return psycopg.connect(location, autocommit=True)
    return duckdb.connect(location, read_only=True)


def compare(cluster: Cluster, sink_location: str, rows: int, max_id: int | None = None) -> int:
    """Row by row, in id ranges up to `max_id` (default `rows`); returns the rows compared (raises
    on the first difference)."""
    compared = 0
    with cluster.connect() as source, open_sink_reader(sink_location) as sink:
        sink.execute("SET TimeZone = 'UTC'")
        (count,) = sink.execute(f"SELECT count(*) FROM {TARGET.qualified}").fetchone()  # type: ignore[misc]
        if count != rows:
            raise AssertionError(f"the sink holds {count} rows, the source {rows}")
        for low in range(1, (max_id or rows) + 1, COMPARE_RANGE):
            high = low + COMPARE_RANGE - 1
            query = f"SELECT {COLUMNS} FROM {{}} WHERE id BETWEEN {low} AND {high} ORDER BY id"
            expected = normalized(source.execute(query.format(TABLE)).fetchall())
            actual = normalized(sink.execute(query.format(TARGET.qualified)).fetchall())
            if expected != actual:
                wrong = next(i for i, (e, a) in enumerate(zip(expected, actual, strict=False)) if e != a)
                raise AssertionError(f"row {wrong + low}: source {expected[wrong]} != sink {actual[wrong]}")
            compared += len(expected)
    return compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--batch-max-rows", type=int, default=50_000)
    parser.add_argument("--transactions", type=int, default=1)
    parser.add_argument("--sink", choices=["duckdb", "postgres", "bigquery"], default="duckdb")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", nargs=4, metavar=("SOURCE", "STATE", "DUCKDB", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, state, path, batch = args.child
        print(json.dumps(run_pipeline(source, state, path, int(batch))))
        return
    with throwaway_cluster() as cluster, contextlib.ExitStack() as stack:
        with cluster.connect() as conn:
            conn.execute(f"CREATE TABLE {TABLE} ({COLUMNS_DDL})")
            conn.execute("ALTER SYSTEM SET logical_decoding_work_mem = '64MB'")
            conn.execute("SELECT pg_reload_conf()")
            if args.sink == "postgres":
                conn.execute(f"CREATE DATABASE {SINK_DB}")
        duckdb_path = cluster.pg.data_dir / "bench-bigtx.duckdb"
        sink = cluster.dsn(SINK_DB) if args.sink == "postgres" else str(duckdb_path)
        if args.sink == "bigquery":
            emulator = stack.enter_context(running_emulator(cluster.pg.data_dir / "bq-emulator"))
            sink = BIGQUERY + emulator.url
        first = run_child(cluster, sink, args.batch_max_rows)  # creates the slot, snapshots the empty table
        print(f"slot created, empty snapshot in {first['seconds']} s (peak RSS {first['peak_rss_mb']} MB)")
        source_seconds = big_transactions(cluster, args.rows, args.transactions)
        print(f"source: {args.transactions} transaction(s), each inserting then updating {args.rows:,} rows, "
              f"in {source_seconds:.1f} s")
        run = run_child(cluster, sink, args.batch_max_rows)
        print(
            f"CDC run: {run['events']:,} changes in {run['seconds']} s = {run['events'] / run['seconds']:,.0f}/s, "
            f"peak RSS {run['peak_rss_mb']} MB, {run['chunked_transactions']} transaction(s) applied in chunks, "
            f"at most {run['peak_buffered_changes']:,} changes buffered (batch_max_rows {args.batch_max_rows:,})"
        )
        started = time.perf_counter()
        compared = compare(cluster, sink, args.rows * args.transactions)
        print(f"check: {compared:,} rows equal to the source row by row ({time.perf_counter() - started:.1f} s)")
        results = {"sink": args.sink, "rows": args.rows, "transactions": args.transactions,
                   "batch_max_rows": args.batch_max_rows,
                   "source_seconds": round(source_seconds, 1),
                   "run": run, "rows_compared": compared, "peak_rss_under_1gb": run["peak_rss_mb"] < 1024}
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        duckdb_path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
