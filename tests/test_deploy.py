"""Deployment artifacts: static checks of what cannot run here (Helm values, Kubernetes manifests,
docker-compose, Dockerfile), Dagster's own validation of deploy/dagster.yaml, run retention, and a
smoke test of the local stack (deploy/stack.py) running a CDC pipeline end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx
import psycopg
import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry

from nilus_dagster.components.tags import CDC_PIPELINE_TAG, RESOURCE_ID_TAG, TENANT_TAG
from nilus_dagster.embedded.postgres import EmbeddedPostgres

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = REPO.parent / "shared" / "deploy-schemas"
REMOTE_K8S_REFS = "https://kubernetesjsonschema.dev/"
K8S_VERSION = "1.30"
sys.path.insert(0, str(DEPLOY))

import retention  # noqa: E402  (deploy/retention.py)
import stack  # noqa: E402  (deploy/stack.py)


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# -- static checks --------------------------------------------------------------------------------


def test_every_yaml_under_deploy_parses() -> None:
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "dagster.yaml", "docker-compose.yml", "helm/values.yaml", "k8s/api.yaml", "compose/workspace.yaml",
    }
    for path in files:
        assert load_yaml(path), f"{path} is empty"


def test_dagster_yaml_passes_dagsters_config_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster_postgres.utils import pg_config

    for name, value in dict(
        DAGSTER_PG_HOST="db.internal", DAGSTER_PG_PORT="5432", DAGSTER_PG_USERNAME="dagster",
        DAGSTER_PG_PASSWORD="from-env", DAGSTER_PG_DB="dagster",
    ).items():
        monkeypatch.setenv(name, value)
    (tmp_path / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))

    storage = process_config(pg_config(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    db = storage.value["postgres_db"]
    assert db["scheme"] == "postgresql+psycopg2"  # dagster-postgres needs psycopg2 (FIELD_GUIDE)
    assert (db["hostname"], db["port"], db["password"]) == ("db.internal", 5432, "from-env")

    coordinator = config["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    processed = process_config(QueuedRunCoordinator.config_type(), coordinator["config"])
    assert processed.success, processed.errors
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]  # validated by dagster_instance_config
    assert limits == [{"key": CDC_PIPELINE_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    assert config["concurrency"]["pools"]["default_limit"] == 1  # "Materialize" waits for the live CDC run
    assert config["run_monitoring"]["enabled"] is True
    assert config["retention"]["sensor"]["purge_after_days"]["skipped"] >= 1
    raw = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    assert raw["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}


def _schemas_dir() -> Path:
    if not SCHEMAS.is_dir():
        pytest.fail(
            f"Dagster's Helm chart schemas are missing: expected {SCHEMAS} (the shared/ folder cloned beside "
            f"the repo, with deploy-schemas/dagster-helm-values.schema.json)"
        )
    return SCHEMAS


def _open_remote_refs(node: Any) -> Any:
    """The schema with every kubernetesjsonschema.dev `$ref` left open (its target taken as `{}`)."""
    if isinstance(node, dict):
        return {
            k: _open_remote_refs(v)
            for k, v in node.items()
            if not (k == "$ref" and isinstance(v, str) and v.startswith(REMOTE_K8S_REFS))
        }
    if isinstance(node, list):
        return [_open_remote_refs(v) for v in node]
    return node


def _no_remote_lookups(uri: str) -> Any:
    raise LookupError(f"offline validation: refusing to fetch {uri}")


def chart_validator(schema_file: str) -> Draft7Validator:
    schema = json.loads((_schemas_dir() / schema_file).read_text())
    return Draft7Validator(_open_remote_refs(schema), registry=Registry(retrieve=_no_remote_lookups))


def _errors(validator: Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


@pytest.fixture(scope="module")
def helm_values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def test_helm_values_validate_against_the_dagster_chart_schema(helm_values: dict[str, Any]) -> None:
    validator = chart_validator("dagster-helm-values.schema.json")
    assert _errors(validator, helm_values) == []
    # The validator really checks: a wrong launcher type and a missing required key are caught.
    broken = json.loads(json.dumps(helm_values))
    broken["runLauncher"]["type"] = "DockerRunLauncher"
    del broken["dagsterDaemon"]["runCoordinator"]
    assert len(_errors(validator, broken)) >= 2


def test_helm_user_deployments_validate_against_the_subchart_schema(helm_values: dict[str, Any]) -> None:
    validator = chart_validator("dagster-user-deployments-values.schema.json")
    # Helm hands the parent's `global` to the subchart.
    subchart = {**helm_values["dagster-user-deployments"], "global": helm_values["global"]}
    assert _errors(validator, subchart) == []


def test_helm_values_say_what_the_deployment_needs(helm_values: dict[str, Any]) -> None:
    assert helm_values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = helm_values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    limits = coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert {"key": CDC_PIPELINE_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
    assert helm_values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
    deployment = helm_values["dagster-user-deployments"]["deployments"][0]
    assert "nilus-dagster-user-code" in deployment["image"]["repository"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert helm_values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    assert helm_values["generatePostgresqlPasswordSecret"] is False
    assert helm_values["postgresql"]["postgresqlPassword"] == "", "secrets come from Kubernetes Secrets"
    assert helm_values["migrate"]["enabled"] is True


def test_kubernetes_manifests_validate_offline() -> None:
    import kubernetes_validate

    kinds = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load_yaml(path):
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {error.message} at {error.path}")
            kinds.append(doc["kind"])
    assert {"Deployment", "Service", "CronJob"} <= set(kinds)


def test_api_manifest_probes_ports_and_secrets() -> None:
    docs = {doc["kind"]: doc for doc in load_yaml(DEPLOY / "k8s" / "api.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "metrics": 9090}
    env = {e["name"]: e for e in container["env"]}
    assert env["NILUS_API_TOKENS_FILE"]["value"].startswith("/etc/nilus/tokens/")
    assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dagster-postgresql-secret"
    assert env["NILUS_STATE_DSN"]["valueFrom"]["secretKeyRef"]["name"] == "nilus-pipeline-secrets"
    assert pod["volumes"][0]["secret"]["secretName"] == "nilus-api-tokens"
    service_ports = {p["name"] for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http", "metrics"}


def test_docker_compose_has_the_services_and_no_inline_secrets() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"postgres", "webserver", "daemon", "user_code", "api"}
    assert "wal_level=logical" in services["postgres"]["command"]
    assert services["user_code"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["user_code"]["condition"] == "service_healthy"
        assert "/opt/dagster/workspace.yaml" in services[name]["command"]
    workspace = yaml.safe_load((DEPLOY / "compose" / "workspace.yaml").read_text())
    assert workspace["load_from"][0]["grpc_server"] == {"host": "user_code", "port": 4000, "location_name": "nilus_pipelines"}
    assert "nilus_dagster.api.server" in services["api"]["command"]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            if "PASSWORD" in key or key.endswith("_DSN"):
                assert "${" in str(value), f"{name}: {key} must come from the environment"


def test_dockerfile_builds_the_user_code_image() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "RUN pip install ." in lines
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert "COPY deploy/dagster.yaml /opt/dagster/dagster_home/dagster.yaml" in lines
    assert '"code-server", "start"' in text and "nilus_pipelines" in text
    for copied in ("pyproject.toml", "nilus_dagster", "definitions.py", "pipelines", "deploy/retention.py"):
        assert (REPO / copied.split()[0]).exists(), f"the Dockerfile copies {copied}, which is missing"


# -- run retention --------------------------------------------------------------------------------


def test_retention_purges_only_old_finished_runs() -> None:
    with dg.instance_for_test() as instance:
        def add(status: dg.DagsterRunStatus, age: timedelta) -> str:
            run = dg.DagsterRun(job_name="j", run_id=str(uuid.uuid4()), status=status)
            instance.run_storage.add_historical_run(run, datetime.now(UTC) - age)
            return run.run_id

        old_done = [add(dg.DagsterRunStatus.SUCCESS, timedelta(days=40)) for _ in range(5)]
        old_failed = add(dg.DagsterRunStatus.FAILURE, timedelta(days=31))
        old_live = add(dg.DagsterRunStatus.STARTED, timedelta(days=60))  # a CDC run streaming for months
        recent = add(dg.DagsterRunStatus.SUCCESS, timedelta(days=2))

        assert retention.purge_old_runs(instance, timedelta(days=30), batch=2, dry_run=True) == 6
        assert len(instance.get_run_ids()) == 8
        assert retention.purge_old_runs(instance, timedelta(days=30), batch=2) == 6
        assert set(instance.get_run_ids()) == {old_live, recent}
        assert not set(old_done + [old_failed]) & set(instance.get_run_ids())


# -- the local stack, end to end ------------------------------------------------------------------

SOURCE_DDL = """
CREATE TABLE public.orders (id bigint PRIMARY KEY, status text NOT NULL, amount numeric(12, 2));
INSERT INTO public.orders SELECT g, 'new', g * 1.5 FROM generate_series(1, 40) g;
"""
DEFINITIONS_PY = """
from pathlib import Path

