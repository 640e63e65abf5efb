"""Load one batch pipeline's tables, optionally killing this process (SIGKILL) at a crash point.

Usage: python batch_worker.py '<PipelinesSpec JSON>' <pipeline name> [crash point]
Crash points (see CRASH_POINTS): the process dies exactly there, as a killed run would.
Environment: the DSN variables the spec names, NILUS_STATE_DSN.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from nilus_dagster.batch import BatchTableLoad, load_table
from nilus_dagster.sinks.base import SinkTable, WriteStrategy
from nilus_dagster.sinks.bigquery import BigQuerySink
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.factory import open_pipeline_sink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.sinks.sql_sink import SqlSink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

CRASH_POINTS = (
    "before_write",  # nothing reached the sink
    "after_data",  # the rows are written (SQL: inside the open transaction; BigQuery: the data job is done)
    "after_commit_unacknowledged",  # BigQuery append: the transaction ran, the client never heard back
    "after_checkpoint",  # the sink committed rows and checkpoint; the state store was not updated
)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before(owner: type, name: str) -> None:
    def crash(*args: Any, **kwargs: Any) -> Any:
        die()

    setattr(owner, name, crash)


def kill_after(owner: type, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def crash(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if when(*args, **kwargs):
            die()
        return result

    setattr(owner, name, crash)


def arm(point: str) -> None:
    sinks: tuple[type, ...] = (SqlSink, BigQuerySink)
    if point == "before_write":
        for sink in sinks:
            kill_before(sink, "write")
    elif point == "after_data":
        for sql_sink in (DuckDBSink, PostgresSink):
            kill_after(sql_sink, "_load_rows")  # inside the transaction, before the checkpoint
        kill_before(BigQuerySink, "_save_checkpoint")  # merge, replace: after their data job
        kill_before(BigQuerySink, "_advance_mark")  # append: after its staging load
    elif point == "after_commit_unacknowledged":
        kill_after(BigQuerySink, "_query", lambda self, sql, *a: "BEGIN TRANSACTION" in sql and "@previous" in sql)
    elif point == "after_checkpoint":
        for sink in sinks:
            kill_after(sink, "write")
    else:
        raise SystemExit(f"unknown crash point {point!r}; one of {CRASH_POINTS}")


def run_loads(spec: PipelinesSpec, name: str, store: StateStore) -> None:
    """What the pipeline's Dagster job does for each table, without Dagster."""
    pipeline = next(p for p in spec.pipelines if p.name == name)
    source = spec.connections[pipeline.source.connection]
    for table in pipeline.source.tables:
        load = BatchTableLoad(
            key=PipelineKey(pipeline.tenant, pipeline.name, pipeline.effective_resource_id),
            source_connection=pipeline.source.connection,
            source_dsn=source.dsn(pipeline.source.connection),  # type: ignore[union-attr]
            table=table,
            target=SinkTable(pipeline.sink.dataset, table.target_name),
            strategy=WriteStrategy(pipeline.sink.strategy),
            source_type=source.type,
        )
        sink = open_pipeline_sink(spec, pipeline)
        try:
            load_table(load, sink, store)
        finally:
            sink.close()


def parse_spec(text: str) -> PipelinesSpec:
    return validate_spec(PipelinesSpec, json.loads(text), "batch worker")


def main() -> None:
    spec = parse_spec(sys.argv[1])
    if len(sys.argv) > 3:
        arm(sys.argv[3])
    with StateStore(os.environ["NILUS_STATE_DSN"]).open() as store:
        run_loads(spec, sys.argv[2], store)


if __name__ == "__main__":
    main()
