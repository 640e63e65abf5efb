"""The example project's definitions load, in Python and through Dagster's own CLI checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def pipeline_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("SHOP_DSN", "postgresql://nobody@127.0.0.1:1/shop")
    monkeypatch.setenv("NILUS_STATE_DSN", "postgresql://nobody@127.0.0.1:1/state")
    return dict(os.environ)


def _load_repo_definitions() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=REPO / "pipelines")


def test_definitions_are_loadable(pipeline_env: dict[str, str]) -> None:
    defs = _load_repo_definitions()
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"acme/orders/acme/customers", "acme/orders/acme/orders", "globex/events/globex/events"} <= keys
    job = defs.resolve_job_def("acme__orders")
    assert job.tags["nilus/tenant"] == "acme"
    assert job.tags["nilus/pipeline"] == "orders"
    assert job.tags["nilus/resource_id"] == "nilus:v1:orders:acme"
    assert job.tags["nilus/run_as_user"] == "alice"
    schedule = defs.resolve_schedule_def("acme__orders__schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    spec = defs.resolve_assets_def(dg.AssetKey(["acme", "orders", "acme", "orders"])).specs_by_key[
        dg.AssetKey(["acme", "orders", "acme", "orders"])
    ]
    assert spec.group_name == "acme__orders"
    assert set(spec.kinds) == {"postgres", "duckdb"}
    assert spec.tags["team"] == "sales"
    assert "merged every 15 minutes" in (spec.description or "")
    source = dg.AssetKey(["acme", "sources", "shop", "acme", "orders"])  # lineage: source table -> sink table
    assert source in {dep.asset_key for dep in spec.deps}
    assert not defs.resolve_asset_graph().get(source).is_materializable  # an external asset
    assert spec.metadata["dagster/table_name"].value == "acme.orders"


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_cli_checks_pass_on_the_example_project(pipeline_env: dict[str, str]) -> None:
    result = _run([str(BIN / "dg"), "check", "defs"], REPO, pipeline_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All definitions loaded successfully" in result.stdout + result.stderr


def test_cli_check_fails_with_the_message_on_a_broken_file(tmp_path: Path, pipeline_env: dict[str, str]) -> None:
    project = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", project / "pipelines")
    for name in ("pyproject.toml", "definitions.py", "workspace.yaml"):
        shutil.copy(REPO / name, project / name)
    broken = project / "pipelines" / "shop" / "defs.yaml"
    broken.write_text(broken.read_text().replace('"*/5 * * * *"', '"every 5 minutes"'))
    expected = (
        f"Invalid nilus pipeline declaration in {broken}:\n"
        "  - pipelines[2].schedule = 'every 5 minutes': 'every 5 minutes' is not a cron expression"
    )
    dg_check = _run([str(BIN / "dg"), "check", "defs"], project, pipeline_env)
    assert dg_check.returncode != 0
    assert expected in dg_check.stdout + dg_check.stderr
    validate = _run([str(BIN / "dagster"), "definitions", "validate", "-w", "workspace.yaml"], project, pipeline_env)
    assert validate.returncode != 0
    assert expected in validate.stdout + validate.stderr


def test_scaffolded_defs_file_loads_beside_the_others(tmp_path: Path, pipeline_env: dict[str, str]) -> None:
    """`dg scaffold defs` writes a commented template that passes `dg check defs` next to existing files."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "pipelines", project / "pipelines")
    for name in ("pyproject.toml", "definitions.py", "workspace.yaml"):
        shutil.copy(REPO / name, project / name)
    scaffold = _run([str(BIN / "dg"), "scaffold", "defs", "nilus_dagster.components.NilusPipelines", "more"],
                    project, pipeline_env)
    assert scaffold.returncode == 0, scaffold.stdout + scaffold.stderr
    written = (project / "pipelines" / "more" / "defs.yaml").read_text()
    assert written.startswith("# Pipelines from PostgreSQL") and "dsn_env: SHOP_DSN" in written
    check = _run([str(BIN / "dg"), "check", "defs"], project, pipeline_env)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = _run([str(BIN / "dg"), "list", "defs", "--json"], project, pipeline_env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert '"example__orders_example"' in listed.stdout and '"acme__orders"' in listed.stdout
