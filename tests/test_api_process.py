"""The real `nilus-api` process on a Dagster PostgreSQL storage that goes away: prompt 503s with
the API's error body, recovery, JSON for requests uvicorn itself refuses, quiet logs for refused
GraphQL queries, and a clean Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_fixtures import BASE, World, run_real_job, start_api_process, stop_api_process
from dagster import DagsterInstance

from nilus_dagster.embedded.postgres import EmbeddedPostgres, free_port

TOKEN = "tok-process-acme"


@pytest.fixture
def dagster_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A throwaway cluster holding only Dagster's storage (the test stops and restarts it)."""
    cluster = EmbeddedPostgres(tmp_path / "dagster_pg", port=free_port()).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _home(tmp_path: Path, cluster: EmbeddedPostgres) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    url = cluster.dsn().replace("postgresql://", "postgresql+psycopg2://")
    (home / "dagster.yaml").write_text(f"telemetry:\n  enabled: false\nstorage:\n  postgres:\n    postgres_url: {url}\n")
    with DagsterInstance.from_config(str(home)) as instance:  # creates the schema; one run of acme/catalog
        run_real_job(instance, "acme", "catalog", "nilus:v1:catalog:acme", fail=False)
    return home


def _start(world: World, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    return start_api_process(world, home, f"{TOKEN}:acme:read")


GRAPHQL_RUNS = '{ runs(tenant: "acme", resourceId: "nilus:v1:catalog:acme") { total } }'
READS = [
    ("GET", "/tenants/acme/pipelines", None),
    ("GET", "/tenants/acme/pipelines/nilus:v1:catalog:acme/runs", None),
    ("GET", "/tenants/acme/pipelines/nilus:v1:catalog:acme/stats", None),
]


@pytest.mark.timeout(240)
def test_dagster_storage_down_is_a_prompt_503_and_recovers(sqlite_world: World, dagster_pg, tmp_path: Path) -> None:
    proc, url = _start(sqlite_world, _home(tmp_path, dagster_pg))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        for _, path, _ in READS:
            assert httpx.get(f"{url}{BASE}{path}", headers=auth, timeout=30).status_code == 200, path
        dagster_pg.stop()
        for _, path, _ in READS:
            started = time.monotonic()
            response = httpx.get(f"{url}{BASE}{path}", headers=auth, timeout=30)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (path, response.text)
            assert response.json() == {"error": "Dagster run storage is unavailable, retry later", "code": "unavailable"}
            assert elapsed < 5, (path, elapsed)
        started = time.monotonic()
        health = httpx.get(f"{url}{BASE}/health", headers=auth, timeout=30)
        assert health.status_code == 503 and health.json()["components"]["dagster_storage"]["ok"] is False
        graphql = httpx.post(f"{url}/nilus-manager/graphql", json={"query": GRAPHQL_RUNS}, headers=auth, timeout=30)
        assert graphql.json()["errors"][0]["extensions"]["code"] == "unavailable"
        assert time.monotonic() - started < 5
        dagster_pg.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}{BASE}/tenants/acme/pipelines", headers=auth, timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the API did not recover with the storage"
            time.sleep(0.5)
        runs = httpx.get(f"{url}{BASE}{READS[1][1]}", headers=auth, timeout=30).json()
        assert runs["total"] == 1
    finally:
        out = stop_api_process(proc)
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.timeout(120)
def test_refusals_are_json_quiet_and_ctrl_c_is_clean(sqlite_world: World) -> None:
    proc, url = _start(sqlite_world, sqlite_world.home)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        # a path over uvicorn's request-line limit: refused by the server before the app runs
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"GET " + BASE.encode() + b"/" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), raw[:300]
        assert b"content-type: application/json" in head.lower()
        assert httpx.Response(400, content=body).json()["code"] == "invalid_request"
        # another tenant in GraphQL: a refusal, not an internal error
        query = '{ pipelines(tenant: "globex") { total } }'
        refused = httpx.post(f"{url}/nilus-manager/graphql", json={"query": query}, headers=auth, timeout=30).json()
        assert refused["errors"][0]["extensions"]["code"] == "forbidden"
        assert httpx.get(f"{url}{BASE}/tenants/acme/pipelines", headers=auth, timeout=30).status_code == 200
    finally:
        out = stop_api_process(proc, signal.SIGINT)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and " ERROR " not in out, out[-3000:]
    assert "graphql forbidden" in out  # logged, at INFO
    assert "Finished server process" in out
