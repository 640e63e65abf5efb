"""Fixtures for the monitoring API tests: a real Dagster instance (SQLite or PostgreSQL storage)
filled with synthetic run records and runs of real jobs, a state store with CDC records, a defs
folder declaring the pipelines, and tokens of every scope.

Register as a plugin (`pytest_plugins = ["api_fixtures"]`). Synthetic runs: `add_historical_run`
sets the creation time; `handle_run_event` with `update_timestamp` sets start/end (dagster 1.13).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import httpx
import psycopg
import pytest
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEvent, DagsterEventType
from fastapi.testclient import TestClient

from nilus_dagster.api.app import create_app
from nilus_dagster.api.settings import Settings
from nilus_dagster.components.tags import PIPELINE_TAG, RESOURCE_ID_TAG, RUN_AS_USER_TAG, TENANT_TAG
from nilus_dagster.embedded.postgres import free_port
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore


@contextlib.contextmanager
def api_over_defs(folder: Path, attributes: dict, state_dsn: str, tokens: str) -> Iterator[TestClient]:
    """The API app over a defs folder holding one `defs.yaml` with these NilusPipelines attributes."""
    folder.mkdir()
    document = {"type": "nilus_dagster.components.NilusPipelines", "attributes": attributes}
    (folder / "defs.yaml").write_text(json.dumps(document))  # JSON is YAML
    settings = Settings(
        dagster_home=Path(os.environ["DAGSTER_HOME"]),
        state_dsn=state_dsn,
        defs_dir=folder,
        tokens_env=tokens,
        defs_reload_seconds=0.0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


BASE = "/nilus-manager/api/v1"
TOKENS = {
    "read_acme": ("tok-read-acme", ["acme"], "read"),
    "read_globex": ("tok-read-globex", ["globex"], "read"),
    "runtime": ("tok-runtime", ["acme", "initech"], "runtime"),
    "editor_acme": ("tok-editor-acme", ["acme"], "editor"),
    "admin": ("tok-admin", [], "admin"),
}
DEFS_YAML = """
type: nilus_dagster.components.NilusPipelines
attributes:
  connections:
    shop: {type: postgres, dsn_env: SHOP_DSN}
    warehouse: {type: duckdb, path: .nilus/warehouse.duckdb}
  pipelines:
    - name: orders
      tenant: acme
      resource_id: rid-orders
      run_as_user: alice
      labels: {team: sales}
      source: {connection: shop, tables: [{name: acme.orders, cursor: updated_at}]}
      sink: {connection: warehouse, dataset: acme}
      schedule: "*/15 * * * *"
    - name: catalog
      tenant: acme
      labels: {team: sales, tier: gold}
      source: {connection: shop, tables: [acme.products]}
      sink: {connection: warehouse, dataset: acme, strategy: replace}
    - name: stream
      tenant: acme
      type: cdc
      run_as_user: bob
      source: {connection: shop, tables: [acme.customers]}
      sink: {connection: warehouse, dataset: acme}
    - name: never
      tenant: acme
      source: {connection: shop, tables: [acme.never]}
      sink: {connection: warehouse, dataset: acme, strategy: append}
    - name: orders
      tenant: globex
      resource_id: rid-orders
      run_as_user: alice
      source: {connection: shop, tables: [{name: globex.orders, cursor: id}]}
      sink: {connection: warehouse, dataset: globex, strategy: append}
    - name: events
      tenant: globex
      source: {connection: shop, tables: [globex.events]}
      sink: {connection: warehouse, dataset: globex, strategy: append}
