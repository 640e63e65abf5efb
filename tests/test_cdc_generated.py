"""Stored generated columns: pgoutput before PostgreSQL 18 does not publish them, so CDC leaves them
out of the sink table entirely (snapshot and stream alike) instead of filling them in snapshotted
rows and NULL in streamed ones. Batch loads, which SELECT, keep them."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import dagster as dg
import duckdb
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, run_job
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows
from test_cdc_crash import finish_worker, start_worker, wait_for

from nilus_dagster.state.store import StateStore

PUBLISHED = ["id", "qty", "price", "note"]
SOURCE_DDL = """
CREATE TABLE public.lines (
    id int PRIMARY KEY, qty int NOT NULL, price numeric(10, 2) NOT NULL,
    total numeric(12, 2) GENERATED ALWAYS AS (qty * price) STORED, note text
);
INSERT INTO public.lines (id, qty, price, note) SELECT g, g % 7, g * 0.25, 'n' || g FROM generate_series(1, 2000) g;
"""


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    return pipeline_env


def sink_columns(sink: SinkTarget, schema: str, table: str) -> list[str]:
    query = ("SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
             "ORDER BY ordinal_position")
    if sink.kind == "duckdb":
        with duckdb.connect(sink.location, read_only=True) as conn:
            return [r[0] for r in conn.execute(query.replace("%s", "?"), [schema, table]).fetchall()]
    with psycopg.connect(sink.location) as conn:
        return [r[0] for r in conn.execute(query, (schema, table)).fetchall()]


def assert_exact(env: str, sink: SinkTarget) -> None:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    assert_same_rows(source_rows(env, "public.lines", PUBLISHED, "id"), reader(sink.location, "replica.lines", PUBLISHED, "id"))
    columns = sink_columns(sink, "replica", "lines")
    assert "total" not in columns and columns[:4] == PUBLISHED


def changes(dsn: str, first_id: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.lines (id, qty, price, note) SELECT g, 3, 1.5, 'new' "
                     "FROM generate_series(%s::int, %s::int) g", (first_id, first_id + 19))
        conn.execute("UPDATE public.lines SET qty = qty + 1 WHERE id %% 11 = %s", (first_id % 11,))
        conn.execute("DELETE FROM public.lines WHERE id = %s", (first_id - 500,))


def test_cdc_leaves_generated_columns_out_of_snapshot_and_stream(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("gen", ["public.lines"]))
    first = run_until_caught_up(defs, "acme__gen", instance)
    assert first.success, failure_message(first)
    assert_exact(env, sink)
    materialization = first.get_asset_materialization_events()[-1]  # the run's last: what it did
    metadata = materialization.materialization.metadata
    assert metadata["excluded_generated_columns"].value == "total"
    asset_spec = defs.resolve_assets_def(materialization.asset_key).specs_by_key[materialization.asset_key]
    assert "not replicated" in str(asset_spec.metadata["nilus/generated_columns"])

    changes(env, 5000)
    second = run_until_caught_up(defs, "acme__gen", instance)
    assert second.success, failure_message(second)
    assert_exact(env, sink)


def test_sigkill_mid_stream_keeps_generated_columns_out(env: str, state_dsn: str, sink: SinkTarget) -> None:
    spec = json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [cdc_pipeline("crashy", ["public.lines"], cdc={"batch_max_ms": 100})]})
    worker = start_worker(spec)
    stop = threading.Event()

    def churn() -> None:
        next_id = 10_000
        while not stop.is_set():
            changes(env, next_id)
            next_id += 20

    writer = threading.Thread(target=churn)
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: store.latest_offset("acme", "crashy") is not None, 120, "the snapshot to finish")
        writer.start()
        time.sleep(random.uniform(0.5, 3.0))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        if worker.poll() is None:
            worker.kill()
    time.sleep(0.5)
    finish_worker(spec)
    assert_exact(env, sink)


def test_batch_loads_keep_generated_columns(env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    from batch_project import project

    defs = project(duckdb_sink, pipeline("lines", ["public.lines"]))
    result = run_job(defs, "acme__lines", instance)
    assert result.success, failure_message(result)
    columns = [*PUBLISHED, "total"]
    assert_same_rows(source_rows(env, "public.lines", columns, "id"),
                     duckdb_rows(duckdb_sink.location, "analytics.lines", columns, "id"))
