"""The dead-letter queue API (peek, count, ack, purge), its scopes and tenant isolation, and the
`nilus_dlq_*` metrics, over a real state store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_fixtures import BASE, World
from fastapi.testclient import TestClient
from test_api_server import _sample

from nilus_dagster.api.app import create_app
from nilus_dagster.api.metrics import create_metrics_app
from nilus_dagster.state.dead_letters import NewDeadLetter
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore


def entry(table: str, lsn: int, key: str, kind: str = "not_finite") -> NewDeadLetter:
    return NewDeadLetter(table, lsn, f"h{key}", [key], {"id": key, "amount": "NaN"}, "I", kind, "amount",
                         f"column '{table}.amount': value 'NaN' does not fit decimal(38,9)")


@pytest.fixture
def app(sqlite_world: World, state_dsn: str):  # noqa: ANN201
    with StateStore(state_dsn).open() as store:
        acme = PipelineKey("acme", "stream", "nilus:v1:stream:acme")
        assert store.record_dead_letters(acme, [entry("acme.a", 16, "1"), entry("acme.a", 32, "2"),
                                                entry("acme.b", 32, "1", "date_out_of_range")], "run-1") == 3
        assert store.record_dead_letters(acme, [entry("acme.a", 16, "1")], "run-2") == 0  # a replay: nothing new
        store.record_dead_letters(PipelineKey("globex", "events", "g"), [entry("globex.e", 8, "9")], "run-1")
    return create_app(sqlite_world.settings(state_dsn=state_dsn))


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # noqa: ANN001
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_peek_count_ack_purge(sqlite_world: World, client: TestClient) -> None:
    url, read, write = f"{BASE}/tenants/acme/dlq", sqlite_world.headers("read_acme"), sqlite_world.headers("editor_acme")
    admin = sqlite_world.headers("admin")
    page = client.get(url, headers=read).json()
    assert page["total"] == 3 and [e["key"] for e in page["entries"]] == [["1"], ["2"], ["1"]]  # oldest first
    first = page["entries"][0]
    assert first["table_name"] == "acme.a" and first["lsn"] == "0/10" and first["row"] == {"id": "1", "amount": "NaN"}
    assert first["pipeline_name"] == "stream" and first["op"] == "I" and first["run_id"] == "run-1"
    assert client.get(url, headers=read, params={"table": "acme.b"}).json()["total"] == 1
    assert client.get(url, headers=read, params={"error_kind": "not_finite", "limit": 1, "offset": 1}).json()[
        "entries"][0]["key"] == ["2"]
    assert client.get(f"{url}/count", headers=read).json() == {"count": 3}

    acked = client.post(f"{url}/ack", headers=write, json={"up_to_id": page["entries"][1]["id"], "table": "acme.a"})
    assert acked.status_code == 200 and acked.json() == {"count": 2}
    assert client.get(f"{url}/count", headers=read).json() == {"count": 1}
    assert client.get(url, headers=read, params={"include_acked": True}).json()["total"] == 3
    assert client.post(f"{url}/purge", headers=admin, json={"acked_only": True}).json() == {"count": 2}
    assert client.get(url, headers=read, params={"include_acked": True}).json()["total"] == 1
    assert client.post(f"{url}/purge", headers=admin, json={}).json() == {"count": 1}
    assert client.get(f"{url}/count", headers=read).json() == {"count": 0}
    assert client.get(f"{BASE}/tenants/globex/dlq/count", headers=sqlite_world.headers("read_globex")).json() == {
        "count": 1
    }  # another tenant's queue is untouched


def test_replay_request_and_its_status(sqlite_world: World, client: TestClient, state_dsn: str) -> None:
    """The request the CDC run carries out (tests/test_cdc_dlq_replay.py): recorded, then readable."""
    url, read, write = f"{BASE}/tenants/acme/dlq", sqlite_world.headers("read_acme"), sqlite_world.headers("editor_acme")
    ids = [e["id"] for e in client.get(url, headers=read).json()["entries"]]
    asked = client.post(f"{url}/replay", headers=write, json={"pipeline": "stream", "ids": ids[:2]})
    assert asked.status_code == 202, asked.text
    body = asked.json()
    assert body["entry_ids"] == ids[:2] and body["status"] == "pending" and body["pipeline_name"] == "stream"
    status = client.get(f"{url}/replays/{body['replay_id']}", headers=read)
    assert status.status_code == 200 and status.json()["status"] == "pending"
    with StateStore(state_dsn).open() as store:
        assert [r.id for r in store.pending_dlq_replays("acme", "stream")] == [body["replay_id"]]
    assert client.get(f"{BASE}/tenants/globex/dlq/replays/{body['replay_id']}",
                      headers=sqlite_world.headers("read_globex")).status_code == 404  # another tenant's
    for wrong in ({"pipeline": "orders"}, {"pipeline": "nope"}, {"pipeline": "stream", "table": "acme.other"},
                  {"pipeline": "stream", "ids": [10**9]}):
        answer = client.post(f"{url}/replay", headers=write, json=wrong)
        assert answer.status_code == 404 and answer.json()["code"] == "not_found", wrong
    assert client.post(f"{url}/replay", headers=read, json={"pipeline": "stream"}).status_code == 403


def test_scopes_tenants_and_bad_input(sqlite_world: World, client: TestClient) -> None:
    url = f"{BASE}/tenants/acme/dlq"
    assert client.get(url).status_code == 401
    other = client.get(url, headers=sqlite_world.headers("read_globex"))
    assert other.status_code == 403 and other.json()["code"] == "forbidden"
    read_write = client.post(f"{url}/ack", headers=sqlite_world.headers("read_acme"), json={"up_to_id": 99})
    assert read_write.status_code == 403 and "operate" in read_write.json()["error"]  # ack needs operate (editor)
    runtime = client.post(f"{url}/ack", headers=sqlite_world.headers("runtime"), json={"up_to_id": 99})
    assert runtime.status_code == 403
    editor_purge = client.post(f"{url}/purge", headers=sqlite_world.headers("editor_acme"), json={})
    assert editor_purge.status_code == 403 and "admin" in editor_purge.json()["error"]  # purge needs admin
    foreign = client.post(f"{BASE}/tenants/globex/dlq/ack", headers=sqlite_world.headers("editor_acme"), json={"up_to_id": 1})
    assert foreign.status_code == 403
    assert client.get(f"{BASE}/tenants/globex/dlq/count", headers=sqlite_world.headers("admin")).json() == {"count": 1}
    bad = client.post(f"{url}/ack", headers=sqlite_world.headers("editor_acme"), json={"up_to_id": 0})
    assert bad.status_code == 422 and set(bad.json()) == {"error", "code"}
    assert client.get(url, headers=sqlite_world.headers("read_acme"), params={"limit": 501}).status_code == 422
    assert client.get(f"{url}/count", headers=sqlite_world.headers("read_acme")).json() == {"count": 3}


def test_dlq_metrics(sqlite_world: World, app, client: TestClient) -> None:  # noqa: ANN001
    with TestClient(create_metrics_app(app.state.services, app.state.metrics_registry)) as metrics:
        text = metrics.get("/metrics").text
        assert _sample(text, "nilus_dlq_entries", tenant="acme", pipeline="stream", table="acme.a") == 2
        assert _sample(text, "nilus_dlq_entries", tenant="globex", pipeline="events", table="globex.e") == 1
        client.post(f"{BASE}/tenants/acme/dlq/ack", headers=sqlite_world.headers("editor_acme"), json={"up_to_id": 10**9})
        text = metrics.get("/metrics").text
        assert _sample(text, "nilus_dlq_entries", tenant="acme", pipeline="stream", table="acme.a") == 0
        assert _sample(text, "nilus_dlq_events_total", tenant="acme", pipeline="stream", table="acme.a") == 2
