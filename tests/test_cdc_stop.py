"""A deliberate stop (SIGINT, SIGTERM, "Terminate" in Dagster) ends the live CDC run CANCELED
after it flushed what it received; the keep-alive sensor starts the next run without backing off.

The run executes the pipeline's Dagster job in its own process (tests/cdc_worker.py) against a real
instance in DAGSTER_HOME, a real PostgreSQL source and a DuckDB sink.
"""

from __future__ import annotations

import json
import signal
import time

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget
from test_cdc_crash import assert_exact, create_items, finish_worker, sink_rows, spec_json, start_worker, wait_for

from nilus_dagster.components.cdc_assets import keep_alive_decision
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

JOB = "acme__crashy"


def _streaming(store: StateStore) -> bool:
    beat = store.last_heartbeat("acme", "crashy")
    return beat is not None and beat.detail.get("phase") == "streaming"


def _terminate(instance: dg.DagsterInstance) -> None:
    """What "Terminate" in the UI does first: the run becomes CANCELING (the launcher then signals)."""
    (run,) = instance.get_runs(dg.RunsFilter(job_name=JOB))
    instance.report_run_canceling(run, message="terminated by the test")


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "terminate", "terminate_then_SIGTERM"])
def test_deliberate_stop_flushes_and_ends_canceled(
    pipeline_env: str, state_dsn: str, duckdb_sink: SinkTarget, stop: str
) -> None:
    env, sink = pipeline_env, duckdb_sink
    create_items(env, 10)
    spec = spec_json(sink, batch_max_ms=600_000, batch_max_rows=1_000_000)  # never flushes by size or time
    worker = start_worker(spec, "dagster")
    instance = dg.DagsterInstance.get()
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: _streaming(store), 120, "the run to stream")
            with psycopg.connect(env, autocommit=True) as conn:
                conn.execute("INSERT INTO public.items VALUES (777, 1, 'pending at the stop', now())")
            time.sleep(2.0)  # received, not yet flushed
            assert 777 not in [row[0] for row in sink_rows(sink)]
            if stop.startswith("terminate"):
                _terminate(instance)
                if stop == "terminate_then_SIGTERM":  # what a launcher does next (e.g. the pod deleted)
                    time.sleep(2.5)  # the run has seen CANCELING: this first signal is no second stop
                    worker.send_signal(signal.SIGTERM)
            else:
                worker.send_signal(getattr(signal, stop))
            _, stderr = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    log = stderr.decode()[-3000:]
    assert worker.returncode == 0, log
    assert 777 in [row[0] for row in sink_rows(sink)], log
    assert_exact(env, sink)
    (run,) = instance.get_runs(dg.RunsFilter(job_name=JOB))
    assert run.status == dg.DagsterRunStatus.CANCELED, log
    with StateStore(state_dsn).open() as store:
        assert store.last_heartbeat("acme", "crashy").detail["phase"] == "stopped"
        parsed = validate_spec(PipelinesSpec, json.loads(spec), "test")
        decision = keep_alive_decision(instance, store, parsed.pipelines[0], JOB)
    assert isinstance(decision, dg.RunRequest), decision  # no backoff after a deliberate stop


def test_stop_during_the_snapshot_ends_canceled_without_materializing(
    pipeline_env: str, state_dsn: str, duckdb_sink: SinkTarget
) -> None:
    """Stopped mid-snapshot: CANCELED, no materialization of a half-copied table; the next run
    resumes and the sink equals the source."""
    env, sink = pipeline_env, duckdb_sink
    create_items(env, 60_000)
    spec = spec_json(sink, snapshot_partition_blocks=16, snapshot_workers=1)
    worker = start_worker(spec, "dagster")
    instance = dg.DagsterInstance.get()
    try:
        with StateStore(state_dsn).open() as store:

            def some_partitions_done() -> bool:
                progress = store.snapshot_progress("acme", "crashy")
                return bool(progress) and 2 <= progress[0].partitions_done < progress[0].partitions_total

            wait_for(some_partitions_done, 120, "part of the snapshot to commit")
            worker.send_signal(signal.SIGTERM)
            _, stderr = worker.communicate(timeout=120)
            (progress,) = store.snapshot_progress("acme", "crashy")
    finally:
        if worker.poll() is None:
            worker.kill()
    log = stderr.decode()[-3000:]
    assert progress.partitions_done < progress.partitions_total, "the snapshot finished before the stop"
    (run,) = instance.get_runs(dg.RunsFilter(job_name=JOB))
    assert run.status == dg.DagsterRunStatus.CANCELED, log
    key = dg.AssetKey(["acme", "crashy", "public", "items"])
    assert instance.get_latest_materialization_event(key) is None
    finish_worker(spec)
    assert_exact(env, sink)
