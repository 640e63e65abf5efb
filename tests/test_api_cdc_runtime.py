"""CDC offset storage / schema history lists, and the internal runtime API round trips."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_fixtures import BASE, World
from fastapi.testclient import TestClient

from nilus_dagster.api.app import create_app
from nilus_dagster.state.store import StateStore


def _pages(client, world: World, url: str, key: str, who: str, page: int, **params) -> tuple[list, int]:
    rows, offset = [], 0
    while True:
        body = client.get(url, params={"limit": page, "offset": offset, **params}, headers=world.headers(who)).json()
        assert set(body) == {key, "limit", "offset", "total"}
        rows += body[key]
        if not body[key]:
            return rows, body["total"]
        offset += page


@pytest.mark.parametrize(("path", "key"), [("offset-storage", "offsets"), ("schema-history", "schema_history")])
def test_cdc_lists_filters_and_pagination(sqlite_world: World, sqlite_client, path: str, key: str) -> None:
    url = f"{BASE}/tenants/acme/cdc/{path}"
    everything, total = _pages(sqlite_client, sqlite_world, url, key, "read_acme", page=500)
    assert total == len(everything) == (8 if key == "offsets" else 3)
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
    paged, _ = _pages(sqlite_client, sqlite_world, url, key, "read_acme", page=3)
    assert paged == everything
    with StateStore(sqlite_world.state_dsn) as store:  # the store's own view of acme
        lister = store.list_offsets if key == "offsets" else store.list_schema_history
        assert [r.id for r in lister("acme", limit=500).items] == [r["id"] for r in everything]
    cases = [
        {"resource_id": "rid-orders"},
        {"resource_id": "nilus:v1:stream:acme"},
        {"connector_name": "pg-shared"},
        {"connector_name": "pg-acme"},
        {"resource_id": "nope"},
    ]
    if key == "offsets":
        cases += [{"offset_key": "slot_a"}, {"offset_key": "slot_b", "connector_name": "pg-shared"}]
    stamps = sorted(r["record_insert_ts"] for r in everything)
    cases += [
        {"record_insert_ts_gte": stamps[1]},
        {"record_insert_ts_lte": stamps[-2]},
        {"record_insert_ts_gte": stamps[1], "record_insert_ts_lte": stamps[-2]},
    ]
    for params in cases:
        rows, total = _pages(sqlite_client, sqlite_world, url, key, "read_acme", page=2, **params)
        expected = (
            [
                r
                for r in everything
                if all(
                    r[k] >= v if k.endswith("_gte") else r[k] <= v if k.endswith("_lte") else r[k] == v
                    for k, v in (
                        (k.replace("_gte", "").replace("_lte", "") if k.startswith("record") else k, v)
                        for k, v in params.items()
                    )
                )
            ]
            if not any(k.startswith("record") for k in params)
            else [
                r
                for r in everything
                if ("record_insert_ts_gte" not in params or r["record_insert_ts"] >= params["record_insert_ts_gte"])
                and ("record_insert_ts_lte" not in params or r["record_insert_ts"] <= params["record_insert_ts_lte"])
            ]
        )
        assert rows == expected and total == len(expected), params
        assert "globex" not in str(rows)
    globex, total = _pages(sqlite_client, sqlite_world, url.replace("acme", "globex"), key, "read_globex", page=50)
    assert total == (4 if key == "offsets" else 2) and all(r["resource_id"] == "rid-orders" for r in globex)
    bad = sqlite_client.get(url, params={"record_insert_ts_gte": "soon"}, headers=sqlite_world.headers("read_acme"))
    assert bad.status_code == 422 and "record_insert_ts_gte" in bad.json()["error"]


@pytest.fixture
def runtime_client(sqlite_world: World, state_dsn: str) -> Iterator[TestClient]:
    """The API over a fresh, empty state store (the API migrates it)."""
    with TestClient(create_app(sqlite_world.settings(state_dsn=state_dsn)), raise_server_exceptions=False) as c:
        yield c


def test_runtime_round_trips(sqlite_world: World, runtime_client: TestClient, state_dsn: str) -> None:
    h = sqlite_world.headers("runtime")
    base = f"{BASE}/tenants/initech/pipeline/sync"
    assert runtime_client.get(f"{base}/state", headers=h).json() == {"pipeline_name": "sync", "state": None}
    assert runtime_client.get(f"{base}/offsets", headers=h).json() == {"pipeline_name": "sync", "offsets": []}
    assert runtime_client.get(f"{base}/schema-history/exists", headers=h).json()["exists"] is False

    r = runtime_client.post(f"{base}/state", headers=h, json={"state": "paused", "detail": {"why": "drift"}})
    assert r.status_code == 201
    state = runtime_client.get(f"{base}/state", headers=h).json()["state"]
    assert state["state"] == "paused" and state["detail"] == {"why": "drift"}
    assert state["resource_id"] == "nilus:v1:sync:initech"  # undeclared: the default resource id

    # the latest value of each offset key (per connector), newest first: not only the newest record
    written = [("pg", "slot", "0/10"), ("pg", "other", "0/11"), ("pg", "slot", "0/20"), ("pg2", "slot", "0/5")]
    written += [("pg", "other", "0/12"), ("pg", "slot", "0/30")]
    for connector, offset_key, lsn in written:
        body = {"connector_name": connector, "offset_key": offset_key, "offset_value": {"lsn": lsn}, "run_id": "run-1"}
        assert runtime_client.post(f"{base}/offsets", headers=h, json=body).status_code == 201
    latest = runtime_client.get(f"{base}/offsets", headers=h).json()["offsets"]
    assert [(r["connector_name"], r["offset_key"], r["offset_value"]["lsn"]) for r in latest] == [
        ("pg", "slot", "0/30"),
        ("pg", "other", "0/12"),
        ("pg2", "slot", "0/5"),
    ]
    assert latest[0]["run_id"] == "run-1" and latest[0]["id"] > latest[1]["id"] > latest[2]["id"]

    # the stored schema history (every row, every table), newest first, paginated
    written_schemas = [
        ("public.a", {"columns": [{"name": "id", "type": "int8", "nullable": False}]}),
        ("public.b", {"columns": [{"name": "id", "type": "int4", "nullable": False}]}),
        ("public.a", {"columns": [{"name": "id", "type": "int8"}, {"name": "note", "type": "text"}]}),
    ]
    for table, schema in written_schemas:
        body = {"connector_name": "pg", "table_name": table, "table_schema": schema, "lsn": "0/30"}
        assert runtime_client.post(f"{base}/schema-history", headers=h, json=body).status_code == 201
    assert runtime_client.get(f"{base}/schema-history/exists", headers=h).json()["exists"] is True
    history = runtime_client.get(f"{base}/schema-history", headers=h).json()
    assert set(history) == {"pipeline_name", "schema_history", "limit", "offset", "total"}
    assert history["total"] == 3 and history["pipeline_name"] == "sync"
    rows = history["schema_history"]
    assert [(r["table_name"], r["table_schema"]) for r in rows] == list(reversed(written_schemas))
    pages = [
        runtime_client.get(f"{base}/schema-history", headers=h, params={"limit": 2, "offset": o}).json()
        for o in (0, 2, 4)
    ]
    assert [r for p in pages for r in p["schema_history"]] == rows and all(p["total"] == 3 for p in pages)
    assert runtime_client.get(f"{base}/schema-history", headers=h, params={"limit": 0}).status_code == 422

    run = {"pipeline_name": "sync", "run_id": "run-1", "payload": {"rows": 10, "status": "success"}}
    stored = runtime_client.post(f"{BASE}/tenants/initech/pipeline/runs", headers=h, json=run)
    assert stored.status_code == 201 and stored.json()["id"] > 0
    assert runtime_client.get(f"{BASE}/tenants/initech/storage/health", headers=h).json() == {"status": "ok"}

    # declared pipelines get their declared resource id
    body = {"connector_name": "pg", "offset_key": "slot", "offset_value": {"lsn": "0/1"}}
    runtime_client.post(f"{BASE}/tenants/acme/pipeline/orders/offsets", headers=h, json=body)
    with StateStore(state_dsn) as store:
        assert store.latest_offset("acme", "orders").resource_id == "rid-orders"
        assert store.latest_offset("initech", "sync").offset_value == {"lsn": "0/30"}
        assert store.get_pipeline_state("initech", "sync").state == "paused"
    # what the runtime wrote, a reader of the tenant sees
    admin = runtime_client.get(f"{BASE}/tenants/initech/cdc/offset-storage", headers=sqlite_world.headers("admin"))
    assert admin.json()["total"] == len(written)


@pytest.mark.parametrize(
    ("path", "body", "name"),
    [
        ("/pipeline/sync/state", {"state": "bogus"}, "state"),
        ("/pipeline/sync/state", {"state": "active", "extra": 1}, "extra"),
        (
            "/pipeline/sync/offsets",
            {"connector_name": "c", "offset_key": "k", "offset_value": {"v": "a\u0000b"}},
            "offset_value",
        ),
        ("/pipeline/sync/offsets", {"connector_name": "c\n", "offset_key": "k", "offset_value": {}}, "connector_name"),
        ("/pipeline/sync/schema-history", {"connector_name": "c", "table_name": "t"}, "table_schema"),
        ("/pipeline/runs", {"pipeline_name": "bad name", "run_id": "r"}, "pipeline_name"),
        ("/pipeline/Bad-Name/state", {"state": "active"}, "pipeline_name"),
    ],
)
def test_runtime_rejects_bad_bodies(sqlite_world: World, runtime_client, path: str, body: dict, name: str) -> None:
    response = runtime_client.post(f"{BASE}/tenants/initech{path}", headers=sqlite_world.headers("runtime"), json=body)
    assert response.status_code == 422 and name in response.json()["error"], response.text


def test_nan_in_json_is_rejected(sqlite_world: World, runtime_client) -> None:
    response = runtime_client.post(
        f"{BASE}/tenants/initech/pipeline/sync/offsets",
        headers={**sqlite_world.headers("runtime"), "Content-Type": "application/json"},
        content=b'{"connector_name": "c", "offset_key": "k", "offset_value": {"x": NaN}}',
    )
    assert response.status_code == 422


def test_state_store_down_is_503_not_500(sqlite_world: World) -> None:
    settings = sqlite_world.settings(state_dsn="postgresql://nobody@127.0.0.1:1/none?connect_timeout=1")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get(f"{BASE}/tenants/acme/cdc/offset-storage", headers=sqlite_world.headers("read_acme"))
        assert r.status_code == 503 and r.json()["code"] == "unavailable"
        health = client.get(f"{BASE}/health", headers=sqlite_world.headers("read_acme"))
        assert health.status_code == 503
        components = health.json()["components"]
        assert components["state_store"]["ok"] is False and components["dagster_storage"]["ok"] is True
        # monitoring of runs still works without the state store
        assert (
            client.get(f"{BASE}/tenants/acme/pipelines", headers=sqlite_world.headers("read_acme")).status_code == 200
        )
