"""Our sides of the snapshot benchmark, each in a fresh process (its own peak RSS), as a script:

    python -m snapbench.ours SIDE SOURCE_DSN STATE_DSN TABLE SINK RUN_NO

SIDE is `replace`, `merge` (a replace, then a timed merge of every row over it), `merge-empty` or
`cdc`; SINK is a DuckDB file path or a PostgreSQL DSN. Prints one JSON line: seconds, rows,
peak RSS (MB) of the process, and the sink table's row count.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import psycopg

from nilus_dagster.batch.loader import BatchTableLoad, load_table
from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcTableConfig, run_cdc_pipeline
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkTable, WriteStrategy
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.spec.pipelines import SourceTable
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

DATASET = "bench"


def open_sink(where: str) -> Sink:
    return PostgresSink(where) if where.startswith("postgresql://") else DuckDBSink(where)  # type: ignore[return-value]


def batch(store: StateStore, source: str, table: str, sink: Sink, strategy: str, name: str) -> tuple[float, int]:
    load = BatchTableLoad(
        PipelineKey("bench", name, f"nilus:v1:{name}:bench"), "bench", source,
        SourceTable(name=f"public.{table}"), SinkTable(DATASET, table), WriteStrategy(strategy),
    )  # fmt: skip
    started = time.perf_counter()
    result = load_table(load, sink, store)
    return time.perf_counter() - started, result.rows


def cdc(store: StateStore, source: str, table: str, sink: Sink, name: str) -> tuple[float, int]:
    """A fresh pipeline's first run: slot, exported snapshot, CTID partitions, stream start."""
    config = CdcPipelineConfig(
        key=PipelineKey("bench", name, f"nilus:v1:{name}:bench"),
        source_connection="bench",
        source_dsn=source,
        tables=(CdcTableConfig(TableName.parse(f"public.{table}"), SinkTable(DATASET, table)),),
        snapshot="initial",
        snapshot_workers=2,
        publication_name=f"bench_pub_{name}",
    )
    try:
        started = time.perf_counter()
        result = run_cdc_pipeline(config, sink, store, run_id=name, stop_at_caught_up=True)  # type: ignore[arg-type]
        return time.perf_counter() - started, result.snapshot_rows
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (config.slot(source.rsplit("/", 1)[-1]),),
            )


def main(argv: list[str]) -> dict[str, Any]:
    side, source, state, table, where, run_no = argv
    name = f"{side.replace('-', '_')}_{table}_{run_no}"
    sink = open_sink(where)
    with StateStore(state).open() as store:
        if side == "cdc":
            seconds, rows = cdc(store, source, table, sink, name)
        elif side == "merge":
            batch(store, source, table, sink, "replace", name + "_first")
            seconds, rows = batch(store, source, table, sink, "merge", name)
        else:
            seconds, rows = batch(store, source, table, sink, "merge" if side == "merge-empty" else side, name)
    table_rows = sink.row_count(SinkTable(DATASET, table))  # type: ignore[attr-defined]
    sink.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "rows": rows, "table_rows": table_rows, "peak_rss_mb": round(peak)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
