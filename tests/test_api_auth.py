"""The auth matrix on every route (REST and GraphQL), token loading, docs left open."""

from __future__ import annotations

import hashlib
import json

import pytest
from api_fixtures import BASE, DEFS_YAML, World
from fastapi.testclient import TestClient

from nilus_dagster.api.app import create_app
from nilus_dagster.api.auth import TokenConfigError, TokenRegistry, main

BODIES = {
    "/pipeline/runs": {"pipeline_name": "stream", "run_id": "r1", "payload": {"rows": 1}},
    "/state": {"state": "active"},
    "/offsets": {"connector_name": "c", "offset_key": "k", "offset_value": {"lsn": "0/1"}},
    "/schema-history": {"connector_name": "c", "table_name": "t", "table_schema": {}},
    "/dlq/ack": {"up_to_id": 1},
    "/dlq/purge": {},
    "/dlq/replay": {"pipeline": "stream"},
    "/resync": {"tables": ["acme.none"]},  # refused (422 unknown_tables) once the token passed
}
# Operator routes: reads need `read`, writes `operate` (role editor), reset `admin`; /validate any valid token.
OPERATOR_SCOPES = {"GET": "read", "PUT": "operate", "POST": "operate"}
# What the right token gets on an operator route that refuses what the matrix asks (it changes nothing).
OPERATOR_REFUSALS = {
    "/schema/approve": (409,),  # no schema change waits
    "/resync": (422,),  # not a table of the pipeline
    "/reset": (409,),  # the world's run of the pipeline is live
    "/drift": (200, 503),  # 503 when the API cannot read the source
}


def _routes(client: TestClient) -> list[tuple[str, str, str | None]]:
    """(method, path template, required scope) of every documented route."""
    spec = client.get("/nilus-manager/openapi.json").json()
    routes = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            tag = op["tags"][0]
            if tag == "operator":
                scope = None if path.endswith("/validate") else "admin" if path.endswith("/reset") else (
                    OPERATOR_SCOPES[method.upper()]
                )
            elif tag == "cdc" and method == "post":  # retry a failed table: an operator action
                scope = "operate"
            elif tag == "dead-letter queue":  # reads with `read`, ack/replay with `operate`, purge with `admin`
                scope = "read" if method == "get" else "admin" if path.endswith("/purge") else "operate"
            else:
                scope = {"system": None, "monitoring": "read", "cdc": "read"}.get(tag, "runtime")
            routes.append((method.upper(), path, scope))
    return routes


def _call(client: TestClient, method: str, template: str, tenant: str, headers: dict):
    cdc_only = ("/state", "/checkpoints", "/progress", "/metrics", "/schema/proposed", "/drift", *OPERATOR_REFUSALS)
    resource_id = "nilus:v1:stream:acme" if template.endswith(cdc_only) else "rid-orders"
    # (a retry of a table that is not failed: 404 once the token passed, the matrix changes nothing)
    path = template.format(tenant=tenant, resource_id=resource_id, pipeline_name="stream", table="acme.none",
                           replay_id=1)
    if path.endswith("/validate"):
        return client.post(path, headers={**headers, "Content-Type": "application/yaml"}, content=DEFS_YAML)
    if method == "PUT":  # a lifecycle change the running pipeline refuses (409): the matrix changes nothing
        return client.put(path, headers=headers, json={"state": "resume"})
    body = next((b for suffix, b in BODIES.items() if path.endswith(suffix)), None)
    return client.request(method, path, headers=headers, json=body if method == "POST" else None)


def _error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": response.json()["error"], "code": code}


def test_every_route_is_documented_and_covered(sqlite_client) -> None:
    routes = _routes(sqlite_client)
    assert len(routes) == 36
    assert {scope for *_, scope in routes} == {None, "read", "operate", "runtime", "admin"}


