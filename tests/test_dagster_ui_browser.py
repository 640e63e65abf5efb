"""The real Dagster UI (dagster-webserver in its own process) in a real headless Chromium shows a CDC
asset's latest materialization and its check results, after a CDC run against the same instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
from batch_project import SinkTarget, failure_message
from browser import offline_chromium
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from selenium.webdriver.common.by import By
from test_cdc_crash import create_items

from nilus_dagster.embedded.postgres import free_port

REPO = Path(__file__).resolve().parents[1]
DEFS = """\
import json, os
from nilus_dagster.components.definitions import build_definitions
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec

defs = build_definitions(validate_spec(PipelinesSpec, json.loads(os.environ["NILUS_TEST_SPEC"]), "test"))
"""


def _start_webserver(defs_file: Path, spec: dict, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NILUS_TEST_SPEC": json.dumps(spec), "PYTHONPATH": str(REPO)}
    webserver = Path(sys.executable).parent / "dagster-webserver"
    return subprocess.Popen([str(webserver), "-f", str(defs_file), "-h", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_up(url: str, process: subprocess.Popen[bytes], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"dagster-webserver did not answer within {timeout_s:.0f}s")


def _wait_for_text(browser, *texts: str, timeout_s: float = 120) -> str:  # noqa: ANN001 - a Chrome driver
    """The page's text once it shows every one of `texts` (the UI renders after its queries return)."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        body = browser.find_element(By.TAG_NAME, "body").text
        if all(text in body for text in texts):
            return body
        time.sleep(1)
    raise AssertionError(f"the page never showed {texts}; it shows:\n{body[:3000]}")


def test_the_ui_shows_a_cdc_assets_materialization_and_check_results(
    pipeline_env: str, duckdb_sink: SinkTarget, tmp_path: Path
) -> None:
    create_items(pipeline_env, 10)
    pipeline = cdc_pipeline("crashy", ["public.items"])
    spec = {"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": duckdb_sink.connection},
            "pipelines": [pipeline]}
    result = run_until_caught_up(cdc_project(duckdb_sink, pipeline), "acme__crashy", dg.DagsterInstance.get())
    assert result.success, failure_message(result)
    instance = dg.DagsterInstance.get()
    latest = instance.get_latest_materialization_event(dg.AssetKey(["acme", "crashy", "public", "items"]))
    lsn = latest.asset_materialization.metadata["lsn"].value  # type: ignore[union-attr]
    defs_file = tmp_path / "ui_defs.py"
    defs_file.write_text(DEFS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    webserver = _start_webserver(defs_file, spec, port)
    try:
        _wait_up(url, webserver)
        with offline_chromium() as browser:
            browser.get(f"{url}/assets/acme/crashy/public/items")
            _wait_for_text(browser, "Latest materialization", "lsn", str(lsn), "rows_inserted")
            browser.get(f"{url}/assets/acme/crashy/public/items?view=checks")
            _wait_for_text(browser, "row_count_parity", "schema_drift", "Passed")
    finally:
        os.killpg(webserver.pid, 15)
        webserver.wait(timeout=60)