import dagster as dg

defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent / "pipelines")
"""
PYPROJECT_TOML = """
[project]
name = "stack-smoke"
version = "0"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "pipelines"
defs_module = "pipelines"
code_location_target_module = "definitions"
registry_modules = ["nilus_dagster.components"]
"""
TENANT, RESOURCE_ID = "acme", "rid-orders-stream"
READ_TOKEN, ADMIN_TOKEN = "tok-smoke-read", "tok-smoke-admin"


def write_project(root: Path, warehouse: Path) -> Path:
    """A project with one CDC pipeline: public.orders of SOURCE_DSN into a DuckDB file."""
    (root / "pipelines" / "stream").mkdir(parents=True)
    (root / "definitions.py").write_text(DEFINITIONS_PY)
    (root / "pyproject.toml").write_text(PYPROJECT_TOML)
    (root / "pipelines" / "__init__.py").write_text("")
    defs = {
        "type": "nilus_dagster.components.NilusPipelines",
        "attributes": {
            "connections": {
                "src": {"type": "postgres", "dsn_env": "SOURCE_DSN"},
                "warehouse": {"type": "duckdb", "path": str(warehouse)},
            },
            "pipelines": [
                {
                    "name": "orders_stream",
                    "tenant": TENANT,
                    "resource_id": RESOURCE_ID,
                    "type": "cdc",
                    "source": {"connection": "src", "tables": ["public.orders"]},
                    "sink": {"connection": "warehouse", "dataset": "replica"},
                    "cdc": {"batch_max_ms": 200},
                }
            ],
        },
    }
    (root / "pipelines" / "stream" / "defs.yaml").write_text(yaml.safe_dump(defs, sort_keys=False))
    return root


def run_stack(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "stack.py"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for(what: str, probe, timeout: float, interval: float = 1.0):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def sink_rows(warehouse: Path) -> list[tuple] | None:
    """The live rows in the sink, or None while the table is missing or the file is locked."""
    if not warehouse.exists():
        return None
    try:
        with duckdb.connect(str(warehouse), read_only=True) as conn:
            columns = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'replica' AND table_name = 'orders'"
            ).fetchall()}
            if not columns:
                return None
            live = "WHERE NOT coalesce(_nilus_deleted, false)" if "_nilus_deleted" in columns else ""
            rows = conn.execute(f"SELECT id, status, amount FROM replica.orders {live} ORDER BY id").fetchall()
    except duckdb.Error:  # the CDC run holds the write lock for a moment
        return None
    return [(int(i), s, float(a)) for i, s, a in rows]


def source_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, status, amount FROM public.orders ORDER BY id").fetchall()
    return [(int(i), s, float(a)) for i, s, a in rows]


@pytest.fixture
def source_dsn(pg_cluster: EmbeddedPostgres) -> str:
    name = f"src_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = pg_cluster.dsn(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    return dsn


@pytest.fixture
def stack_home(tmp_path: Path) -> Iterator[Path]:
    """The stack's home; whatever happens in the test, the stack is stopped afterwards."""
    home = tmp_path / "stack"
    yield home
    if (home / "stack.json").exists():
        run_stack("down", "--home", str(home), env=dict(os.environ), timeout=120)


