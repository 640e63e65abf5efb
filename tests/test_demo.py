"""README command 1: the embedded demo brings up Dagster with the sample pipelines, a batch
materialization started through the webserver succeeds, and a stop ends everything it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from nilus_dagster.embedded.postgres import EmbeddedPostgres, free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = Path(sys.executable).parent / "nilus-demo"
LAUNCH = """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def _graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def _wait(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _project_copy(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", project / "pipelines")
    for name in ("definitions.py", "workspace.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, project / name)
    return project


def test_demo_serves_pipelines_materializes_and_stops_cleanly(tmp_path: Path) -> None:
    project = _project_copy(tmp_path)
    ui_port, pg_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SHOP_DSN", "NILUS_STATE_DSN", "DAGSTER_HOME")}
    demo = subprocess.Popen(
        [str(DEMO), "--port", str(ui_port), "--pg-port", str(pg_port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info", timeout=5), 180, "the UI")
        nodes = _wait(
            lambda: _graphql(ui_port, "{ assetNodes { assetKey { path } groupName } }")["assetNodes"], 60, "assets"
        )
        assert {tuple(n["assetKey"]["path"]) for n in nodes} >= {
            ("acme", "catalog", "acme", "products"),
            ("acme", "orders_live", "acme", "orders"),
            ("globex", "events", "globex", "events"),
        }
        selector = {"repositoryLocationName": "nilus_pipelines", "repositoryName": "__repository__", "jobName": "acme__catalog"}
        launched = _graphql(ui_port, LAUNCH, {"p": {"selector": selector, "runConfigData": {}}})
        run_id = launched["launchPipelineExecution"]["run"]["runId"]
        status_query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"

        def finished() -> str | None:
            status = _graphql(ui_port, status_query, {"id": run_id})["runOrError"]["status"]
            return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

        assert _wait(finished, 180, "the batch run") == "SUCCESS"
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=120)
    assert demo.returncode == 0, output.decode()[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", str(project)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes still running for the demo: {leftovers}"
    assert not EmbeddedPostgres(project / ".nilus" / "postgres").is_running()
    assert (project / ".nilus" / "warehouse.duckdb").exists()


def test_readme_demo_script_passes_its_flags_to_the_demo() -> None:
    """`scripts/demo --help` (and so --once, --changes, --activity) reaches nilus-demo, not pip."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo"), "--help"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--changes" in result.stdout and "--once" in result.stdout
