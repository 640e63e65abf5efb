"""Crash recovery: SIGKILL the CDC process mid-snapshot and mid-stream, restart, compare.

The source keeps changing while the process dies; after a restart the sink must equal the
source row by row: nothing lost, nothing applied twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from batch_project import SinkTarget
from cdc_project import cdc_pipeline
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows

from nilus_dagster.state.store import StateStore

WORKER = Path(__file__).with_name("cdc_worker.py")
COLUMNS = ["id", "counter", "label", "updated_at"]


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    return pipeline_env


def spec_json(sink: SinkTarget, **cdc: object) -> str:
    pipeline = cdc_pipeline("crashy", ["public.items"], cdc={"batch_max_ms": 100, "batch_max_rows": 500, **cdc})
    return json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [pipeline]})


def start_worker(spec: str, *extra: str, pipeline: str = "crashy") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(WORKER), spec, pipeline, *extra], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_worker(spec: str, pipeline: str = "crashy") -> None:
    """A clean run that stops once caught up (the restart after the crash)."""
    worker = start_worker(spec, "caught_up", pipeline=pipeline)
    # a guard against a hang, not a speed bound: catching up thousands of transactions just over
    # batch_max_rows (each one its own batch, one sink call apiece: cdc/spanning.py) took up to
    # 4.5 min on a loaded 2-core machine (the workload's size follows the machine's speed)
    _, stderr = worker.communicate(timeout=720)
    assert worker.returncode == 0, stderr.decode()[-3000:]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def churn(dsn: str, stop: threading.Event, first_id: int) -> None:
    """Many small transactions: inserts, counter increments, deletes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        next_id = first_id
        while not stop.is_set():
            with conn.transaction():
                conn.execute("INSERT INTO public.items SELECT g, 0, 'new', now() FROM generate_series(%s::int, %s::int) g",
                             (next_id, next_id + 9))
                conn.execute("UPDATE public.items SET counter = counter + 1, updated_at = now() WHERE id %% 7 = %s::int",
                             (next_id % 7,))
                conn.execute("DELETE FROM public.items WHERE id = %s::int", (next_id - 35,))
            next_id += 10


def sink_rows(sink: SinkTarget) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, "replica.items", COLUMNS, "id")


def assert_exact(env: str, sink: SinkTarget) -> None:
    assert_same_rows(source_rows(env, "public.items", COLUMNS, "id"), sink_rows(sink))


def create_items(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, counter int NOT NULL, label text, "
                     "updated_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO public.items SELECT g, 0, repeat('x', 50), now() FROM generate_series(1, %s) g", (rows,))


def sigkill_mid_stream(
    spec: str, state_dsn: str, write: Callable[[threading.Event], None], *, pipeline: str = "crashy", settle_s: float = 1.0
) -> None:
    """Start the worker, let `write` change the source once streaming, SIGKILL the worker while
    changes still arrive, then restart it until caught up."""
    worker = start_worker(spec, pipeline=pipeline)
    stop = threading.Event()
    writer = threading.Thread(target=write, args=(stop,))
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: store.latest_offset("acme", pipeline) is not None, 120, "the snapshot to finish")
            writer.start()
            first = store.latest_offset("acme", pipeline)
            wait_for(lambda: store.latest_offset("acme", pipeline) != first, 120, "streamed batches to commit")
        time.sleep(settle_s)
        worker.send_signal(signal.SIGKILL)  # mid-stream, with changes still arriving
        worker.wait(timeout=30)
        time.sleep(0.5)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        if worker.poll() is None:
            worker.kill()
    finish_worker(spec, pipeline)


def test_sigkill_mid_stream_loses_and_doubles_nothing(env: str, state_dsn: str, sink: SinkTarget) -> None:
    create_items(env, 1000)
    sigkill_mid_stream(spec_json(sink), state_dsn, lambda stop: churn(env, stop, 100_000))
    assert_exact(env, sink)


def test_sigkill_mid_snapshot_resumes_without_rereading(env: str, state_dsn: str, sink: SinkTarget) -> None:
    create_items(env, 60_000)
    spec = spec_json(sink, snapshot_partition_blocks=16, snapshot_workers=2)
    worker = start_worker(spec)
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop, 500_000))
    try:
        with StateStore(state_dsn).open() as store:

            def some_partitions_done() -> bool:
                progress = store.snapshot_progress("acme", "crashy")
                return bool(progress) and 3 <= progress[0].partitions_done < progress[0].partitions_total

            wait_for(some_partitions_done, 120, "part of the snapshot to commit")
            writer.start()
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            (before,) = store.snapshot_progress("acme", "crashy")
            assert before.partitions_done < before.partitions_total
            time.sleep(0.5)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()
        if worker.poll() is None:
            worker.kill()
    finish_worker(spec)
    with StateStore(state_dsn).open() as store:
        (after,) = store.snapshot_progress("acme", "crashy")
        done = [p for p in store.snapshot_partitions("acme", "crashy", "public.items")]
    assert after.partitions_done == after.partitions_total
    assert all(p.done for p in done)
    assert_exact(env, sink)


def test_terminated_run_flushes_what_it_received_before_ending(env: str, state_dsn: str, sink: SinkTarget) -> None:
    """A run terminated (SIGINT to the run worker, as Dagster does) commits its pending batch."""
    create_items(env, 10)
    spec = spec_json(sink, batch_max_ms=600_000, batch_max_rows=1_000_000)  # never flushes by size or time
    worker = start_worker(spec, "dagster")
    try:
        with StateStore(state_dsn).open() as store:

            def streaming() -> bool:
                beat = store.last_heartbeat("acme", "crashy")
                return beat is not None and beat.detail.get("phase") == "streaming"

            wait_for(streaming, 120, "the run to stream")
            with psycopg.connect(env, autocommit=True) as conn:
                conn.execute("INSERT INTO public.items VALUES (777, 1, 'pending at termination', now())")
            time.sleep(2.0)  # received, not yet flushed
            assert 777 not in [row[0] for row in sink_rows(sink)]
            worker.send_signal(signal.SIGINT)
            _, stderr = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert 777 in [row[0] for row in sink_rows(sink)], stderr.decode()[-2000:]
    assert_exact(env, sink)
