"""The operator surface's reads and job actions over a real CDC pipeline: progress, metrics,
drift and the proposed schema from what real runs left, and approve / resync / reset through
REST, each a Dagster run of the pipeline's job on the same instance, audited and tagged.

The CDC runs execute in process (`stop_at: caught_up`) on the instance of DAGSTER_HOME, which
the API (real app, in process) shares. Source PostgreSQL, PostgreSQL sink.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from api_fixtures import api_over_defs
from batch_project import SinkTarget, failure_message, sink_target
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from table_compare import assert_same_rows, source_rows
from test_cdc_crash import create_items

from nilus_dagster.components.lifecycle import AUDIT_TAG, OPERATOR_TAG
from nilus_dagster.state import NilusStateStore
from nilus_dagster.state.store import StateStore

BASE = "/nilus-manager/api/v1"
JOB = "acme__crashy"
EDITOR = {"Authorization": "Bearer tok-edit"}
ADMIN = {"Authorization": "Bearer tok-admin"}
PIPE = f"{BASE}/tenants/acme/pipelines/nilus:v1:crashy:acme"
COLUMNS = ["id", "counter", "label", "note"]


@pytest.fixture
def pg_sink(duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch) -> SinkTarget:
    return sink_target("postgres", duckdb_path, sink_pg, monkeypatch)


@pytest.fixture
def world(
    pipeline_env: str, state_dsn: str, pg_sink: SinkTarget, tmp_path: Path
) -> Iterator[tuple[dg.Definitions, TestClient]]:
    """The pipeline (schema_changes: pause) as Dagster loads it, and the API over the same defs."""
    pipeline = cdc_pipeline("crashy", ["public.items"], schema_changes="pause", cdc={"batch_max_ms": 100})
    attributes = {
        "connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": pg_sink.connection},
        "pipelines": [pipeline],
    }
    with api_over_defs(tmp_path / "defs", attributes, state_dsn, "tok-edit:acme:editor;tok-admin::admin") as client:
        yield cdc_project(pg_sink, pipeline), client


def _get(client: TestClient, path: str) -> dict:
    response = client.get(f"{PIPE}/{path}", headers=EDITOR)
    assert response.status_code == 200, response.text
    return response.json()


def _caught_up(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    result = run_until_caught_up(defs, JOB, instance)
    assert result.success, failure_message(result)


def _sql(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _sink_items(sink: SinkTarget, columns: list[str]) -> list[tuple]:
    with psycopg.connect(sink.location) as conn:
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM replica.items ORDER BY id").fetchall()
    return [tuple(r) for r in rows]


def test_progress_metrics_drift_and_schema_approval(
    world: tuple[dg.Definitions, TestClient], pipeline_env: str, pg_sink: SinkTarget
) -> None:
    defs, client = world
    env, instance = pipeline_env, dg.DagsterInstance.get()
    create_items(env, 20)
    _caught_up(defs, instance)

    progress = _get(client, "progress")
    (table,) = progress["tables"]
    assert progress["phase"] == "streaming" and table["table"] == "public.items"
    assert table["partitions_total"] >= 1 and table["partitions_done"] == table["partitions_total"]
    assert (table["rows_done"], table["percent"]) == (20, 100.0)  # the snapshot copied every source row

    _sql(env, "UPDATE public.items SET counter = 1 WHERE id <= 5")
    _caught_up(defs, instance)
    metrics = _get(client, "metrics")
    assert metrics["state"] == "starting"  # no live run, not held: the keep-alive sensor starts one
    assert metrics["events_total"] == 5 and metrics["events_per_second"] == 0.0  # the run has ended
    assert metrics["sink_errors_total"] == 0 and metrics["last_checkpoint_at"] is not None
    assert metrics["replication_lag_seconds"] is not None and metrics["retained_wal_bytes"] is not None
    assert metrics["tables"] == [
        {"table": "public.items", "events_total": 5, "failed": False, "last_checkpoint_at": metrics["last_checkpoint_at"]}
    ]
    scrape = generate_latest(client.app.state.metrics_registry).decode()  # the same per table in Prometheus
    assert 'nilus_cdc_table_events_total{pipeline="crashy",table="public.items",tenant="acme"} 5.0' in scrape
    (drift,) = _get(client, "drift")["tables"]
    assert drift == {**drift, "has_drift": False, "compared_with": "sink", "added": [], "dropped": [], "retyped": []}
    assert _get(client, "schema/proposed")["pending"] is False
    nothing = client.post(f"{PIPE}/schema/approve", headers=EDITOR)
    assert nothing.status_code == 409 and nothing.json()["code"] == "no_pending_schema", nothing.text

    _sql(env, "ALTER TABLE public.items ADD COLUMN note text", "INSERT INTO public.items VALUES (21, 0, 'y', now(), 'n')")
    (drift,) = _get(client, "drift")["tables"]
    assert (drift["has_drift"], drift["added"], drift["dropped"]) == (True, ["note"], [])
    _caught_up(defs, instance)  # the change is held for approval
    proposed = _get(client, "schema/proposed")
    assert proposed["pending"] is True and proposed["table"] == "public.items" and "note" in proposed["diff"]
    assert [c["name"] for c in proposed["proposed_schema"]["columns"]] == ["id", "counter", "label", "updated_at", "note"]
    assert "note" not in [c["name"] for c in proposed["current_schema"]["columns"]]
    assert _get(client, "metrics")["state"] == "pending_schema_approval"
    assert client.post(f"{PIPE}/schema/approve", headers={"Authorization": "Bearer nope"}).status_code == 401

    approved = client.post(f"{PIPE}/schema/approve", headers=EDITOR)
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["job_name"] == f"{JOB}__approve_schema" and "approved the schema change of public.items" in body["message"]
    run = instance.get_run_by_id(body["run_id"])  # a Dagster run of the job, on the shared instance
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags[AUDIT_TAG] == str(body["audit_id"]) and run.tags[OPERATOR_TAG] == "env0"
    _caught_up(defs, instance)  # the next run applies the approved change
    assert_same_rows(source_rows(env, "public.items", COLUMNS, "id"), _sink_items(pg_sink, COLUMNS))
    (drift,) = _get(client, "drift")["tables"]
    assert drift["has_drift"] is False

    _sql(env, "ALTER TABLE public.items ALTER COLUMN counter TYPE bigint")
    (drift,) = _get(client, "drift")["tables"]
    assert drift["retyped"] == [{"column": "counter", "sink_type": "int32", "source_type": "int64", "source_column_type": "bigint"}]

    audit = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()["audit"]
    assert [(e["action"], e["result"], e["params"]["via"]) for e in reversed(audit)] == [
        ("schema:approve", "refused", "api"),
        ("schema:approve", "ok", "api"),
    ]
    assert audit[0]["run_ids"] == [body["run_id"]] and {e["actor"] for e in audit} == {"env0"}


def test_resync_and_reset_launch_their_jobs(
    world: tuple[dg.Definitions, TestClient], pipeline_env: str, state_dsn: str, pg_sink: SinkTarget
) -> None:
    defs, client = world
    env, instance = pipeline_env, dg.DagsterInstance.get()
    create_items(env, 10)
    _caught_up(defs, instance)

    unknown = client.post(f"{PIPE}/resync", json={"tables": ["public.nope"]}, headers=EDITOR)
    assert unknown.status_code == 422 and unknown.json()["code"] == "unknown_tables", unknown.text
    assert "public.items" in unknown.json()["error"]  # names the pipeline's tables
    resync = client.post(f"{PIPE}/resync", json={"tables": ["public.items"], "reason": "checked"}, headers=EDITOR)
    assert resync.status_code == 200, resync.text
    assert resync.json()["job_name"] == f"{JOB}__resync"
    with StateStore(state_dsn).open() as store:
        (request,) = store.open_resyncs("acme", "crashy")
    assert (request.table_name, request.reason) == ("public.items", "checked")
    assert _get(client, "progress")["phase"] == "resync"
    _caught_up(defs, instance)  # the next run carries it out
    assert _get(client, "progress")["phase"] == "streaming"
    columns = COLUMNS[:3]
    assert_same_rows(source_rows(env, "public.items", columns, "id"), _sink_items(pg_sink, columns))

    assert client.post(f"{PIPE}/reset", headers=EDITOR).status_code == 403  # reset is for admins
    reset = client.post(f"{PIPE}/reset", headers=ADMIN)
    assert reset.status_code == 200, reset.text
    run = instance.get_run_by_id(reset.json()["run_id"])
    assert run is not None and run.job_name == f"{JOB}__reset" and run.tags[AUDIT_TAG] == str(reset.json()["audit_id"])
    with psycopg.connect(env, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").fetchone() == (0,)
    assert [t["partitions_total"] for t in _get(client, "progress")["tables"]] == [0]
    audit = client.get(f"{BASE}/tenants/acme/audit", headers=EDITOR).json()["audit"]
    assert [(e["action"], e["result"], e["actor"]) for e in reversed(audit)] == [
        ("resync", "refused", "env0"),
        ("resync", "ok", "env0"),
        ("reset", "ok", "env1"),
    ]


def test_paused_pipeline_warns_when_retained_wal_grows(
    world: tuple[dg.Definitions, TestClient], pipeline_env: str, state_dsn: str
) -> None:
    """While paused nothing consumes the slot: the metric shows the WAL it retains, and the keep-alive
    sensor's `held_wal_retention` check passes at the hold's start and warns once that WAL grew."""
    defs, client = world
    env, instance = pipeline_env, dg.DagsterInstance.get()
    create_items(env, 5)
    _caught_up(defs, instance)
    paused = client.put(f"{PIPE}/state", json={"state": "pause"}, headers=EDITOR)
    assert paused.status_code == 200 and paused.json()["state"] == "paused", paused.text
    sensor = defs.resolve_sensor_def(f"{JOB}__keep_alive")

    def tick(cursor: str | None) -> dg.SensorResult:
        resources = {"nilus_state": NilusStateStore(dsn=state_dsn)}
        with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
            result = sensor(context)
        assert isinstance(result, dg.SensorResult) and "paused" in str(result.skip_reason), result
        return result

    first = tick(None)
    assert [(e.check_name, e.passed) for e in first.asset_events] == [("held_wal_retention", True)]
    _sql(env, "INSERT INTO public.items SELECT g, 0, repeat('z', 500), now() FROM generate_series(100, 2100) g")
    second = tick(first.cursor)
    (warning,) = second.asset_events
    assert not warning.passed and warning.severity == dg.AssetCheckSeverity.WARN
    assert warning.metadata["growth_bytes"].value > 500 * 2000  # the rows written while paused, at least
    scrape = generate_latest(client.app.state.metrics_registry).decode()
    held = [line for line in scrape.splitlines() if line.startswith("nilus_pipeline_held_retained_wal_bytes{")]
    assert len(held) == 1 and 'state="paused"' in held[0] and float(held[0].split()[-1]) > 500 * 2000
