"""A live CDC pipeline operated through REST: pause, resume, stop, start.

The CDC run executes the pipeline's Dagster job in its own process (tests/cdc_worker.py) on a real
instance in DAGSTER_HOME, which the API (real app, in process) shares; the keep-alive sensor's
decision is evaluated on the same instance and state store. Source PostgreSQL, PostgreSQL sink.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from api_fixtures import api_over_defs
from batch_project import SinkTarget, failure_message, sink_target
from cdc_project import cdc_pipeline, cdc_project
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from test_cdc_crash import assert_exact, create_items, spec_json, start_worker, wait_for

from nilus_dagster.components.cdc_assets import keep_alive_decision
from nilus_dagster.components.lifecycle import AUDIT_TAG, OPERATOR_TAG
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

BASE = "/nilus-manager/api/v1"
JOB = "acme__crashy"
EDITOR = {"Authorization": "Bearer tok-edit"}
STATE = f"{BASE}/tenants/acme/pipelines/nilus:v1:crashy:acme/state"


@pytest.fixture
def pg_sink(duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch) -> SinkTarget:
    return sink_target("postgres", duckdb_path, sink_pg, monkeypatch)


@pytest.fixture
def operated(
    pipeline_env: str, state_dsn: str, pg_sink: SinkTarget, tmp_path: Path
) -> Iterator[tuple[str, TestClient]]:
    """The pipeline's spec (as the worker takes it) and the API over its defs folder."""
    spec = spec_json(pg_sink)
    with api_over_defs(tmp_path / "defs", json.loads(spec), state_dsn, "tok-edit:acme:editor") as client:
        yield spec, client


def _put(client: TestClient, state: str) -> dict:
    response = client.put(STATE, json={"state": state}, headers=EDITOR)
    assert response.status_code == 200, response.text
    return response.json()


def _confirmed_lsn(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        (row,) = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE database = current_database()"
        ).fetchall()
    return row[0]


def _decision(instance: dg.DagsterInstance, spec: str, state_dsn: str):  # noqa: ANN202
    with StateStore(state_dsn).open() as store:
        parsed = validate_spec(PipelinesSpec, json.loads(spec), "test")
        return keep_alive_decision(instance, store, parsed.pipelines[0], JOB)


def _streaming_run(state_dsn: str, worker: subprocess.Popen[bytes]) -> None:
    with StateStore(state_dsn).open() as store:

        def streaming() -> bool:
            assert worker.poll() is None, worker.stderr.read().decode()[-3000:] if worker.stderr else ""
            beat = store.last_heartbeat("acme", "crashy")
            return beat is not None and beat.detail.get("phase") == "streaming"

        wait_for(streaming, 120, "the run to stream")


def _ended_canceled(worker: subprocess.Popen[bytes], instance: dg.DagsterInstance, run_id: str) -> None:
    _, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 0, stderr.decode()[-3000:]
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.CANCELED, stderr.decode()[-3000:]


def _insert(dsn: str, first: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.items SELECT g, 0, 'later', now() FROM generate_series(%s::int, %s::int) g",
            (first, first + count - 1),
        )


