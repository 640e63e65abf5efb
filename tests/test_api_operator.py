"""The operator surface over the API world: labels, validate, lifecycle refusals, audit, roles.

The lifecycle against a live CDC run is in tests/test_api_lifecycle.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_fixtures import BASE, DEFS_YAML, World
from fastapi.testclient import TestClient

from nilus_dagster.api.app import create_app
from nilus_dagster.api.auth import TokenRegistry

STREAM = "nilus:v1:stream:acme"


@pytest.fixture
def op_client(sqlite_world: World, state_dsn: str) -> Iterator[TestClient]:
    """The API over the shared world's Dagster instance and a fresh state store (audit rows stay here)."""
    with TestClient(create_app(sqlite_world.settings(state_dsn=state_dsn)), raise_server_exceptions=False) as client:
        yield client


def _names(client: TestClient, world: World, *labels: str) -> list[str]:
    response = client.get(
        f"{BASE}/tenants/acme/pipelines", params={"label": list(labels)}, headers=world.headers("read_acme")
    )
    assert response.status_code == 200, response.text
    return [p["pipeline_name"] for p in response.json()["pipelines"]]


def test_label_filters_are_anded(sqlite_world: World, sqlite_client: TestClient) -> None:
    assert _names(sqlite_client, sqlite_world) == ["catalog", "never", "orders", "stream"]
    assert _names(sqlite_client, sqlite_world, "team:sales") == ["catalog", "orders"]
    assert _names(sqlite_client, sqlite_world, "team:sales", "tier:gold") == ["catalog"]
    assert _names(sqlite_client, sqlite_world, "tier") == ["catalog"]  # a key alone: any value
    assert _names(sqlite_client, sqlite_world, "team:sales", "tier:silver") == []
    assert _names(sqlite_client, sqlite_world, "team:ops") == []
    total = sqlite_client.get(
        f"{BASE}/tenants/acme/pipelines",
        params={"label": "team:sales", "limit": 1},
        headers=sqlite_world.headers("read_acme"),
    ).json()
    assert total["total"] == 2 and len(total["pipelines"]) == 1


def _validate(client: TestClient, world: World, text: str):
    return client.post(
        f"{BASE}/validate", content=text, headers={**world.headers("read_acme"), "Content-Type": "application/yaml"}
    )


def test_validate_reports_what_dg_check_defs_reports(sqlite_world: World, sqlite_client: TestClient) -> None:
    ok = _validate(sqlite_client, sqlite_world, DEFS_YAML)
    assert ok.status_code == 200, ok.text
    assert ok.json()["valid"] is True and "acme/stream" in ok.json()["pipelines"]

    broken = DEFS_YAML.replace("strategy: replace", "strategy: upsert").replace("run_as_user: bob", "run_as: bob")
    bad = _validate(sqlite_client, sqlite_world, broken)
    assert bad.status_code == 422, bad.text
    body = bad.json()
    assert body["code"] == "invalid_defs" and body["valid"] is False and "upsert" in body["error"]
    by_field = {p["field"]: p for p in body["problems"]}
    assert by_field["attributes.pipelines[1].sink.strategy"]["value"] == "upsert"
    assert "merge" in by_field["attributes.pipelines[1].sink.strategy"]["message"]  # what is allowed
    assert "unknown field 'run_as'" in by_field["attributes.pipelines[2].run_as"]["message"]
    assert all(p["file"] == "defs.yaml" for p in body["problems"])

    for text, expect in (("a: [unclosed", "not valid YAML"), ("type: other.Component\n", "no component of type")):
        response = _validate(sqlite_client, sqlite_world, text)
        assert response.status_code == 422 and expect in response.json()["error"], response.text
    assert sqlite_client.post(f"{BASE}/validate", content=DEFS_YAML).status_code == 401


