"""The API's view of failed CDC tables (held while the others stream) and their retry."""

from __future__ import annotations

from api_fixtures import BASE, World
from fastapi.testclient import TestClient

FAILURES = f"{BASE}/tenants/acme/cdc/table-failures"
RETRY = f"{BASE}/tenants/acme/cdc/pipelines/stream/tables/acme.addresses/retry"


def test_failed_tables_are_listed_with_reason_and_checkpoint_for_their_tenant_only(
    client: TestClient, world: World
) -> None:
    body = client.get(FAILURES, headers=world.headers("read_acme")).json()
    assert body["total"] == 1
    failure = body["failures"][0]
    assert (failure["pipeline_name"], failure["table_name"], failure["checkpoint"]) == ("stream", "acme.addresses", "0/3")
    assert "permission denied" in failure["reason"] and failure["status"] in ("failed", "retry")
    assert client.get(FAILURES, params={"pipeline": "orders"}, headers=world.headers("read_acme")).json()["total"] == 0
    assert client.get(FAILURES, headers=world.headers("read_globex")).status_code == 403
    other = client.get(f"{BASE}/tenants/globex/cdc/table-failures", headers=world.headers("read_globex")).json()
    assert other == {"failures": [], "total": 0}


def test_a_retry_needs_a_write_scope_and_a_failed_table(client: TestClient, world: World) -> None:
    refused = client.post(RETRY, headers=world.headers("read_acme"))
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    assert client.post(RETRY, headers=world.headers("runtime")).status_code == 403  # an operator action
    accepted = client.post(RETRY, headers=world.headers("editor_acme"))
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"pipeline_name": "stream", "table_name": "acme.addresses", "status": "retry"}
    listed = client.get(FAILURES, headers=world.headers("admin")).json()["failures"]
    assert [f["status"] for f in listed] == ["retry"]
    missing = client.post(f"{BASE}/tenants/acme/cdc/pipelines/stream/tables/acme.customers/retry",
                          headers=world.headers("admin"))
    assert missing.status_code == 404
    assert missing.json() == {"error": "table acme.customers of pipeline stream is not failed", "code": "not_found"}
    bad = client.post(f"{BASE}/tenants/acme/cdc/pipelines/stream/tables/no_schema/retry", headers=world.headers("admin"))
    assert bad.status_code == 422 and bad.json()["code"]