@pytest.fixture
def matrix_client(sqlite_world: World, state_dsn: str):
    """Runtime writes of the matrix go to a fresh state store, not the shared world's."""
    with TestClient(create_app(sqlite_world.settings(state_dsn=state_dsn))) as client:
        yield client


def test_auth_matrix_on_every_route(sqlite_world: World, matrix_client) -> None:
    sqlite_client = matrix_client
    for method, template, scope in _routes(sqlite_client):
        where = (method, template)
        _error(_call(sqlite_client, method, template, "acme", {}), 401, "unauthorized")
        for bad in ("Bearer nope", "Bearer ", "Basic dG9rLWFkbWlu", "tok-read-acme", "Bearer tok-read-acme2"):
            _error(_call(sqlite_client, method, template, "acme", {"Authorization": bad}), 401, "unauthorized")
        if scope is None:  # /health, /info, /validate: any valid token
            for who in ("read_acme", "runtime", "admin", "editor_acme"):
                assert _call(sqlite_client, method, template, "acme", sqlite_world.headers(who)).status_code in (
                    200,
                    503,
                ), where
            continue
        right = {"read": "read_acme", "operate": "editor_acme", "admin": "admin"}.get(scope, "runtime")
        wrongs = {
            "read": ["runtime"],
            "operate": ["read_acme", "runtime"],
            "admin": ["read_acme", "runtime", "editor_acme"],
        }.get(scope, ["read_acme", "editor_acme"])
        allowed = (200, 201, 409) if method == "PUT" else (200, 201)  # the PUT asks a refused transition
        if template.endswith(("/retry", "/dlq/replay", "/replays/{replay_id}")):  # nothing to retry or replay
            allowed = (404,)
        allowed = next((codes for suffix, codes in OPERATOR_REFUSALS.items() if template.endswith(suffix)), allowed)
        ok = _call(sqlite_client, method, template, "acme", sqlite_world.headers(right))
        assert ok.status_code in allowed, (where, ok.text)
        assert _call(sqlite_client, method, template, "acme", sqlite_world.headers("admin")).status_code in allowed
        if scope == "read":  # an editor reads too
            editor = _call(sqlite_client, method, template, "acme", sqlite_world.headers("editor_acme"))
            assert editor.status_code in allowed, (where, editor.text)
        for wrong in wrongs:
            _error(_call(sqlite_client, method, template, "acme", sqlite_world.headers(wrong)), 403, "forbidden")
        if scope == "admin":  # an admin token may act on every tenant
            continue
        other = "globex"
        denied = _call(sqlite_client, method, template, other, sqlite_world.headers(right))
        _error(denied, 403, "forbidden")
        assert "rid-orders" not in denied.text and "alice" not in denied.text


def test_graphql_uses_the_same_tokens_and_scoping(sqlite_world: World, sqlite_client) -> None:
    url = "/nilus-manager/graphql"
    queries = {
        "pipelines": '{ pipelines(tenant: "%s") { total pipelines { pipelineName latestRun { runId } } } }',
        "runs": '{ runs(tenant: "%s", resourceId: "rid-orders") { total runs { runId status } } }',
        "stats": '{ stats(tenant: "%s", resourceId: "rid-orders", period: "7d") { stats { totalRuns } } }',
        "offsetStorage": '{ offsetStorage(tenant: "%s") { total offsets { offsetKey } } }',
        "schemaHistory": '{ schemaHistory(tenant: "%s") { total schemaHistory { tableName } } }',
    }
    for field, query in queries.items():
        for headers in ({}, {"Authorization": "Bearer nope"}):
            _error(sqlite_client.post(url, json={"query": query % "acme"}, headers=headers), 401, "unauthorized")
        ok = sqlite_client.post(url, json={"query": query % "acme"}, headers=sqlite_world.headers("read_acme")).json()
        assert "errors" not in ok and ok["data"][field] is not None, ok
        assert "globex" not in json.dumps(ok)
        for who, tenant in (("read_acme", "globex"), ("runtime", "acme")):
            denied = sqlite_client.post(url, json={"query": query % tenant}, headers=sqlite_world.headers(who)).json()
            assert denied["data"] is None and denied["errors"][0]["extensions"]["code"] == "forbidden"
        admin = sqlite_client.post(url, json={"query": query % "globex"}, headers=sqlite_world.headers("admin"))
        assert "errors" not in admin.json()
    bad = sqlite_client.post(
        url,
        json={"query": '{ runs(tenant: "acme", resourceId: "x", limit: 501) { total } }'},
        headers=sqlite_world.headers("read_acme"),
    ).json()
    assert bad["errors"][0]["extensions"]["code"] == "invalid_parameter" and "limit" in bad["errors"][0]["message"]


