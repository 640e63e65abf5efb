"""A batch pipeline as Dagster shows it: standard table metadata, the row-count check per table,
and per-table results (one failing table does not hide the others' materializations).

Real Dagster instance, real PostgreSQL source, DuckDB and PostgreSQL sinks.
"""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job

GOOD = dg.AssetKey(["acme", "shop", "public", "good"])
KEYLESS = dg.AssetKey(["acme", "shop", "public", "keyless"])


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.good (id int PRIMARY KEY, name text NOT NULL, score numeric(6,2))")
        conn.execute("INSERT INTO public.good SELECT g, 'n' || g, g / 4.0 FROM generate_series(1, 40) g")
        conn.execute("CREATE TABLE public.keyless (v int)")
        conn.execute("INSERT INTO public.keyless VALUES (1), (1)")
    return pipeline_env


def _check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = [
        e for e in result.get_asset_check_evaluations() if e.asset_key == GOOD and e.check_name == "row_count_parity"
    ]
    return evaluation


def test_table_metadata_row_count_check_and_per_table_failures(
    env: str, sql_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = project(sql_sink, pipeline("shop", ["public.good", "public.keyless"], strategy="merge"))
    first = run_job(defs, "acme__shop", instance)
    assert not first.success  # merge cannot match the keyless table's rows ...
    assert "public.keyless has no primary key" in failure_message(first)
    (materialization,) = first.asset_materializations_for_node("acme__shop__public__good")  # ... the other landed
    metadata = materialization.metadata
    assert metadata["dagster/row_count"].value == 40
    assert defs.resolve_assets_def(GOOD).metadata_by_key[GOOD]["dagster/table_name"].value == "analytics.good"
    columns = [(c.name, c.type, c.constraints.nullable) for c in metadata["dagster/column_schema"].value.columns]
    assert columns == [("id", "integer", False), ("name", "text", False), ("score", "numeric(6,2)", True)]
    check = _check(first)
    assert check.passed and check.metadata["source_rows"].value == check.metadata["sink_rows"].value == 40
    assert not [m for m in instance.get_latest_materialization_events([KEYLESS]).values() if m is not None]

    assert (metadata["rows_inserted"].value, metadata["rows_updated"].value) == (40, 0)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("DELETE FROM public.good WHERE id = 7")  # merge keeps it in the sink
        conn.execute("INSERT INTO public.good VALUES (41, 'new', 1), (42, 'new', 2)")
    second = run_job(defs, "acme__shop", instance)
    (materialization,) = second.asset_materializations_for_node("acme__shop__public__good")
    metadata = materialization.metadata
    assert (metadata["rows_inserted"].value, metadata["rows_updated"].value) == (2, 39)  # 41 read: 2 new
    assert metadata["dagster/row_count"].value == 42
    check = _check(second)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert (check.metadata["source_rows"].value, check.metadata["sink_rows"].value) == (41, 42)


def test_a_long_load_reports_its_progress(
    pipeline_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nilus_dagster.batch import loader

    monkeypatch.setattr(loader, "PROGRESS_INTERVAL_S", 0.0)  # report after every batch read
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.big (id int PRIMARY KEY, pad text)")
        conn.execute("INSERT INTO public.big SELECT g, repeat('p', 20) FROM generate_series(1, 300000) g")
        conn.execute("ANALYZE public.big")
    defs = project(duckdb_sink, pipeline("bulk", ["public.big"], strategy="replace"))
    result = run_job(defs, "acme__bulk", instance)
    assert result.success, failure_message(result)
    key = dg.AssetKey(["acme", "bulk", "public", "big"])
    observed = [
        e.asset_observation_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
        and e.asset_observation_data.asset_observation.asset_key == key
    ]
    rows = [m["rows_read"].value for m in observed]
    assert len(rows) >= 2 and rows == sorted(rows) and rows[-1] <= 300_000
    assert all(m["estimated_total_rows"].value == 300_000 for m in observed)
    logs = [e.message for e in instance.all_logs(result.run_id) if "rows read" in (e.message or "")]
    assert logs and "% of ~300,000" in logs[-1]