def test_pause_resume_stop_start_through_rest(
    operated: tuple[str, TestClient], pipeline_env: str, state_dsn: str, pg_sink: SinkTarget
) -> None:
    spec, client = operated
    env = pipeline_env
    create_items(env, 20)
    instance = dg.DagsterInstance.get()
    worker = start_worker(spec, "dagster")
    try:
        _streaming_run(state_dsn, worker)
        (live,) = instance.get_runs(dg.RunsFilter(job_name=JOB))
        assert client.get(STATE, headers=EDITOR).json()["state"] == "running"

        paused = _put(client, "pause")  # the live run flushes and ends CANCELED; the slot stays
        assert paused["previous_state"] == "running" and paused["terminated_run_ids"] == [live.run_id]
        _ended_canceled(worker, instance, live.run_id)
        assert client.get(STATE, headers=EDITOR).json()["state"] == "paused"
        listed = client.get(f"{BASE}/tenants/acme/pipelines", headers=EDITOR).json()["pipelines"]
        assert [(p["pipeline_name"], p["state"]) for p in listed] == [("crashy", "paused")]
        assert isinstance(_decision(instance, spec, state_dsn), dg.SkipReason)  # no relaunch while paused
        scrape = generate_latest(client.app.state.metrics_registry).decode()
        assert 'nilus_pipeline_held{pipeline="crashy",state="paused",tenant="acme"} 1.0' in scrape

        held_at = _confirmed_lsn(env)
        _insert(env, 1000, 50)  # written while paused: nothing consumes them
        time.sleep(3.0)
        assert _confirmed_lsn(env) == held_at
        refused = client.put(STATE, json={"state": "start"}, headers=EDITOR)
        assert refused.status_code == 409 and "it is paused" in refused.json()["error"]

        resumed = _put(client, "resume")
        assert (resumed["previous_state"], resumed["state"]) == ("paused", "starting")
        request = _decision(instance, spec, state_dsn)  # the keep-alive sensor launches the next run
        assert isinstance(request, dg.RunRequest), request
        assert request.tags[AUDIT_TAG] == str(resumed["audit_id"]) and request.tags[OPERATOR_TAG] == "env0"

        worker = start_worker(spec, "dagster")  # the run the sensor asked for
        _streaming_run(state_dsn, worker)
        wait_for(lambda: _confirmed_lsn(env) != held_at, 60, "the slot to move again")
        with psycopg.connect(env, autocommit=True) as conn:
            (count,) = conn.execute("SELECT count(*) FROM public.items").fetchone()
        assert count == 70
        second = next(r for r in instance.get_runs(dg.RunsFilter(job_name=JOB)) if r.run_id != live.run_id)
        stopped = _put(client, "stop")
        assert stopped["terminated_run_ids"] == [second.run_id]
        _ended_canceled(worker, instance, second.run_id)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert_exact(env, pg_sink)  # caught up after the pause: nothing lost, nothing twice
    assert client.get(STATE, headers=EDITOR).json()["state"] == "stopped"
    assert isinstance(_decision(instance, spec, state_dsn), dg.SkipReason)  # the sensor does not relaunch
    assert instance.get_run_by_id(second.run_id).tags[AUDIT_TAG] == str(stopped["audit_id"])
    assert client.put(STATE, json={"state": "resume"}, headers=EDITOR).status_code == 409

    started = _put(client, "start")
    assert (started["previous_state"], started["state"]) == ("stopped", "starting")
    assert isinstance(_decision(instance, spec, state_dsn), dg.RunRequest)
    audit = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()["audit"]
    assert [(e["action"], e["result"]) for e in reversed(audit)] == [
        ("state:pause", "ok"),
        ("state:start", "refused"),
        ("state:resume", "ok"),
        ("state:stop", "ok"),
        ("state:resume", "refused"),
        ("state:start", "ok"),
    ]
    assert audit[2]["run_ids"] == [second.run_id] and all(e["actor"] == "env0" for e in audit)


def test_a_run_launched_while_stopped_ends_at_once(
    operated: tuple[str, TestClient], pipeline_env: str, state_dsn: str
) -> None:
    """A run launched while the pipeline is stopped (Materialize, the launchpad) reads nothing, ends CANCELED."""
    spec, client = operated
    create_items(pipeline_env, 5)
    assert _put(client, "stop")["state"] == "stopped"  # no live run: stopped at once
    worker = start_worker(spec, "dagster")
    instance = dg.DagsterInstance.get()
    _, stderr = worker.communicate(timeout=120)
    (run,) = instance.get_runs(dg.RunsFilter(job_name=JOB))
    assert run.status == dg.DagsterRunStatus.CANCELED, stderr.decode()[-3000:]
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone() == (0,)


def test_the_dagster_jobs_make_the_same_changes(
    operated: tuple[str, TestClient], pipeline_env: str, state_dsn: str, pg_sink: SinkTarget
) -> None:
    """`<tenant>__<pipeline>__pause|resume|stop|start`, launched in Dagster, change what REST shows."""
    _, client = operated
    defs = cdc_project(pg_sink, cdc_pipeline("crashy", ["public.items"], cdc={"batch_max_ms": 100}))
    instance = dg.DagsterInstance.get()

    def launch(action: str) -> dg.ExecuteInProcessResult:
        return defs.resolve_job_def(f"{JOB}__{action}").execute_in_process(instance=instance, raise_on_error=False)

    assert launch("pause").success
    assert client.get(STATE, headers=EDITOR).json()["state"] == "paused"
    refused = launch("start")  # start is for a stopped pipeline
    assert not refused.success and "cannot start the pipeline: it is paused" in failure_message(refused)
    assert launch("stop").success and client.get(STATE, headers=EDITOR).json()["state"] == "stopped"
    assert launch("start").success and client.get(STATE, headers=EDITOR).json()["state"] == "starting"
    audit = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()["audit"]
    assert [(e["action"], e["result"], e["params"]["via"]) for e in reversed(audit)] == [
        ("state:pause", "ok", "dagster"),
        ("state:start", "refused", "dagster"),
        ("state:stop", "ok", "dagster"),
        ("state:start", "ok", "dagster"),
    ]
    assert {e["actor"] for e in audit} == {"dagster:ui"}
    job_run = instance.get_run_by_id(launch("pause").run_id)  # the job's own run names its audit row
    newest = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()["audit"][0]
    assert job_run.tags[AUDIT_TAG] == str(newest["id"]) and newest["action"] == "state:pause"


def test_concurrent_changes_are_serialized(operated: tuple[str, TestClient]) -> None:
    """Four stops at once: one is carried out, the others find the pipeline stopped (409)."""
    _, client = operated
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.put(STATE, json={"state": "stop"}, headers=EDITOR), range(4)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409]
    assert all("it is stopped" in a.json()["error"] for a in answers if a.status_code == 409)
    audit = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()
    assert sorted(e["result"] for e in audit["audit"]) == ["ok", "refused", "refused", "refused"]