"""


@dataclass
class World:
    """A filled Dagster instance + state store + declarations, and how to build the API on them."""

    backend: str
    home: Path
    instance: DagsterInstance
    state_dsn: str
    defs_dir: Path
    tokens_file: Path
    now: datetime
    extra_env_tokens: str = ""
    run_ids: dict[str, list[str]] = field(default_factory=dict)

    def settings(self, **overrides) -> Settings:
        values = dict(
            dagster_home=self.home,
            state_dsn=self.state_dsn,
            defs_dir=self.defs_dir,
            tokens_file=self.tokens_file,
            tokens_env=self.extra_env_tokens,
            dagster_ui_url="http://dagster.test",
            metrics_cache_seconds=0.0,
        )
        values.update(overrides)
        return Settings(**values)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[who][0]}"}

    def records(self, tenant: str, resource_id: str):
        """Every run of a pipeline, loaded the slow way (the independent check)."""
        return self.instance.get_run_records(RunsFilter(tags={TENANT_TAG: tenant, RESOURCE_ID_TAG: resource_id}))


def _event(kind: DagsterEventType, job_name: str) -> DagsterEvent:
    return DagsterEvent(kind.value, job_name=job_name)


def add_synthetic_run(
    instance: DagsterInstance,
    *,
    tenant: str,
    pipeline: str,
    resource_id: str,
    status: DagsterRunStatus,
    created: datetime,
    duration_s: float | None = None,
    run_as_user: str | None = None,
) -> str:
    """A run record as the daemon would leave it: created, started 5 s later, ended per status."""
    run_id = str(uuid.uuid4())
    job_name = f"{tenant}__{pipeline}"
    tags = {TENANT_TAG: tenant, PIPELINE_TAG: pipeline, RESOURCE_ID_TAG: resource_id}
    if run_as_user:
        tags[RUN_AS_USER_TAG] = run_as_user
    run = DagsterRun(job_name=job_name, run_id=run_id, status=DagsterRunStatus.NOT_STARTED, tags=tags)
    instance.run_storage.add_historical_run(run, created)
    if status is DagsterRunStatus.QUEUED:
        instance.handle_run_event(run_id, _event(DagsterEventType.RUN_ENQUEUED, job_name), update_timestamp=created)
        return run_id
    started = created + timedelta(seconds=5)
    instance.handle_run_event(run_id, _event(DagsterEventType.PIPELINE_START, job_name), update_timestamp=started)
    end_event = {
        DagsterRunStatus.SUCCESS: DagsterEventType.PIPELINE_SUCCESS,
        DagsterRunStatus.FAILURE: DagsterEventType.PIPELINE_FAILURE,
        DagsterRunStatus.CANCELED: DagsterEventType.PIPELINE_CANCELED,
    }.get(status)
    if end_event is not None:
        ended = started + timedelta(seconds=duration_s or 0.0)
        instance.handle_run_event(run_id, _event(end_event, job_name), update_timestamp=ended)
    return run_id


def run_real_job(instance: DagsterInstance, tenant: str, pipeline: str, resource_id: str, *, fail: bool) -> str:
    """Execute a tiny real job carrying a pipeline's run tags."""

    @dg.op
    def work() -> int:
        if fail:
            raise RuntimeError("boom")
        return 1

    tags = {TENANT_TAG: tenant, PIPELINE_TAG: pipeline, RESOURCE_ID_TAG: resource_id}

    @dg.job(name=f"{tenant}__{pipeline}", tags=tags)
    def job() -> None:
        work()

    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success is not fail
    return result.run_id


def run_materialize(instance: DagsterInstance, tenant: str, pipeline: str, resource_id: str, *, fail: bool) -> str:
    """A "Materialize" of a pipeline's asset: a run of Dagster's implicit asset job (not the
    pipeline's job) that gets the pipeline's run tags when it starts, as the component adds them."""
    tags = {TENANT_TAG: tenant, PIPELINE_TAG: pipeline, RESOURCE_ID_TAG: resource_id}

    @dg.asset(key=[tenant, pipeline, "t"])
    def table(context) -> None:  # a string annotation (future import) is refused by Dagster
        context.instance.add_run_tags(context.run.run_id, tags)
        if fail:
            raise RuntimeError("boom")

    job = dg.Definitions(assets=[table]).resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert result.success is not fail and result.dagster_run.job_name != f"{tenant}__{pipeline}"
    return result.run_id