def test_rest_and_graphql_agree(world: World, client) -> None:
    rest = client.get(
        f"{BASE}/tenants/acme/pipelines/rid-orders/runs", params={"limit": 5}, headers=world.headers("read_acme")
    ).json()
    gql = client.post(
        "/nilus-manager/graphql",
        headers=world.headers("read_acme"),
        json={
            "query": '{ runs(tenant: "acme", resourceId: "rid-orders", limit: 5) { total runs { runId durationSec } } }'
        },
    ).json()["data"]["runs"]
    assert gql["total"] == rest["total"]
    assert [(r["runId"], r["durationSec"]) for r in gql["runs"]] == [
        (r["run_id"], r["duration_sec"]) for r in rest["runs"]
    ]


def test_docs_are_open(sqlite_client) -> None:
    for path in ("/nilus-manager/docs", "/nilus-manager/redoc", "/nilus-manager/openapi.json"):
        assert sqlite_client.get(path).status_code == 200
    spec = sqlite_client.get("/nilus-manager/openapi.json").json()
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert _error(sqlite_client.get("/nilus-manager/nothing"), 404, "not_found") is None


def test_token_sources(tmp_path) -> None:
    digest = hashlib.sha256(b"s3cret").hexdigest()
    path = tmp_path / "tokens.yaml"
    path.write_text(f"- {{name: ci, sha256: {digest}, tenants: [acme, globex], scope: read}}\n")
    registry = TokenRegistry.load(path, "dev:initech:runtime;root::admin")
    assert len(registry) == 3
    ci = registry.authenticate("s3cret")
    assert ci and ci.name == "ci" and ci.tenants == {"acme", "globex"} and ci.may("read", "globex")
    assert not ci.may("runtime", "acme") and not ci.may("read", "initech")
    assert registry.authenticate("dev").may("runtime", "initech")
    assert registry.authenticate("root").may("runtime", "anything")
    assert registry.authenticate("S3cret") is None and registry.authenticate("") is None
    assert "s3cret" not in path.read_text()
    for bad in (
        "[{sha256: abc, tenants: [a], scope: read}]",
        f"[{{sha256: {digest}, tenants: [a], scope: god}}]",
        f"[{{sha256: {digest}, scope: read}}]",
        "{nope: 1}",
    ):
        path.write_text(bad)
        with pytest.raises(TokenConfigError):
            TokenRegistry.load(path)
    for bad_env in ("justatoken", "t:acme:superuser", "t::read"):
        with pytest.raises(TokenConfigError):
            TokenRegistry.load(None, bad_env)


def test_hash_cli(capsys) -> None:
    assert main(["hash", "s3cret"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"s3cret").hexdigest()
    assert main(["new"]) == 0 and "sha256:" in capsys.readouterr().out
    assert main([]) == 2


def test_no_tokens_means_401_everywhere(sqlite_world: World) -> None:
    settings = sqlite_world.settings(tokens_file=None, tokens_env=None)
    with TestClient(create_app(settings)) as client:
        _error(client.get(f"{BASE}/info", headers=sqlite_world.headers("admin")), 401, "unauthorized")
