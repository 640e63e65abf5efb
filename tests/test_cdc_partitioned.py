"""Partitioned source tables: one sink table fed by every partition, in the snapshot and the stream,
including partitions attached later with rows already in them; compared row by row."""

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
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows
from test_cdc_crash import finish_worker, start_worker, wait_for

from nilus_dagster.state.store import StateStore

COLUMNS = ["id", "day", "reading", "note"]
SOURCE_DDL = """
CREATE TABLE public.measurements (
    id bigint NOT NULL, day date NOT NULL, reading numeric(12, 3), note text, PRIMARY KEY (id, day)
) PARTITION BY RANGE (day);
CREATE TABLE public.m_2024_01 PARTITION OF public.measurements FOR VALUES FROM ('2024-01-01') TO ('2024-02-01');
-- a sub-partitioned partition: its leaves hold the rows
CREATE TABLE public.m_2024_02 PARTITION OF public.measurements FOR VALUES FROM ('2024-02-01') TO ('2024-03-01')
    PARTITION BY HASH (id);
CREATE TABLE public.m_2024_02_a PARTITION OF public.m_2024_02 FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE public.m_2024_02_b PARTITION OF public.m_2024_02 FOR VALUES WITH (MODULUS 2, REMAINDER 1);
-- a partition made separately, its columns in another order, then attached
CREATE TABLE public.m_2024_03 (note text, reading numeric(12, 3), day date NOT NULL, id bigint NOT NULL);
ALTER TABLE public.measurements ATTACH PARTITION public.m_2024_03 FOR VALUES FROM ('2024-03-01') TO ('2024-04-01');
INSERT INTO public.measurements
SELECT g, date '2024-01-01' + (g % 90), g * 0.5, repeat('n', 1 + g % 40) FROM generate_series(1, 3000) g;
"""
LATE_PARTITION = """
CREATE TABLE public.m_2024_04 (id bigint NOT NULL, day date NOT NULL, reading numeric(12, 3), note text);
INSERT INTO public.m_2024_04 SELECT g, date '2024-04-01' + (g % 30), -g, 'before attach'
FROM generate_series(100001, 100400) g;
ALTER TABLE public.measurements ATTACH PARTITION public.m_2024_04 FOR VALUES FROM ('2024-04-01') TO ('2024-05-01');
"""


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    return pipeline_env


def sink_rows(sink: SinkTarget) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, "replica.measurements", COLUMNS, "id, day")


def rows_if_readable(sink: SinkTarget) -> list[tuple]:
    """The sink's rows, or none while the running worker holds the DuckDB file."""
    try:
        return sink_rows(sink)
    except duckdb.IOException:
        return []


def assert_exact(env: str, sink: SinkTarget) -> None:
    assert_same_rows(source_rows(env, "public.measurements", COLUMNS, "id, day"), sink_rows(sink))


def changes(dsn: str, round_no: int) -> None:
    """Inserts into every partition, updates, rows moving between partitions, deletes."""
    base = 10_000 + round_no * 1000
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO public.measurements SELECT g, date '2024-01-01' + (g %% 90)::int, g, 'new' "
                         "FROM generate_series(%s::bigint, %s::bigint) g", (base, base + 99))
            conn.execute("UPDATE public.measurements SET reading = reading + 1 WHERE id %% 13 = %s", (round_no % 13,))
        conn.execute("UPDATE public.measurements SET day = day + 31 WHERE id %% 97 = %s AND day < '2024-03-01'",
                     (round_no % 97,))
        conn.execute("DELETE FROM public.measurements WHERE id %% 101 = %s", (round_no % 101,))


def test_snapshot_stream_and_late_partition_are_exact(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    pipeline = cdc_pipeline("metrics", ["public.measurements"], cdc={"snapshot_partition_blocks": 4})
    defs = cdc_project(sink, pipeline)
    first = run_until_caught_up(defs, "acme__metrics", instance)
    assert first.success, failure_message(first)
    assert_exact(env, sink)
    with psycopg.connect(env, autocommit=True) as conn:
        published = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables").fetchall()
    assert published == [("public", "measurements")]

    changes(env, 1)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute(LATE_PARTITION)  # its 400 rows are never streamed
        conn.execute("UPDATE public.measurements SET note = 'after attach' WHERE id BETWEEN 100001 AND 100010")
        conn.execute("DELETE FROM public.measurements WHERE id BETWEEN 100011 AND 100020")
    changes(env, 2)
    second = run_until_caught_up(defs, "acme__metrics", instance)
    assert second.success, failure_message(second)
    assert_exact(env, sink)
    assert sum(r[3] == "before attach" for r in sink_rows(sink)) > 300  # merged, not streamed


def test_partition_attached_while_streaming_is_merged(
    env: str, state_dsn: str, sink: SinkTarget
) -> None:
    spec = spec_json(sink)
    worker = start_worker(spec)
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: store.latest_offset("acme", "crashy") is not None, 120, "the snapshot to finish")
        changes(env, 3)
        with psycopg.connect(env, autocommit=True) as conn:
            conn.execute(LATE_PARTITION)
            conn.execute("UPDATE public.measurements SET note = 'after attach' WHERE id BETWEEN 100001 AND 100010")
        wait_for(lambda: any(r[3] == "before attach" for r in rows_if_readable(sink)), 60, "the attached rows to merge")
        changes(env, 4)
        time.sleep(1.0)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finish_worker(spec)
    assert_exact(env, sink)


