"""README command 1: the embedded demo brings up Dagster with the sample pipelines, a batch
materialization started through the webserver succeeds, and a stop ends everything it started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

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


class _Output:
    """Collects a process's output lines as they come."""

    def __init__(self, stream: Any):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def value(self, prefix: str) -> str | None:
        """The rest of the first line starting with `prefix`."""
        return next((line[len(prefix) :] for line in self.lines if line.startswith(prefix)), None)

    def text_so_far(self) -> str:
        return "\n".join(self.lines)

    def text(self) -> str:
        """Everything, once the process has closed its output."""
        self._thread.join(30)
        return self.text_so_far()


def _request(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            body = response.read()
            return response.status, json.loads(body) if response.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _check_printed_api(output: _Output, project: Path, api_port: int, ui_port: int, run_id: str) -> None:
    """The demo printed where its API is and a token per tenant, and those work."""
    assert output.value("nilus-demo: DAGSTER_HOME=") == str(project / ".nilus" / "dagster_home")
    assert output.value("nilus-demo: SHOP_DSN=").endswith("/shop")
    assert output.value("nilus-demo: NILUS_STATE_DSN=").endswith("/nilus_state")
    api = output.value("nilus-demo: monitoring API at ")
    assert api == f"http://127.0.0.1:{api_port}/nilus-manager/api/v1"
    swagger = output.value("nilus-demo: Swagger UI at ").split(" ")[0]
    tokens = dict(re.findall(r"^nilus-demo: API token for tenant (\w+): (\S+)$", output.text_so_far(), re.M))
    assert set(tokens) == {"acme", "globex"}
    listed = lambda: (r := _request(f"{api}/tenants/acme/pipelines", tokens["acme"]))[0] == 200 and r  # noqa: E731
    status, body = _wait(listed, 60, "the API")
    assert {p["pipeline_name"] for p in body["pipelines"]} == {"catalog", "orders", "orders_live"}
    catalog = next(p for p in body["pipelines"] if p["pipeline_name"] == "catalog")
    assert catalog["latest_run"]["run_id"] == run_id and catalog["latest_run"]["status"] == "SUCCESS"
    assert catalog["latest_run"]["dagster_url"] == f"http://127.0.0.1:{ui_port}/runs/{run_id}"
    assert _request(f"{api}/tenants/globex/pipelines", tokens["acme"])[0] == 403
    assert _request(f"{api}/tenants/globex/pipelines", tokens["globex"])[0] == 200
    assert _request(f"{api}/tenants/acme/pipelines")[0] == 401
    status, page = _request(swagger)
    assert status == 200 and b"swagger-ui" in page


def test_demo_serves_pipelines_materializes_and_stops_cleanly(tmp_path: Path) -> None:
    project = _project_copy(tmp_path)
    ui_port, pg_port, api_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SHOP_DSN", "NILUS_STATE_DSN", "DAGSTER_HOME")}
    demo = subprocess.Popen(
        [str(DEMO), "--port", str(ui_port), "--pg-port", str(pg_port)]
        + ["--api-port", str(api_port), "--metrics-port", str(metrics_port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output = _Output(demo.stdout)
    try:
        _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info", timeout=5), 300, "the UI")
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
        _check_printed_api(output, project, api_port, ui_port, run_id)
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=120)
    assert demo.returncode == 0, output.text()[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", str(project)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes still running for the demo: {leftovers}"
    assert not EmbeddedPostgres(project / ".nilus" / "postgres").is_running()
    with pytest.raises(OSError):  # the API stopped too
        urllib.request.urlopen(f"http://127.0.0.1:{api_port}/nilus-manager/docs", timeout=5)
    assert (project / ".nilus" / "warehouse.duckdb").exists()


def test_readme_demo_script_passes_its_flags_to_the_demo() -> None:
    """`scripts/demo --help` (and so --once, --changes, --activity) reaches nilus-demo, not pip."""
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo"), "--help"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--changes" in result.stdout and "--once" in result.stdout
