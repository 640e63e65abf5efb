"""Schema changes mid-stream and the rows the sink already had: they must read as PostgreSQL
reports them (a constant default fills them, a rewrite re-reads the table), never silently differ."""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, name text, old int)")
        conn.execute("INSERT INTO public.items SELECT g, 'n' || g, g FROM generate_series(1, 20) g")
    return pipeline_env


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def columns_of(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum"
        ).fetchall()
    return [r[0] for r in rows]


def assert_exact(env: str, sink: SinkTarget) -> None:
    columns = columns_of(env)
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    assert_same_rows(
        source_rows(env, "public.items", columns, "id"), reader(sink.location, "replica.items", columns, "id")
    )


def test_added_columns_read_in_older_rows_as_postgres_reports_them(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("items", ["public.items"]))
    assert run_until_caught_up(defs, "acme__items", instance).success
    execute(
        env,
        "UPDATE public.items SET name = 'streamed before' WHERE id = 1",
        "ALTER TABLE public.items ADD COLUMN qty int DEFAULT 7, ADD COLUMN note text DEFAULT 'it''s \"new\"', "
        "ADD COLUMN tags text[] DEFAULT '{a,\"b c\"}', ADD COLUMN at timestamptz DEFAULT now(), "
        "ADD COLUMN price numeric(10,2) DEFAULT 1.50, ADD COLUMN plain int",
        "INSERT INTO public.items (id, name, qty) VALUES (100, 'after', 1)",
        "UPDATE public.items SET qty = 8 WHERE id = 2",
    )
    result = run_until_caught_up(defs, "acme__items", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink)


def test_a_column_dropped_and_added_again_reads_its_new_default(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("items", ["public.items"]))
    assert run_until_caught_up(defs, "acme__items", instance).success
    execute(env, "ALTER TABLE public.items DROP COLUMN old", "UPDATE public.items SET name = 'x' WHERE id = 3")
    assert run_until_caught_up(defs, "acme__items", instance).success
    execute(env, "ALTER TABLE public.items ADD COLUMN old int DEFAULT -1", "UPDATE public.items SET name = 'y' WHERE id = 4")
    result = run_until_caught_up(defs, "acme__items", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink)


def test_a_default_added_inside_a_transaction_reaches_its_earlier_rows(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("items", ["public.items"]))
    assert run_until_caught_up(defs, "acme__items", instance).success
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.items VALUES (50, 'before the change', 1)")
        conn.execute("UPDATE public.items SET name = 'changed before' WHERE id = 1")
        conn.execute("ALTER TABLE public.items ADD COLUMN qty int DEFAULT 3")
        conn.execute("INSERT INTO public.items VALUES (51, 'after the change', 2, 9)")
    result = run_until_caught_up(defs, "acme__items", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink)