def spec_json(sink: SinkTarget, **cdc: object) -> str:
    pipeline = cdc_pipeline("crashy", ["public.measurements"],
                            cdc={"batch_max_ms": 100, "batch_max_rows": 500, "snapshot_partition_blocks": 2, **cdc})
    return json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [pipeline]})


def churn(dsn: str, stop: threading.Event) -> None:
    round_no = 10
    while not stop.is_set():
        changes(dsn, round_no)
        round_no += 1


@pytest.mark.parametrize("seed", [7])
def test_sigkill_at_a_random_moment_loses_and_doubles_nothing(
    env: str, state_dsn: str, sink: SinkTarget, seed: int
) -> None:
    """Killed somewhere in the snapshot or the stream while partitions change (and one is attached)."""
    moment = random.Random(seed).uniform(0.3, 4.0)
    spec = spec_json(sink)
    worker = start_worker(spec)
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop))
    writer.start()
    try:
        time.sleep(moment)
        with psycopg.connect(env, autocommit=True) as conn:
            conn.execute(LATE_PARTITION)
        time.sleep(moment / 2)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        stop.set()
        writer.join()
        if worker.poll() is None:
            worker.kill()
    finish_worker(spec)
    assert_exact(env, sink)


def test_a_partition_listed_with_its_parent_is_refused(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("both", ["public.measurements", "public.m_2024_02_a"]))
    result = run_until_caught_up(defs, "acme__both", instance)
    assert not result.success
    assert ("public.m_2024_02_a is a partition of public.m_2024_02, and both are in the pipeline"
            in failure_message(result)) or "public.m_2024_02_a is a partition of public.measurements" in failure_message(result)


def test_a_partition_without_replica_identity_is_refused_naming_the_fix(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.m_2024_03 REPLICA IDENTITY NOTHING")
    result = run_until_caught_up(cdc_project(sink, cdc_pipeline("m", ["public.measurements"])), "acme__m", instance)
    assert not result.success
    assert ("public.measurements's partition public.m_2024_03 has REPLICA IDENTITY NOTHING" in failure_message(result))
    assert "ALTER TABLE public.m_2024_03 REPLICA IDENTITY DEFAULT" in failure_message(result)


def test_a_detached_partition_stops_the_pipeline_naming_the_reset(
    env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(duckdb_sink, cdc_pipeline("m", ["public.measurements"]))
    assert run_until_caught_up(defs, "acme__m", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.measurements DETACH PARTITION public.m_2024_03")
    result = run_until_caught_up(defs, "acme__m", instance)
    assert not result.success
    message = failure_message(result)
    assert "partition(s) public.m_2024_03 left public.measurements (detached or dropped)" in message
    assert "__reset" in message


def test_keyless_partitioned_table_streams_and_refuses_an_attached_partition_with_rows(
    pipeline_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    env = pipeline_env
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.log (pos int NOT NULL, msg text) PARTITION BY RANGE (pos)")
        conn.execute("CREATE TABLE public.log_1 PARTITION OF public.log FOR VALUES FROM (0) TO (100)")
        conn.execute("CREATE TABLE public.log_2 PARTITION OF public.log FOR VALUES FROM (100) TO (200)")
        conn.execute("INSERT INTO public.log SELECT g % 200, 'm' || g FROM generate_series(1, 600) g")
    defs = cdc_project(duckdb_sink, cdc_pipeline("log", ["public.log"]))
    refused = run_until_caught_up(defs, "acme__log", instance)
    assert not refused.success
    assert "ALTER TABLE public.log REPLICA IDENTITY FULL and the same on every partition" in failure_message(refused)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.log REPLICA IDENTITY FULL")  # not inherited by the partitions
    refused = run_until_caught_up(defs, "acme__log", instance)
    assert not refused.success
    assert "ALTER TABLE public.log_1 REPLICA IDENTITY FULL" in failure_message(refused)

    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.log_1 REPLICA IDENTITY FULL")
        conn.execute("ALTER TABLE public.log_2 REPLICA IDENTITY FULL")
    first = run_until_caught_up(defs, "acme__log", instance)
    assert first.success, failure_message(first)
    columns = ["pos", "msg"]
    assert_same_rows(source_rows(env, "public.log", columns, "pos, msg"),
                     duckdb_rows(duckdb_sink.location, "replica.log", columns, "pos, msg"))
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.log VALUES (5, 'early'), (150, 'late')")
        conn.execute("DELETE FROM public.log WHERE msg = 'm42'")
        conn.execute("UPDATE public.log SET pos = pos + 100 WHERE pos = 7")
    second = run_until_caught_up(defs, "acme__log", instance)
    assert second.success, failure_message(second)
    assert_same_rows(source_rows(env, "public.log", columns, "pos, msg"),
                     duckdb_rows(duckdb_sink.location, "replica.log", columns, "pos, msg"))

    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.log_3 (pos int NOT NULL, msg text)")
        conn.execute("ALTER TABLE public.log_3 REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO public.log_3 VALUES (250, 'before attach')")
        conn.execute("ALTER TABLE public.log ATTACH PARTITION public.log_3 FOR VALUES FROM (200) TO (300)")
    third = run_until_caught_up(defs, "acme__log", instance)
    assert not third.success
    assert "partition public.log_3 was attached to public.log with rows in it" in failure_message(third)
