"""`RunReader`'s one-statement reads (latest runs of a page of pipelines, a runs page with its
total, counts) against Dagster's own public API on the same storage (SQLite and PostgreSQL), and
the wider run-storage pool of the API process."""

from __future__ import annotations

import pytest
from api_fixtures import World
from dagster import RunsFilter

from nilus_dagster.api import runs as runs_module
from nilus_dagster.api.runs import NOT_SUCCESS, SUCCESS, RunReader, pipeline_filter
from nilus_dagster.api.services import RUN_STORAGE_POOL_SIZE, open_instance

# (tenant, resource_id, job name): declared pipelines, a job whose runs carry another tenant's
# tags (the job read finds nothing: tag-query fallback), no job name, unknown job and pipeline.
PIPELINES = [
    ("acme", "rid-orders", "acme__orders"),
    ("acme", "nilus:v1:catalog:acme", "acme__catalog"),
    ("acme", "nilus:v1:stream:acme", "acme__stream"),
    ("acme", "nilus:v1:never:acme", "acme__never"),
    ("globex", "rid-orders", "globex__orders"),
    ("globex", "nilus:v1:events:globex", "globex__events"),
    ("acme", "rid-orders", "globex__orders"),
    ("globex", "rid-orders", None),
    ("acme", "unknown-rid", "acme__unknown"),
]


def _slow_latest(world: World, tenant: str, resource_id: str):
    records = world.instance.get_run_records(pipeline_filter(tenant, resource_id), limit=1)
    return records[0] if records else None


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        a.storage_id == b.storage_id
        and a.dagster_run == b.dagster_run
        and (a.create_timestamp, a.update_timestamp, a.start_time, a.end_time)
        == (b.create_timestamp, b.update_timestamp, b.start_time, b.end_time)
    )


@pytest.mark.parametrize(("jobs_per_query", "scan"), [(50, 5000), (1, 5000), (2, 5000), (50, 0)])
def test_latest_many_matches_the_tag_query(world: World, monkeypatch, jobs_per_query: int, scan: int) -> None:
    """Also with a newer "Materialize" run (acme/catalog), found by the scan above the job's latest
    run or (`scan` 0: the range is too long to walk) by the tag join above it."""
    monkeypatch.setattr(runs_module, "LATEST_JOBS_PER_QUERY", jobs_per_query)
    monkeypatch.setattr(runs_module, "ABOVE_BOUND_SCAN", scan)
    reader = RunReader(world.instance)
    found = reader.latest_many(PIPELINES)
    assert len(found) == len(PIPELINES)
    for (tenant, resource_id, _), record in zip(PIPELINES, found, strict=True):
        assert _same(record, _slow_latest(world, tenant, resource_id)), (tenant, resource_id)
    assert found[0] is not None and found[0].dagster_run.run_id == world.run_ids["acme/orders"][0]
    assert found[3] is None and found[-1] is None
    assert found[6].dagster_run.tags["nilus/tenant"] == "acme"  # fallback: acme's run, not globex's
    assert found[1].dagster_run.run_id == world.run_ids["acme/catalog/materialize"][0]
    assert reader.latest_many([]) == []
    assert _same(reader.latest("acme", "rid-orders", "acme__orders"), found[0])


@pytest.mark.parametrize("statuses, run_as_user", [(None, None), ([SUCCESS], None), (NOT_SUCCESS, None), (None, "bob")])
def test_page_and_total_match_the_public_api(world: World, statuses, run_as_user) -> None:
    reader = RunReader(world.instance)
    filters = pipeline_filter("acme", "rid-orders", statuses=statuses, run_as_user=run_as_user)
    expected = list(world.instance.get_run_records(filters))
    total = world.instance.get_runs_count(filters)
    assert total == len(expected) and reader.count(filters) == total
    for limit, offset in [(50, 0), (7, 0), (7, 5), (3, total - 1), (10, total), (10, total + 20)]:
        page, page_total = reader.page_and_total(filters, limit, offset)
        assert page_total == total, (limit, offset)
        want = expected[offset : offset + limit]
        assert [r.dagster_run.run_id for r in page] == [r.dagster_run.run_id for r in want]
        assert all(_same(a, b) for a, b in zip(page, want, strict=True))
        assert [r.dagster_run.run_id for r in reader.page(filters, limit, offset)] == [
            r.dagster_run.run_id for r in want
        ]


def test_counts_of_nothing(world: World) -> None:
    reader = RunReader(world.instance)
    nothing = pipeline_filter("acme", "unknown-rid")
    assert reader.count(nothing) == 0
    assert reader.page_and_total(nothing, 10, 0) == ([], 0)
    assert reader.page_and_total(nothing, 10, 5) == ([], 0)
    assert reader.count(RunsFilter(tags={"nilus/tenant": "acme"})) == world.instance.get_runs_count(
        RunsFilter(tags={"nilus/tenant": "acme"})
    )


def test_api_instance_keeps_a_wider_pool_with_the_statement_timeout(world: World) -> None:
    instance = open_instance(world.settings())
    try:
        storage = instance.run_storage
        if world.backend == "postgres":
            assert storage._engine.pool.size() == RUN_STORAGE_POOL_SIZE
            with storage.connect() as conn:
                assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "15s"
        assert RunReader(instance).count(pipeline_filter("acme", "rid-orders")) == 40
    finally:
        instance.dispose()