@pytest.mark.timeout(400)
def test_local_stack_runs_a_cdc_pipeline_end_to_end(
    tmp_path: Path, source_dsn: str, stack_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    warehouse = tmp_path / "warehouse.duckdb"
    project = write_project(tmp_path / "project", warehouse)
    env = dict(os.environ)
    env.update(
        SOURCE_DSN=source_dsn,
        NILUS_API_TOKENS=f"{READ_TOKEN}:{TENANT}:read;{ADMIN_TOKEN}::admin",
        NILUS_STACK_API_TOKEN=ADMIN_TOKEN,
    )
    env.pop("NILUS_STATE_DSN", None)  # the stack's own state database

    up = run_stack(
        "up", "--detach", "--home", str(stack_home), "--project", str(project), "--timeout", "150",
        env=env,
    )
    assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
    state = stack.StackState.load(stack_home)
    assert set(state.services) == {"code_server", "webserver", "api", "daemon"}
    assert state.host == "127.0.0.1"
    logs = sorted(p.name for p in (stack_home / "logs").iterdir())
    assert logs == ["api.log", "code_server.log", "daemon.log", "webserver.log"]
    status = run_stack("status", "--home", str(stack_home), env=env, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    t_up = time.monotonic() - started

    # deploy/dagster.yaml, as every process loaded it: a real PostgreSQL-backed instance.
    for name, value in stack.service_env(state).items():
        if name.startswith("DAGSTER_PG_") or name == "DAGSTER_HOME":
            monkeypatch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(stack_home / "dagster_home")) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"

        # The daemon's sensor tick asks for the CDC run; the queue launches it through the code server.
        def cdc_run() -> dg.DagsterRun | None:
            runs = instance.get_runs(dg.RunsFilter(tags={TENANT_TAG: TENANT, RESOURCE_ID_TAG: RESOURCE_ID}), limit=1)
            return runs[0] if runs and runs[0].status == dg.DagsterRunStatus.STARTED else None

        run = wait_for("the keep-alive sensor to start the CDC run", cdc_run, timeout=120)
        assert run.tags[CDC_PIPELINE_TAG] == run.job_name
        assert run.tags.get("dagster/sensor_name", "").endswith("__keep_alive")
        t_run = time.monotonic() - started

        initial = source_rows(source_dsn)
        wait_for("the initial snapshot in the sink", lambda: sink_rows(warehouse) == initial, timeout=90)

        with psycopg.connect(source_dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO public.orders SELECT g, 'fresh', g * 2 FROM generate_series(41, 45) g")
            conn.execute("UPDATE public.orders SET status = 'paid', amount = amount + 1 WHERE id IN (3, 7, 42)")
            conn.execute("DELETE FROM public.orders WHERE id = 5")
        changed = source_rows(source_dsn)
        assert len(changed) == 44
        wait_for("the changes in the sink", lambda: sink_rows(warehouse) == changed, timeout=60)
        t_changes = time.monotonic() - started

        # The monitoring API lists the run (tenant token, server-side tenant filter).
        api = f"http://127.0.0.1:{state.ports['api']}{stack.API_PREFIX}"
        response = httpx.get(
            f"{api}/tenants/{TENANT}/pipelines/{RESOURCE_ID}/runs",
            headers={"Authorization": f"Bearer {READ_TOKEN}"}, timeout=30,
        )
        assert response.status_code == 200, response.text
        listed = {r["run_id"]: r for r in response.json()["runs"]}
        assert run.run_id in listed and listed[run.run_id]["status"] == "STARTED"
        denied = httpx.get(f"{api}/tenants/{TENANT}/pipelines/{RESOURCE_ID}/runs", timeout=30)
        assert denied.status_code == 401
        metrics = httpx.get(f"http://127.0.0.1:{state.ports['metrics']}/metrics", timeout=30)
        assert metrics.status_code == 200 and "nilus_" in metrics.text

    groups = [s.pid for s in state.services.values()]
    down = run_stack("down", "--home", str(stack_home), env=env, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [pid for pid in groups if stack.group_alive(pid)], "a stack process (or a run worker) survived"
    assert not (stack_home / "stack.json").exists()
    assert not EmbeddedPostgres(stack_home / "postgres").is_running()
    assert "terminating run" in down.stdout, down.stdout
    t_total = time.monotonic() - started
    print(f"\nstack smoke: up {t_up:.0f}s, CDC run started {t_run:.0f}s, changes in sink {t_changes:.0f}s, "
          f"down, total {t_total:.0f}s")
    assert t_total < 300