def test_lifecycle_refusals_and_audit(sqlite_world: World, op_client: TestClient) -> None:
    editor, reader = sqlite_world.headers("editor_acme"), sqlite_world.headers("read_acme")
    url = f"{BASE}/tenants/acme/pipelines/{STREAM}/state"

    state = op_client.get(url, headers=reader)
    assert state.status_code == 200 and state.json()["state"] == "running", state.text  # the world's STARTED run
    refused = op_client.put(url, json={"state": "resume"}, headers=editor)
    assert refused.status_code == 409 and refused.json()["code"] == "invalid_transition"
    assert "it is running" in refused.json()["error"]
    assert op_client.put(url, json={"state": "start"}, headers=editor).status_code == 409

    missing = op_client.put(f"{BASE}/tenants/acme/pipelines/nope/state", json={"state": "stop"}, headers=editor)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    batch = op_client.put(f"{BASE}/tenants/acme/pipelines/rid-orders/state", json={"state": "stop"}, headers=editor)
    assert batch.status_code == 409 and batch.json()["code"] == "not_cdc"
    for body in ({"state": "explode"}, {}, {"state": "stop", "force": True}):
        bad = op_client.put(url, json=body, headers=editor)
        assert bad.status_code == 422 and set(bad.json()) == {"error", "code"}, bad.text
    not_json = op_client.put(url, content=b"{", headers={**editor, "Content-Type": "application/json"})
    assert not_json.status_code in (400, 422) and set(not_json.json()) == {"error", "code"}
    forbidden = op_client.put(url, json={"state": "stop"}, headers=reader)  # a viewer may not operate
    assert forbidden.status_code == 403 and "operate" in forbidden.json()["error"]
    other = op_client.put(url.replace("/acme/", "/globex/"), json={"state": "stop"}, headers=editor)
    assert other.status_code == 403

    audit = op_client.get(f"{BASE}/tenants/acme/audit", headers=reader).json()
    assert audit["total"] == 2  # the two refused transitions of a known CDC pipeline
    newest, oldest = audit["audit"]
    assert (oldest["action"], oldest["result"], oldest["actor"]) == ("state:resume", "refused", "editor_acme")
    assert newest["action"] == "state:start" and newest["detail"] == {"current": "running"}
    assert newest["resource_id"] == STREAM and newest["pipeline_name"] == "stream"
    filtered = op_client.get(f"{BASE}/tenants/acme/audit", params={"action": "state:resume"}, headers=reader).json()
    assert [e["id"] for e in filtered["audit"]] == [oldest["id"]]
    assert op_client.get(f"{BASE}/tenants/acme/audit", params={"actor": "nobody"}, headers=reader).json()["total"] == 0
    since = op_client.get(f"{BASE}/tenants/acme/audit", params={"at_gte": newest["at"]}, headers=reader).json()
    assert [e["id"] for e in since["audit"]] == [newest["id"]]
    assert (
        op_client.get(f"{BASE}/tenants/globex/audit", headers=sqlite_world.headers("read_globex")).json()["total"] == 0
    )


