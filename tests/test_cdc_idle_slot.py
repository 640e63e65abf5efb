"""An idle pipeline in a busy cluster: its slot must keep up with the WAL other databases write.

A logical slot holds the whole cluster's WAL from its restart point. When the pipeline's own tables
see no change, only the run's acknowledgements of keepalives and heartbeats move the slot, so its
retained WAL stays bounded however much another database writes. The run is also SIGKILLed and
restarted at a random moment of the busy period; the quiet table still ends equal to its source.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid

import psycopg
import pytest
from batch_project import SinkTarget
from cdc_project import cdc_pipeline
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows
from test_cdc_crash import finish_worker, start_worker, wait_for

from nilus_dagster.embedded.postgres import EmbeddedPostgres
from nilus_dagster.state.store import StateStore

BUSY_SECONDS = float(os.environ.get("NILUS_IDLE_SLOT_SECONDS", "25"))
SLOT_SQL = """
SELECT confirmed_flush_lsn, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
FROM pg_replication_slots WHERE database = current_database()
"""
COLUMNS = ["id", "v"]


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def busy_db(pg_cluster: EmbeddedPostgres) -> str:
    name = f"busy_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg_cluster.dsn(name)


def busy_writer(dsn: str, stop: threading.Event, written: list[int]) -> None:
    """Another database of the cluster writing heavily: ~2 MB per statement, many commits."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE noise (id bigserial PRIMARY KEY, payload text)")
        start = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
        while not stop.is_set():
            conn.execute("INSERT INTO noise (payload) SELECT repeat('z', 900) FROM generate_series(1, 2000)")
            conn.execute("DELETE FROM noise WHERE id < (SELECT max(id) - 20000 FROM noise)")
        row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)::bigint", (start,)).fetchone()
        written.append(int(row[0]))  # type: ignore[index]


def slot_active(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT bool_or(active) FROM pg_replication_slots WHERE database = current_database()")
    return bool(row.fetchone()[0])  # type: ignore[index]


def sink_rows(sink: SinkTarget) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, "replica.quiet", COLUMNS, "id")


def test_idle_slot_keeps_up_while_another_database_writes(
    pipeline_env: str, state_dsn: str, sink: SinkTarget, busy_db: str
) -> None:
    env = pipeline_env
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.quiet (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.quiet SELECT g, 'x' FROM generate_series(1, 100) g")
    spec = json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [cdc_pipeline("crashy", ["public.quiet"])]})
    kill_at = random.uniform(0.2, 0.6) * BUSY_SECONDS
    stop, written = threading.Event(), []
    writer = threading.Thread(target=busy_writer, args=(busy_db, stop, written))
    worker = start_worker(spec)
    confirmed: set[str] = set()
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: store.latest_offset("acme", "crashy") is not None, 120, "the snapshot to finish")
        with psycopg.connect(env, autocommit=True) as conn:
            writer.start()
            started = time.monotonic()
            while time.monotonic() - started < BUSY_SECONDS:
                time.sleep(1)
                confirmed.add(str(conn.execute(SLOT_SQL).fetchone()[0]))  # type: ignore[index]
                if worker.poll() is None and time.monotonic() - started >= kill_at:
                    worker.send_signal(signal.SIGKILL)  # a crash while the other database writes
                    worker.wait(timeout=30)
                    wait_for(lambda: not slot_active(conn), 30, "the killed run's walsender to exit")
                    worker = start_worker(spec)
                    kill_at = float("inf")
            stop.set()
            writer.join()
            conn.execute("UPDATE public.quiet SET v = 'after the busy period' WHERE id <= 10")

            def retained() -> int:
                return conn.execute(SLOT_SQL).fetchone()[1]  # type: ignore[index]

            # The slot releases what the other database wrote (bounded, not growing with it).
            assert worker.poll() is None, worker.communicate()[1].decode()[-3000:]
            wait_for(lambda: retained() < written[0] / 10, 60, "the idle slot to release the busy database's WAL")
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        if worker.poll() is None:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
    assert len(confirmed) >= 3, f"confirmed_flush_lsn hardly moved during the busy period: {sorted(confirmed)}"
    time.sleep(1)
    finish_worker(spec)
    assert_same_rows(source_rows(env, "public.quiet", COLUMNS, "id"), sink_rows(sink))


def test_heartbeats_are_written_only_while_the_stream_is_idle(source_db: str) -> None:
    from nilus_dagster.cdc.pgoutput import LogicalMessage
    from nilus_dagster.cdc.replication import ReplicationConnection

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
        conn.execute("CREATE PUBLICATION hb FOR TABLE public.t")
        with ReplicationConnection.connect(source_db) as replication:
            replication.create_slot("hb_slot", export_snapshot=False)
            stream = replication.start("hb_slot", ["hb"], heartbeat_interval_s=0.5)
            received = []
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:  # idle: heartbeats, consumed by the stream
                received += stream.poll(timeout_s=0.1)
            assert received == []
            assert stream.heartbeat is not None and stream.heartbeat.error is None
            assert stream.heartbeat.sent >= 2
            assert stream.heartbeat_lsn > 0 and (stream.caught_up_lsn or 0) >= stream.heartbeat_lsn  # or a later keepalive
            idle_heartbeats = stream.heartbeat.sent
            deadline, next_id = time.monotonic() + 2.5, 1
            while time.monotonic() < deadline:  # data every 0.1 s: no heartbeat
                conn.execute("INSERT INTO public.t VALUES (%s)", (next_id,))
                next_id += 1
                received += stream.poll(timeout_s=0.1)
            assert stream.heartbeat.sent <= idle_heartbeats + 1  # at most one already due when data began
            assert received and not any(isinstance(m, LogicalMessage) for _, m in received)
