"""Pipelines, runs and stats over real Dagster storage (SQLite and PostgreSQL), checked against
numbers recomputed here from the run records themselves."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from api_fixtures import BASE, World
from dagster import DagsterRunStatus

ACME_PIPELINES = {
    "catalog": "nilus:v1:catalog:acme",
    "never": "nilus:v1:never:acme",
    "orders": "rid-orders",
    "stream": "nilus:v1:stream:acme",
}
DECLARED_USER = {"orders": "alice", "stream": "bob"}


def _ts(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value).astimezone().isoformat()


def _same_instant(api_value: str | None, epoch: float | None) -> bool:
    if api_value is None or epoch is None:
        return api_value is None and epoch is None
    return abs(datetime.fromisoformat(api_value).timestamp() - epoch) < 1e-3


def _check_run(run: dict, record) -> None:
    dr = record.dagster_run
    finished = dr.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
    assert run["run_id"] == dr.run_id
    assert run["status"] == dr.status.value
    assert run["is_success"] is (dr.status is DagsterRunStatus.SUCCESS)
    assert run["job_name"] == dr.job_name
    assert run["run_as_user"] == dr.tags.get("nilus/run_as_user")
    assert run["dagster_url"] == f"http://dagster.test/runs/{dr.run_id}"
    assert _same_instant(run["started_at"], record.start_time)
    assert _same_instant(run["ended_at"], record.end_time if finished else None)
    if finished and record.start_time is not None:
        assert run["duration_sec"] == pytest.approx(record.end_time - record.start_time, abs=1e-3)
    else:
        assert run["duration_sec"] is None


def test_pipelines_lists_every_declared_pipeline_with_its_latest_run(world: World, client) -> None:
    body = client.get(f"{BASE}/tenants/acme/pipelines", headers=world.headers("read_acme")).json()
    assert set(body) == {"pipelines", "limit", "offset", "total"}
    assert (body["limit"], body["offset"], body["total"]) == (50, 0, 4)
    rows = {row["pipeline_name"]: row for row in body["pipelines"]}
    assert list(rows) == sorted(ACME_PIPELINES)
    for name, rid in ACME_PIPELINES.items():
        row = rows[name]
        assert row["resource_id"] == rid and row["tenant"] == "acme" and row["job_name"] == f"acme__{name}"
        records = world.records("acme", rid)
        if records:
            _check_run(row["latest_run"], records[0])
        else:
            assert row["latest_run"] is None  # declared, never ran: listed anyway
    assert rows["never"]["latest_run"] is None
    # a "Materialize" run (Dagster's asset job) is a run of the pipeline, as in the runs list and stats
    assert rows["catalog"]["latest_run"]["run_id"] == world.run_ids["acme/catalog/materialize"][0]
    assert rows["catalog"]["latest_run"]["job_name"] == "__ASSET_JOB"
    assert rows["catalog"]["latest_run"]["is_success"] is False
    assert rows["orders"]["latest_run"]["run_id"] == world.run_ids["acme/orders"][0]
    assert rows["orders"]["latest_run"]["duration_sec"] == 10.0
    assert rows["stream"]["latest_run"]["status"] == "STARTED"
    assert rows["stream"]["state"] == "active" and rows["stream"]["type"] == "cdc"
    assert rows["orders"]["labels"] == {"team": "sales"}


def _expected_names(world: World, params: dict) -> list[str]:
    """The filter semantics, recomputed from the declarations and the run records."""
    names = []
    for name, rid in sorted(ACME_PIPELINES.items()):
        if "resource_id" in params and params["resource_id"] != rid:
            continue
        if "run_as_user" in params and DECLARED_USER.get(name) != params["run_as_user"]:
            continue
        records = world.records("acme", rid)
        latest = records[0] if records else None
        run_filters = {"is_success", "started_at", "started_at_gte", "started_at_lte"} & set(params)
        if run_filters:
            if latest is None:
                continue
            if "is_success" in params and (latest.dagster_run.status is DagsterRunStatus.SUCCESS) != (
                params["is_success"] == "true"
            ):
                continue
            start = latest.start_time
            if run_filters - {"is_success"} and start is None:
                continue
            if "started_at_gte" in params and start < datetime.fromisoformat(params["started_at_gte"]).timestamp():
                continue
            if "started_at_lte" in params and start > datetime.fromisoformat(params["started_at_lte"]).timestamp():
                continue
            if "started_at" in params:
                value = params["started_at"]
                if len(value) == 10:
                    lo = datetime.fromisoformat(value + "T00:00:00+00:00").timestamp()
                    hi = lo + 86400
                else:
                    lo = int(datetime.fromisoformat(value).timestamp())
                    hi = lo + 1
                if not lo <= start < hi:
                    continue
        names.append(name)
    return names


def _filter_cases(world: World) -> list[dict]:
    stream_start = world.records("acme", "nilus:v1:stream:acme")[0].start_time
    orders_start = world.records("acme", "rid-orders")[0].start_time
    iso = lambda t: datetime.fromtimestamp(t).astimezone().isoformat()  # noqa: E731
    day = datetime.fromtimestamp(orders_start).astimezone().date()
    return [
        {"resource_id": "rid-orders"},
        {"resource_id": "nilus:v1:never:acme"},
        {"resource_id": "nope"},
        {"run_as_user": "alice"},
        {"run_as_user": "bob"},
        {"run_as_user": "carol"},
        {"is_success": "true"},
        {"is_success": "false"},
        {"started_at_gte": iso(stream_start - 1)},
        {"started_at_lte": iso(stream_start + 1)},
        {"started_at_gte": iso(stream_start - 1), "started_at_lte": iso(orders_start + 1)},
        {"started_at": day.isoformat()},
        {"started_at": iso(int(stream_start))},
        {"started_at": (day - timedelta(days=400)).isoformat()},
        {"is_success": "true", "run_as_user": "alice", "started_at_gte": iso(orders_start - 60)},
    ]


def test_pipeline_filters(world: World, client) -> None:
    for params in _filter_cases(world):
        body = client.get(f"{BASE}/tenants/acme/pipelines", params=params, headers=world.headers("read_acme")).json()
        expected = _expected_names(world, params)
        assert [row["pipeline_name"] for row in body["pipelines"]] == expected, params
        assert body["total"] == len(expected), params


def test_pipelines_pagination_edges(world: World, client) -> None:
    seen = []
    for offset in range(5):
        body = client.get(
            f"{BASE}/tenants/acme/pipelines", params={"limit": 1, "offset": offset}, headers=world.headers("read_acme")
        ).json()
        assert body["total"] == 4 and body["limit"] == 1 and body["offset"] == offset
        seen += [row["pipeline_name"] for row in body["pipelines"]]
    assert seen == sorted(ACME_PIPELINES)
    body = client.get(
        f"{BASE}/tenants/acme/pipelines",
        params={"limit": 3, "offset": 2, "is_success": "true"},
        headers=world.headers("read_acme"),
    ).json()
    assert body["pipelines"] == [] and body["total"] == len(_expected_names(world, {"is_success": "true"})) == 1
    assert (
        client.get(
            f"{BASE}/tenants/acme/pipelines", params={"limit": 500}, headers=world.headers("read_acme")
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
        ({"limit": "x"}, "limit"),
        ({"started_at_gte": "yesterday"}, "started_at_gte"),
        ({"started_at": "2024-13-01"}, "started_at"),
        ({"is_success": "maybe"}, "is_success"),
        ({"dataos_resource_id": "x"}, "dataos_resource_id"),
    ],
)
def test_bad_parameters_are_named(sqlite_world: World, sqlite_client, params: dict, name: str) -> None:
    response = sqlite_client.get(
        f"{BASE}/tenants/acme/pipelines", params=params, headers=sqlite_world.headers("read_acme")
    )
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "code"} and body["code"] == "invalid_parameter"
    assert name in body["error"]


def _all_runs(client, world: World, tenant: str, rid: str, who: str, page: int, **params) -> tuple[list, int]:
    runs, offset, total = [], 0, None
    while True:
        body = client.get(
            f"{BASE}/tenants/{tenant}/pipelines/{rid}/runs",
            params={"limit": page, "offset": offset, **params},
            headers=world.headers(who),
        ).json()
        assert set(body) == {"resource_id", "runs", "limit", "offset", "total"}
        total = body["total"] if total is None else total
        assert body["total"] == total and len(body["runs"]) <= page
        runs += body["runs"]
        if not body["runs"]:
            return runs, total
        offset += page


def test_runs_paginate_through_every_run_newest_first(world: World, client) -> None:
    records = world.records("acme", "rid-orders")
    runs, total = _all_runs(client, world, "acme", "rid-orders", "read_acme", page=7)
    assert total == len(records) == 40
    assert [r["run_id"] for r in runs] == [r.dagster_run.run_id for r in records]
    for run, record in zip(runs, records, strict=True):
        _check_run(run, record)
    # the same resource_id in another tenant is another pipeline: never mixed in
    globex, globex_total = _all_runs(client, world, "globex", "rid-orders", "read_globex", page=10)
    assert globex_total == 25 and {r["status"] for r in globex} == {"FAILURE"}
    assert not {r["run_id"] for r in globex} & {r["run_id"] for r in runs}


def test_runs_filters_and_edges(world: World, client) -> None:
    records = world.records("acme", "rid-orders")
    h = world.headers("read_acme")
    url = f"{BASE}/tenants/acme/pipelines/rid-orders/runs"
    success = [r.dagster_run.run_id for r in records if r.dagster_run.status is DagsterRunStatus.SUCCESS]
    ok, total = _all_runs(client, world, "acme", "rid-orders", "read_acme", page=50, is_success="true")
    assert [r["run_id"] for r in ok] == success and total == len(success)
    _, total = _all_runs(client, world, "acme", "rid-orders", "read_acme", page=50, is_success="false")
    assert total == 40 - len(success)
    bob = [r.dagster_run.run_id for r in records if r.dagster_run.tags.get("nilus/run_as_user") == "bob"]
    by_bob, _ = _all_runs(client, world, "acme", "rid-orders", "read_acme", page=3, run_as_user="bob")
    assert [r["run_id"] for r in by_bob] == bob
    body = client.get(url, params={"offset": 40}, headers=h).json()
    assert body["runs"] == [] and body["total"] == 40
    body = client.get(url, params={"offset": 39, "limit": 500}, headers=h).json()
    assert [r["run_id"] for r in body["runs"]] == [records[-1].dagster_run.run_id]
    body = client.get(f"{BASE}/tenants/acme/pipelines/nilus:v1:never:acme/runs", headers=h).json()
    assert body["total"] == 0  # declared, never ran: an empty list
    body = client.get(url, params={"is_success": "true", "run_as_user": "carol"}, headers=h).json()
    assert body["total"] == 0  # a known pipeline, no run matches


@pytest.mark.parametrize("endpoint", ["runs", "stats"])
def test_a_resource_id_the_tenant_does_not_have_is_404(world: World, client, endpoint: str) -> None:
    h = world.headers("read_acme")
    # unknown everywhere; globex's pipeline (declared and run, but not acme's)
    for rid in ("unknown-rid", "nilus:v1:events:globex"):
        response = client.get(f"{BASE}/tenants/acme/pipelines/{rid}/{endpoint}", headers=h)
        assert response.status_code == 404, response.text
        assert response.json() == {"error": "the tenant has no pipeline with this resource_id", "code": "not_found"}
    # declared but never ran, and none of its runs selected: answers, with zeros
    nothing_selected = {"period": "1h"} if endpoint == "stats" else {"is_success": "true"}
    for rid, params in (("nilus:v1:never:acme", {}), ("nilus:v1:stream:acme", nothing_selected)):
        response = client.get(f"{BASE}/tenants/acme/pipelines/{rid}/{endpoint}", params=params, headers=h)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["stats"]["total_runs"] if endpoint == "stats" else body["total"]) == 0
    # the admin token reads globex's pipeline under globex, not under acme
    admin = world.headers("admin")
    # GraphQL: the same answer, as an error with its code
    query = "{ " + endpoint + '(tenant: "acme", resourceId: "nilus:v1:events:globex") { resourceId } }'
    errors = client.post("/nilus-manager/graphql", json={"query": query}, headers=h).json()["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["not_found"]
    events = "pipelines/nilus:v1:events:globex"
    assert client.get(f"{BASE}/tenants/globex/{events}/{endpoint}", headers=admin).status_code == 200
    assert client.get(f"{BASE}/tenants/acme/{events}/{endpoint}", headers=admin).status_code == 404


def _expected_stats(world: World, tenant: str, rid: str, period_start: str) -> dict:
    start = datetime.fromisoformat(period_start)
    in_period = [r for r in world.records(tenant, rid) if r.create_timestamp > start]
    ok = [r for r in in_period if r.dagster_run.status is DagsterRunStatus.SUCCESS]
    bad = [r for r in in_period if r.dagster_run.status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)]
    durations = [r.end_time - r.start_time for r in ok + bad if r.start_time and r.end_time]
    finished = len(ok) + len(bad)
    return {
        "total_runs": len(in_period),
        "successful_runs": len(ok),
        "failed_runs": len(bad),
        "success_rate": round(100 * len(ok) / finished, 2) if finished else 0.0,
        "avg_duration_sec": round(sum(durations) / len(durations), 3) if durations else None,
        "max_duration_sec": round(max(durations), 3) if durations else None,
    }


@pytest.mark.parametrize("period", ["24h", "48h", "7d", "30d", "365d"])
def test_stats_match_an_independent_recount(world: World, client, period: str) -> None:
    for tenant, rid in [
        ("acme", "rid-orders"),
        ("globex", "rid-orders"),
        ("acme", "nilus:v1:catalog:acme"),
        ("acme", "nilus:v1:stream:acme"),
        ("acme", "nilus:v1:never:acme"),
    ]:
        who = f"read_{tenant}"
        body = client.get(
            f"{BASE}/tenants/{tenant}/pipelines/{rid}/stats", params={"period": period}, headers=world.headers(who)
        ).json()
        assert set(body) == {"resource_id", "period", "period_start", "period_end", "stats"}
        assert body["resource_id"] == rid and body["period"] == period
        start, end = (datetime.fromisoformat(body[k]) for k in ("period_start", "period_end"))
        assert end - start == (
            timedelta(hours=int(period[:-1])) if period.endswith("h") else timedelta(days=int(period[:-1]))
        )
        expected = _expected_stats(world, tenant, rid, body["period_start"])
        assert body["stats"] == pytest.approx(expected), (tenant, rid, period)
    body = client.get(
        f"{BASE}/tenants/acme/pipelines/rid-orders/stats", params={"period": "30d"}, headers=world.headers("read_acme")
    ).json()
    assert body["stats"]["total_runs"] >= 30 and body["stats"]["failed_runs"] > 0  # the data is non-trivial


@pytest.mark.parametrize("period", ["1y", "0d", "24", "366d", "d7", "7 d", ""])
def test_bad_periods_are_rejected(sqlite_world: World, sqlite_client, period: str) -> None:
    response = sqlite_client.get(
        f"{BASE}/tenants/acme/pipelines/rid-orders/stats",
        params={"period": period},
        headers=sqlite_world.headers("read_acme"),
    )
    assert response.status_code == 422 and "period" in response.json()["error"]


def test_no_other_tenant_data_through_any_filter(world: World, client) -> None:
    """acme's answers never contain anything of globex (whose data all mention 'globex')."""
    h = world.headers("read_acme")
    urls = [
        f"{BASE}/tenants/acme/pipelines",
        f"{BASE}/tenants/acme/pipelines/rid-orders/runs",
        f"{BASE}/tenants/acme/pipelines/rid-orders/stats",
        f"{BASE}/tenants/acme/cdc/offset-storage",
        f"{BASE}/tenants/acme/cdc/schema-history",
    ]
    params_list = [
        {},
        {"resource_id": "rid-orders"},
        {"run_as_user": "alice"},
        {"is_success": "false"},
        {"connector_name": "pg-shared"},
        {"resource_id": "nilus:v1:events:globex"},
        {"period": "365d"},
        {"limit": 500},
    ]
    for url in urls:
        for params in params_list:
            response = client.get(url, params=params, headers=h)
            if response.status_code == 422:  # a filter this endpoint does not take
                continue
            assert response.status_code == 200, (url, params, response.text)
            text = response.text.replace("nilus:v1:events:globex", "")  # the caller's own input, echoed
            assert "globex" not in text, (url, params)
            assert "999.0" not in text  # globex's durations
    body = client.get(f"{BASE}/tenants/acme/pipelines/rid-orders/stats", params={"period": "365d"}, headers=h).json()
    assert body["stats"]["total_runs"] == 40
    for who in ("read_acme",):
        response = client.get(f"{BASE}/tenants/globex/pipelines", headers=world.headers(who))
        assert response.status_code == 403 and "globex" not in response.text.replace("/tenants/globex", "")
