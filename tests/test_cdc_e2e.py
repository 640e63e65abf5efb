"""CDC end to end: exported-snapshot initial load, then streamed changes, compared row by row."""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows

SOURCE_DDL = """
CREATE TABLE public.orders (
    id bigint PRIMARY KEY,
    status text NOT NULL,
    amount numeric(38, 9),
    placed_at timestamptz,
    attrs jsonb,
    tags text[],
    notes text
);
CREATE TABLE public.events (kind text, happened_at timestamptz, payload jsonb);
ALTER TABLE public.events REPLICA IDENTITY FULL;
INSERT INTO public.orders
SELECT g, 'new', g * 1.123456789, '2024-01-01 00:00:00+02'::timestamptz + g * interval '1 hour',
       jsonb_build_object('n', g), ARRAY['t' || g, NULL], CASE WHEN g % 10 = 0 THEN repeat('x', 20000) END
FROM generate_series(1, 500) g;
INSERT INTO public.events SELECT 'boot', '2024-01-01'::timestamptz + g * interval '1 minute', '{}' FROM generate_series(1, 20) g;
"""
ORDER_COLUMNS = ["id", "status", "amount", "placed_at", "attrs", "tags", "notes"]
EVENT_COLUMNS = ["kind", "happened_at", "payload"]


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    return pipeline_env


def sink_rows(sink: SinkTarget, table: str, columns: list[str], order_by: str) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    where_live = f"(SELECT * FROM {table} WHERE NOT coalesce(_nilus_deleted, false)) t"
    return reader(sink.location, where_live, columns, order_by)


def assert_replica_matches(env: str, sink: SinkTarget) -> None:
    assert_same_rows(
        source_rows(env, "public.orders", ORDER_COLUMNS, "id"),
        sink_rows(sink, "replica.orders", ORDER_COLUMNS, "id"),
    )
    assert_same_rows(
        source_rows(env, "public.events", EVENT_COLUMNS, "kind, happened_at"),
        sink_rows(sink, "replica.events", EVENT_COLUMNS, "kind, happened_at"),
    )


def workload(dsn: str) -> None:
    """Inserts, updates (TOASTed values untouched, key changes), deletes and a truncate."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(20):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO public.orders SELECT g, 'new', g / 7.0, now(), '{\"k\": [1, 2]}', '{a,b}', NULL "
                    "FROM generate_series(%s::int, %s::int) g",
                    (1000 + i * 10, 1009 + i * 10),
                )
                conn.execute("UPDATE public.orders SET status = 'paid' WHERE id %% 20 = %s::int", (i,))
                conn.execute("DELETE FROM public.orders WHERE id = %s::int", (100 + i,))
        conn.execute("UPDATE public.orders SET status = 'toast-kept' WHERE notes IS NOT NULL")  # TOAST unchanged
        conn.execute("UPDATE public.orders SET id = id + 100000 WHERE id BETWEEN 1 AND 5")  # key changes
        with conn.transaction():  # insert and update the same row in one transaction
            conn.execute("INSERT INTO public.orders VALUES (9999, 'a', 1, now(), NULL, NULL, repeat('y', 30000))")
            conn.execute("UPDATE public.orders SET status = 'b' WHERE id = 9999")
        conn.execute("TRUNCATE public.events")
        conn.execute("INSERT INTO public.events VALUES ('after', now(), '{\"x\": 1}'), ('after', now() + interval '1s', NULL)")
        conn.execute("UPDATE public.events SET kind = 'changed' WHERE payload IS NULL")


def test_snapshot_then_stream_is_exact(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    defs = cdc_project(sink, cdc_pipeline("shop", ["public.orders", "public.events"]))
    first = run_until_caught_up(defs, "acme__shop", instance)
    assert first.success, failure_message(first)
    assert_replica_matches(env, sink)

    workload(env)
    second = run_until_caught_up(defs, "acme__shop", instance)
    assert second.success, failure_message(second)
    assert_replica_matches(env, sink)
    run = instance.get_run_by_id(second.run_id)
    assert run is not None and run.tags["nilus/tenant"] == "acme"

    # A third run with nothing new changes nothing.
    third = run_until_caught_up(defs, "acme__shop", instance)
    assert third.success, failure_message(third)
    assert_replica_matches(env, sink)