def _fill_runs(world: World) -> None:
    inst, now = world.instance, world.now
    ids = world.run_ids
    ids["acme/orders"] = []
    cycle = [DagsterRunStatus.SUCCESS] * 3 + [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
    for i in reversed(range(40)):  # every 20 h over ~33 days, stored oldest first like real runs
        ids["acme/orders"].insert(
            0,
            add_synthetic_run(
                inst,
                tenant="acme",
                pipeline="orders",
                resource_id="rid-orders",
                status=DagsterRunStatus.SUCCESS if i == 0 else cycle[i % 5],
                created=now - timedelta(hours=1 + 20 * i),
                duration_s=10 + (i * 37) % 200,
                run_as_user="bob" if i % 7 == 0 else "alice",
            ),
        )
    for i in reversed(range(25)):  # globex uses the same resource_id: a leak would show up in acme's numbers
        add_synthetic_run(
            inst,
            tenant="globex",
            pipeline="orders",
            resource_id="rid-orders",
            status=DagsterRunStatus.FAILURE,
            created=now - timedelta(minutes=30 + 600 * i),
            duration_s=999,
            run_as_user="alice",
        )
    add_synthetic_run(
        inst,
        tenant="acme",
        pipeline="catalog",
        resource_id="nilus:v1:catalog:acme",
        status=DagsterRunStatus.FAILURE,
        created=now - timedelta(days=2),
        duration_s=40,
    )
    add_synthetic_run(
        inst,
        tenant="acme",
        pipeline="stream",
        resource_id="nilus:v1:stream:acme",
        status=DagsterRunStatus.STARTED,
        created=now - timedelta(hours=2),
        run_as_user="bob",
    )
    ids["acme/catalog/real"] = [run_real_job(inst, "acme", "catalog", "nilus:v1:catalog:acme", fail=False)]
    # the newest catalog run: a failed "Materialize", after the pipeline job's success
    ids["acme/catalog/materialize"] = [run_materialize(inst, "acme", "catalog", "nilus:v1:catalog:acme", fail=True)]
    ids["globex/events/real"] = [run_real_job(inst, "globex", "events", "nilus:v1:events:globex", fail=True)]


def _fill_state(dsn: str) -> None:
    with StateStore(dsn) as store:
        stream = PipelineKey("acme", "stream", "nilus:v1:stream:acme")
        acme_orders = PipelineKey("acme", "orders", "rid-orders")
        globex_orders = PipelineKey("globex", "orders", "rid-orders")
        for i in range(5):
            store.append_offset(
                stream,
                connector_name="pg-acme",
                offset_key="slot_a",
                offset_value={"lsn": f"0/{i:X}"},
                run_id="r-stream",
            )
        for key, n in ((acme_orders, 3), (globex_orders, 4)):
            for i in range(n):
                store.append_offset(
                    key,
                    connector_name="pg-shared",
                    offset_key="slot_b",
                    offset_value={"lsn": f"1/{i:X}", "tenant": key.tenant},
                )
        for table in ("acme.customers", "acme.addresses", "acme.customers"):
            store.append_schema(
                stream,
                connector_name="pg-acme",
                table_name=table,
                table_schema={"columns": [{"name": "id", "type": "int8"}]},
                lsn="0/10",
            )
        for _ in range(2):
            store.append_schema(
                globex_orders,
                connector_name="pg-shared",
                table_name="globex.orders",
                table_schema={"columns": [{"name": "secret", "type": "text"}]},
                lsn="9/9",
            )
        store.set_pipeline_state(stream, "active", {"slot": "nilus_stream"})
        store.record_table_failure(stream, "acme.addresses", "postgres sink writing acme.addresses failed: "
                                   "permission denied", "0/3", "r-stream")
        store.beat(stream, "r-stream", {"lsn": "0/4", "lag_seconds": 1.5, "events_total": 1234, "events_per_s": 50.0,
                                        "sink_errors_total": 3, "failed_tables": {"acme.addresses": "denied"}})
        store.plan_snapshot(stream, "acme.customers", [(0, 10), (10, 20)], rows_estimate=100)
        store.mark_partition_done(stream, "acme.customers", 0, 50)


def _write_tokens(directory: Path) -> tuple[Path, str]:
    """read/admin tokens in a file (hashes only); runtime from the env-style variable."""
    file_entries = [
        {
            "name": name,
            "sha256": hashlib.sha256(tok.encode()).hexdigest(),
            "tenants": tenants,
            ("role" if scope == "editor" else "scope"): scope,  # a role (viewer/editor/admin) or a scope
        }
        for name, (tok, tenants, scope) in TOKENS.items()
        if name != "runtime"
    ]
    path = directory / "tokens.json"
    path.write_text(json.dumps(file_entries))
    tok, tenants, scope = TOKENS["runtime"]
    return path, f"{tok}:{','.join(tenants)}:{scope}"


def _new_database(cluster, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.dsn(name)


def build_world(backend: str, root: Path, pg_cluster) -> World:
    home = root / "dagster_home"
    home.mkdir(parents=True)
    config = "telemetry:\n  enabled: false\n"
    if backend == "postgres":
        url = _new_database(pg_cluster, "dagster").replace("postgresql://", "postgresql+psycopg2://")
        config += f"storage:\n  postgres:\n    postgres_url: {url}\n"
    (home / "dagster.yaml").write_text(config)
    defs_dir = root / "defs" / "tenants"
    defs_dir.mkdir(parents=True)
    (defs_dir / "defs.yaml").write_text(DEFS_YAML)
    tokens_file, env_tokens = _write_tokens(root)
    state_dsn = _new_database(pg_cluster, "apistate")
    world = World(
        backend,
        home,
        DagsterInstance.from_config(str(home)),
        state_dsn,
        root / "defs",
        tokens_file,
        datetime.now(UTC),
        extra_env_tokens=env_tokens,
    )
    _fill_runs(world)
    _fill_state(state_dsn)
    return world


@pytest.fixture(scope="session")
def sqlite_world(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[World]:
    world = build_world("sqlite", tmp_path_factory.mktemp("api_sqlite"), pg_cluster)
    yield world
    world.instance.dispose()


@pytest.fixture(scope="session")
def postgres_world(tmp_path_factory: pytest.TempPathFactory, pg_cluster) -> Iterator[World]:
    world = build_world("postgres", tmp_path_factory.mktemp("api_pg"), pg_cluster)
    yield world
    world.instance.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest) -> World:
    return request.getfixturevalue(f"{request.param}_world")


def _client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(world.settings()), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def client(world: World) -> Iterator[TestClient]:
    """The real ASGI app over `world` (both backends)."""
    yield from _client(world)


@pytest.fixture(scope="session")
def sqlite_client(sqlite_world: World) -> Iterator[TestClient]:
    yield from _client(sqlite_world)


def start_api_process(world: World, home: Path, tokens: str) -> tuple[subprocess.Popen[bytes], str]:
    """`nilus-api` as a process over `home` (DAGSTER_HOME) and the world's state store and defs,
    with `tokens` (NILUS_API_TOKENS); returns it once it answers, and its base URL."""
    port = free_port()
    env = dict(
        os.environ,
        DAGSTER_HOME=str(home),
        NILUS_STATE_DSN=world.state_dsn,
        NILUS_DEFS_DIR=str(world.defs_dir),
        NILUS_API_TOKENS=tokens,
        NILUS_API_HOST="127.0.0.1",
        NILUS_API_PORT=str(port),
        NILUS_METRICS_HOST="127.0.0.1",
        NILUS_METRICS_PORT=str(free_port()),
    )
    env.pop("NILUS_API_TOKENS_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nilus_dagster.api.server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"{url}{BASE}/info", timeout=2)
            return proc, url
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, "nilus-api did not start"
            time.sleep(0.2)


def stop_api_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> str:
    """Signal the process, wait for it (kill after 30 s) and return its output."""
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode()
