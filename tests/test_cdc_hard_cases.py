"""CDC cases the field gets wrong, end to end on the DuckDB and PostgreSQL sinks, row by row:
identical rows of a key-less table (a multiset), and key changes that leave a TOASTed value
unchanged while the old row is not in the batch. Each also with a SIGKILL mid-stream.
"""

from __future__ import annotations

import json
import threading

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows
from test_cdc_crash import sigkill_mid_stream

LOG_COLUMNS = ["msg", "n", "payload"]
LOG_ORDER = "msg, n NULLS FIRST, payload"
DOC_COLUMNS = ["id", "body", "n"]

SOURCE_DDL = """
CREATE TABLE public.log (msg text, n int, payload jsonb);
ALTER TABLE public.log REPLICA IDENTITY FULL;
INSERT INTO public.log SELECT 'boot', 1, '{"a": 1}' FROM generate_series(1, 3);
INSERT INTO public.log VALUES ('null', NULL, NULL), ('null', NULL, NULL);
CREATE TABLE public.docs (id int PRIMARY KEY, body text, n int NOT NULL);
-- bodies of ~40 kB of incompressible text: stored out of line (TOASTed)
INSERT INTO public.docs
SELECT g, (SELECT string_agg(md5(random()::text || g || i), '') FROM generate_series(1, 1250) i), 0
FROM generate_series(1, 8) g;
"""


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
    return reader(sink.location, f"(SELECT * FROM {table} WHERE NOT coalesce(_nilus_deleted, false)) t", columns, order_by)


def assert_exact(env: str, sink: SinkTarget) -> None:
    assert_same_rows(
        source_rows(env, "public.log", LOG_COLUMNS, LOG_ORDER), sink_rows(sink, "replica.log", LOG_COLUMNS, LOG_ORDER)
    )
    assert_same_rows(
        source_rows(env, "public.docs", DOC_COLUMNS, "id"), sink_rows(sink, "replica.docs", DOC_COLUMNS, "id")
    )


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def one_copy(where: str) -> str:
    """Only one of several identical rows: by its physical position."""
    return f"ctid = (SELECT ctid FROM public.log WHERE {where} LIMIT 1)"


def test_identical_rows_of_a_keyless_table_keep_their_multiplicity(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("hard", ["public.log", "public.docs"]))
    assert run_until_caught_up(defs, "acme__hard", instance).success
    assert_exact(env, sink)

    with psycopg.connect(env, autocommit=True) as conn:
        with conn.transaction():  # three identical inserts in one transaction, and one undone at once
            for _ in range(4):
                conn.execute("INSERT INTO public.log VALUES ('dup', 7, '{\"k\": [1]}')")
            conn.execute(f"DELETE FROM public.log WHERE {one_copy('msg = $$dup$$')}")
        conn.execute("INSERT INTO public.log VALUES ('dup', 7, '{\"k\": [1]}')")  # a fourth, on its own
        conn.execute(f"DELETE FROM public.log WHERE {one_copy('msg = $$boot$$')}")  # one of three
        conn.execute(f"UPDATE public.log SET n = 2 WHERE {one_copy('msg = $$boot$$')}")  # one of two left
        conn.execute(f"DELETE FROM public.log WHERE {one_copy('msg = $$null$$')}")  # NULLs match NULLs
        with conn.transaction():  # update a copy back and forth: identical again
            conn.execute(f"UPDATE public.log SET n = 99 WHERE {one_copy('msg = $$dup$$')}")
            conn.execute("UPDATE public.log SET n = 7 WHERE n = 99")
    result = run_until_caught_up(defs, "acme__hard", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink)
    assert [r for r in sink_rows(sink, "replica.log", ["msg"], "msg") if r[0] == "dup"] == [("dup",)] * 4


def test_key_change_keeps_the_unchanged_toasted_value(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    defs = cdc_project(sink, cdc_pipeline("hard", ["public.log", "public.docs"]))
    assert run_until_caught_up(defs, "acme__hard", instance).success
    execute(
        env,
        # the old rows were snapshotted, not in this batch: the value is only in the sink
        "UPDATE public.docs SET id = id + 1000, n = n + 1 WHERE id <= 3",
        # a chain of key changes inside the batch, then a plain update of the last key
        "UPDATE public.docs SET id = 2004 WHERE id = 4",
        "UPDATE public.docs SET id = 3004 WHERE id = 2004",
        "UPDATE public.docs SET n = 5 WHERE id = 3004",
        # a key moved onto a key deleted earlier in the batch
        "DELETE FROM public.docs WHERE id = 5",
        "UPDATE public.docs SET id = 5 WHERE id = 6",
    )
    result = run_until_caught_up(defs, "acme__hard", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink)
    bodies = sink_rows(sink, "replica.docs", ["id", "body"], "id")
    assert all(body is not None and len(body) == 40_000 for _, body in bodies)


def churn(dsn: str, stop: threading.Event) -> None:
    """Duplicates in and out of the key-less table, key changes on the TOASTed one."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        i = 0
        while not stop.is_set():
            with conn.transaction():
                conn.execute("INSERT INTO public.log SELECT 'churn', %s::int %% 3, NULL FROM generate_series(1, 3)", (i,))
                conn.execute(f"DELETE FROM public.log WHERE {one_copy('msg = $$churn$$')}")
                conn.execute(f"UPDATE public.log SET payload = '{{}}' WHERE {one_copy('payload IS NULL')}")
            conn.execute("UPDATE public.docs SET id = id + 100, n = n + 1 WHERE id = (SELECT min(id) FROM public.docs)")
            i += 1
            stop.wait(0.01)  # a steady stream, not a flood: the restart has a bounded backlog


def test_sigkill_mid_stream_keeps_multisets_and_toasted_values_exact(env: str, state_dsn: str, sink: SinkTarget) -> None:
    pipeline = cdc_pipeline("hard", ["public.log", "public.docs"], cdc={"batch_max_ms": 100, "batch_max_rows": 200})
    spec = json.dumps(
        {
            "connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
            "pipelines": [pipeline],
        }
    )

    sigkill_mid_stream(spec, state_dsn, lambda stop: churn(env, stop), pipeline="hard", settle_s=1.5)
    assert_exact(env, sink)