def test_checkpoints_per_table(sqlite_world: World, sqlite_client: TestClient) -> None:
    response = sqlite_client.get(
        f"{BASE}/tenants/acme/pipelines/{STREAM}/checkpoints", headers=sqlite_world.headers("read_acme")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["slot"] == "slot_a"
    (table,) = body["tables"]
    # the world planned two snapshot partitions of acme.customers and finished one
    assert table == {**table, "table": "acme.customers", "phase": "snapshot", "lsn": None}
    assert (
        sqlite_client.get(
            f"{BASE}/tenants/acme/pipelines/nope/checkpoints", headers=sqlite_world.headers("read_acme")
        ).status_code
        == 404
    )


def test_roles_map_onto_scopes(tmp_path) -> None:
    registry = TokenRegistry.load(None, "v:acme:viewer;e:acme:editor;a::admin;r:acme:read;o:acme:operate")
    viewer, editor, admin = (registry.authenticate(t) for t in "vea")
    assert viewer.scope == "read" and viewer.role == "viewer" and not viewer.may("operate", "acme")
    assert editor.may("operate", "acme") and editor.may("read", "acme") and not editor.may("runtime", "acme")
    assert not editor.may("operate", "globex") and editor.role == "editor"
    assert admin.may("operate", "globex") and admin.role == "admin"
    assert registry.authenticate("r").may("read", "acme") and registry.authenticate("o").role == "editor"
    path = tmp_path / "tokens.yaml"
    path.write_text("[{sha256: '" + "0" * 64 + "', tenants: [a], scope: read, role: editor}]")
    with pytest.raises(ValueError, match="scope or role"):
        TokenRegistry.load(path)


def test_graphql_operator_surface(sqlite_world: World, op_client: TestClient) -> None:
    def gql(who: str, query: str, resource_id: str = STREAM) -> dict:
        body = {"query": query.replace("RID", resource_id)}
        response = op_client.post("/nilus-manager/graphql", json=body, headers=sqlite_world.headers(who))
        assert response.status_code == 200, response.text
        return response.json()

    state = gql("read_acme", '{ pipelineState(tenant: "acme", resourceId: "RID") { state liveRunIds } }')
    assert state["data"]["pipelineState"]["state"] == "running"
    points = gql("read_acme", '{ checkpoints(tenant: "acme", resourceId: "RID") { tables { table phase } } }')
    assert points["data"]["checkpoints"]["tables"] == [{"table": "acme.customers", "phase": "not_started"}]
    labelled = gql("read_acme", '{ pipelines(tenant: "acme", label: ["team:sales", "tier:gold"]) { total } }')
    assert labelled["data"]["pipelines"]["total"] == 1

    mutation = 'mutation { setPipelineState(tenant: "acme", resourceId: "RID", state: "STATE") { state auditId } }'
    denied = gql("read_acme", mutation.replace("STATE", "stop"))
    assert denied["errors"][0]["extensions"]["code"] == "forbidden"
    refused = gql("editor_acme", mutation.replace("STATE", "resume"))
    assert refused["errors"][0]["extensions"]["code"] == "invalid_transition"
    assert "it is running" in refused["errors"][0]["message"]
    assert (
        gql("editor_acme", mutation.replace("STATE", "explode"))["errors"][0]["extensions"]["code"]
        == "invalid_parameter"
    )
    assert (
        gql("editor_acme", mutation.replace("STATE", "stop"), "nope")["errors"][0]["extensions"]["code"] == "not_found"
    )
    audit = gql("read_acme", '{ audit(tenant: "acme") { total audit { action result actor } } }')["data"]["audit"]
    assert audit == {"total": 1, "audit": [{"action": "state:resume", "result": "refused", "actor": "editor_acme"}]}


def test_progress_and_metrics_from_the_state_store(sqlite_world: World, sqlite_client: TestClient) -> None:
    reader = sqlite_world.headers("read_acme")
    progress = sqlite_client.get(f"{BASE}/tenants/acme/pipelines/{STREAM}/progress", headers=reader)
    assert progress.status_code == 200, progress.text
    # the world planned two partitions of acme.customers (100 rows estimated) and copied one (50 rows)
    assert progress.json()["phase"] == "snapshot"
    assert progress.json()["tables"] == [
        {"table": "acme.customers", "phase": "snapshot", "partitions_total": 2, "partitions_done": 1,
         "rows_total": 100, "rows_done": 50, "percent": 50.0}
    ]
    metrics = sqlite_client.get(f"{BASE}/tenants/acme/pipelines/{STREAM}/metrics", headers=reader).json()
    assert (metrics["state"], metrics["events_total"], metrics["sink_errors_total"]) == ("running", 1234, 3)
    assert metrics["replication_lag_seconds"] >= 1.5 and metrics["last_checkpoint_at"] is not None
    assert metrics["tables"] == [{"table": "acme.customers", "events_total": 0, "failed": False,
                                  "last_checkpoint_at": None}]  # still being copied
    proposed = sqlite_client.get(f"{BASE}/tenants/acme/pipelines/{STREAM}/schema/proposed", headers=reader).json()
    assert proposed == {**proposed, "pending": False, "table": None, "proposed_schema": None}
    for path in ("progress", "metrics", "schema/proposed", "drift"):
        missing = sqlite_client.get(f"{BASE}/tenants/acme/pipelines/nope/{path}", headers=reader)
        assert missing.status_code == 404 and missing.json()["code"] == "not_found", path
        batch = sqlite_client.get(f"{BASE}/tenants/acme/pipelines/rid-orders/{path}", headers=reader)
        assert batch.status_code == 409 and batch.json()["code"] == "not_cdc", path


def test_job_actions_refused_before_any_run(sqlite_world: World, op_client: TestClient) -> None:
    """What the API can tell is refused without launching a job, audited as refused."""
    editor, admin = sqlite_world.headers("editor_acme"), sqlite_world.headers("admin")
    url = f"{BASE}/tenants/acme/pipelines/{STREAM}"
    approve = op_client.post(f"{url}/schema/approve", headers=editor)
    assert approve.status_code == 409 and approve.json()["code"] == "no_pending_schema", approve.text
    unknown = op_client.post(f"{url}/resync", json={"tables": ["acme.nope"]}, headers=editor)
    assert unknown.status_code == 422 and "acme.customers" in unknown.json()["error"]
    for body in ({"tables": []}, {}, {"tables": ["acme.customers"], "wait": 1}):
        bad = op_client.post(f"{url}/resync", json=body, headers=editor)
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_parameter", bad.text
    assert op_client.post(f"{url}/reset", headers=editor).status_code == 403  # reset needs admin
    live = op_client.post(f"{url}/reset", headers=admin)  # the world's STARTED run of the pipeline
    assert live.status_code == 409 and live.json()["code"] == "pipeline_running" and "stop" in live.json()["error"]
    audit = op_client.get(f"{BASE}/tenants/acme/audit", headers=editor).json()["audit"]
    assert [(e["action"], e["result"], e["actor"], e["run_ids"]) for e in reversed(audit)] == [
        ("schema:approve", "refused", "editor_acme", []),
        ("resync", "refused", "editor_acme", []),
        ("reset", "refused", "admin", []),
    ]


def test_graphql_reads_and_job_actions(sqlite_world: World, op_client: TestClient, sqlite_client: TestClient) -> None:
    def gql(client: TestClient, who: str, query: str) -> dict:
        response = client.post(
            "/nilus-manager/graphql", json={"query": query.replace("RID", STREAM)}, headers=sqlite_world.headers(who)
        )
        assert response.status_code == 200, response.text
        return response.json()

    progress = gql(sqlite_client, "read_acme", '{ progress(tenant: "acme", resourceId: "RID") { phase tables { '
                   "table partitionsDone partitionsTotal rowsDone percent } } }")["data"]["progress"]
    assert progress == {"phase": "snapshot", "tables": [
        {"table": "acme.customers", "partitionsDone": 1, "partitionsTotal": 2, "rowsDone": 50, "percent": 50.0}]}
    metrics = gql(sqlite_client, "read_acme", '{ pipelineMetrics(tenant: "acme", resourceId: "RID") { state '
                  "eventsTotal sinkErrorsTotal } }")["data"]["pipelineMetrics"]
    assert metrics == {"state": "running", "eventsTotal": 1234, "sinkErrorsTotal": 3}
    proposed = gql(sqlite_client, "read_acme", '{ proposedSchema(tenant: "acme", resourceId: "RID") { pending } }')
    assert proposed["data"]["proposedSchema"] == {"pending": False}
    denied = gql(sqlite_client, "read_globex", '{ progress(tenant: "acme", resourceId: "RID") { phase } }')
    assert denied["errors"][0]["extensions"]["code"] == "forbidden"

    def code(who: str, mutation: str) -> str:
        return gql(op_client, who, f"mutation {{ {mutation} {{ runId }} }}")["errors"][0]["extensions"]["code"]

    assert code("editor_acme", 'approveSchema(tenant: "acme", resourceId: "RID")') == "no_pending_schema"
    assert code("read_acme", 'approveSchema(tenant: "acme", resourceId: "RID")') == "forbidden"
    resync = 'resyncTables(tenant: "acme", resourceId: "RID", tables: ["acme.nope"])'
    assert code("editor_acme", resync) == "unknown_tables"
    assert code("editor_acme", 'resetPipeline(tenant: "acme", resourceId: "RID")') == "forbidden"
    assert code("admin", 'resetPipeline(tenant: "acme", resourceId: "RID")') == "pipeline_running"
