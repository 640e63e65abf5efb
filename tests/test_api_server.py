"""The metrics server (Prometheus text, /health, /readiness) and the real `nilus-api` process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from api_fixtures import BASE, TOKENS, World
from dagster import DagsterRunStatus
from fastapi.testclient import TestClient

from nilus_dagster.api.app import create_app
from nilus_dagster.api.metrics import STALE_BEAT_S, create_metrics_app
from nilus_dagster.embedded.postgres import free_port


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample (labels in any order) in Prometheus text."""
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == labels:
            return float(match.group(2))
    return None


def test_metrics_server_reports_pipelines_cdc_and_api(world: World) -> None:
    app = create_app(world.settings())
    with TestClient(app) as api, TestClient(create_metrics_app(app.state.services, app.state.metrics_registry)) as m:
        for _ in range(3):
            assert api.get(f"{BASE}/tenants/acme/pipelines", headers=world.headers("read_acme")).status_code == 200
        api.get(f"{BASE}/tenants/acme/pipelines")  # 401
        text = m.get("/metrics").text
        records = world.records("acme", "rid-orders")
        for status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
            expected = sum(r.dagster_run.status is status for r in records)
            assert (
                _sample(text, "nilus_pipeline_runs", tenant="acme", pipeline="orders", status=status.value) == expected
            )
        assert _sample(text, "nilus_pipeline_runs", tenant="globex", pipeline="orders", status="FAILURE") == 25
        assert _sample(text, "nilus_pipeline_last_run_duration_seconds", tenant="acme", pipeline="orders") == 10.0
        assert _sample(text, "nilus_pipeline_last_run_success", tenant="globex", pipeline="events") == 0.0
        # the reported lag, plus the heartbeat's age once it is stale (the session's world may be old by now)
        beat_age = _sample(text, "nilus_cdc_heartbeat_age_seconds", tenant="acme", pipeline="stream")
        lag = _sample(text, "nilus_cdc_lag_seconds", tenant="acme", pipeline="stream")
        assert lag == pytest.approx(1.5 if beat_age <= STALE_BEAT_S else 1.5 + beat_age)
        assert _sample(text, "nilus_cdc_events_total", tenant="acme", pipeline="stream") == 1234
        assert _sample(text, "nilus_sink_errors_total", tenant="acme", pipeline="stream") == 3
        assert _sample(text, "nilus_cdc_failed_tables", tenant="acme", pipeline="stream") == 1
        assert (
            _sample(text, "nilus_cdc_snapshot_percent", tenant="acme", pipeline="stream", table="acme.customers") == 50
        )
        assert _sample(text, "nilus_pipelines_declared", tenant="acme", type="cdc") == 1
        route = "/nilus-manager/api/v1/tenants/{tenant}/pipelines"
        assert _sample(text, "nilus_api_requests_total", method="GET", route=route, status="200") == 3
        assert _sample(text, "nilus_api_requests_total", method="GET", route=route, status="401") == 1
        assert _sample(text, "nilus_api_request_duration_seconds_count", method="GET", route=route) == 4
        assert "tenants/acme" not in text  # routes are templates: no tenant names in API labels
        assert m.get("/health").json() == {"status": "ok"}
        ready = m.get("/readiness")
        assert ready.status_code == 200 and ready.json()["ready"] is True


def test_readiness_fails_when_the_state_store_is_down(sqlite_world: World) -> None:
    app = create_app(sqlite_world.settings(state_dsn="postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"))
    with TestClient(create_metrics_app(app.state.services, app.state.metrics_registry)) as m:
        ready = m.get("/readiness")
        assert ready.status_code == 503 and ready.json()["checks"]["state_store"] is False
        assert m.get("/health").status_code == 200
        assert "nilus_pipeline_runs" in m.get("/metrics").text  # run metrics survive a store outage


def _wait(url: str, deadline: float) -> httpx.Response:
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.timeout(120)
def test_real_server_process(sqlite_world: World) -> None:
    api_port, metrics_port = free_port(), free_port()
    token = TOKENS["read_acme"][0]
    env = dict(
        os.environ,
        DAGSTER_HOME=str(sqlite_world.home),
        NILUS_STATE_DSN=sqlite_world.state_dsn,
        NILUS_DEFS_DIR=str(sqlite_world.defs_dir),
        NILUS_API_TOKENS=f"{token}:acme:read",
        NILUS_API_HOST="127.0.0.1",
        NILUS_API_PORT=str(api_port),
        NILUS_METRICS_HOST="127.0.0.1",
        NILUS_METRICS_PORT=str(metrics_port),
        NILUS_COMMIT="abc123",
    )
    env.pop("NILUS_API_TOKENS_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nilus_dagster.api.server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        api = f"http://127.0.0.1:{api_port}"
        assert _wait(f"{api}{BASE}/info", deadline).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        info = httpx.get(f"{api}{BASE}/info", headers=auth).json()
        assert info["service"] == "nilus-manager" and info["commit"] == "abc123" and info["dagster_version"]
        body = httpx.get(f"{api}{BASE}/tenants/acme/pipelines", headers=auth).json()
        assert body["total"] == 4
        assert httpx.get(f"{api}{BASE}/health", headers=auth).json()["status"] == "ok"
        assert httpx.get(f"{api}/nilus-manager/docs").status_code == 200
        metrics = f"http://127.0.0.1:{metrics_port}"
        assert _wait(f"{metrics}/health", deadline).json() == {"status": "ok"}
        assert httpx.get(f"{metrics}/readiness").status_code == 200
        assert "nilus_api_requests_total" in httpx.get(f"{metrics}/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM), out.decode()[-3000:]
    assert b"Finished server process" in out
