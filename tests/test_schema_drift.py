"""The asset check `schema_drift`: source columns against sink columns, batch and CDC.

Real PostgreSQL source, DuckDB sink, real Dagster instance.
"""

from __future__ import annotations

import dagster as dg
import psycopg
from batch_project import SinkTarget, failure_message, pipeline, project, run_job
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from test_cdc_crash import create_items


def _drift(result: dg.ExecuteInProcessResult) -> list[dg.AssetCheckEvaluation]:
    return [e for e in result.get_asset_check_evaluations() if e.check_name == "schema_drift"]


def _differences(evaluation: dg.AssetCheckEvaluation) -> tuple[bool, str, str]:
    metadata = evaluation.metadata
    return evaluation.passed, metadata["missing_in_sink"].value, metadata["only_in_sink"].value  # type: ignore[return-value]


def test_batch_load_reports_a_column_the_source_dropped(pipeline_env: str, duckdb_sink: SinkTarget) -> None:
    create_items(pipeline_env, 5)
    defs = project(duckdb_sink, pipeline("drift", ["public.items"], strategy="replace"))
    instance = dg.DagsterInstance.get()
    first = run_job(defs, "acme__drift", instance)
    assert first.success, failure_message(first)
    assert [_differences(e) for e in _drift(first)] == [(True, "", "")]
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.items DROP COLUMN label")
    second = run_job(defs, "acme__drift", instance)
    assert second.success, failure_message(second)
    assert [_differences(e) for e in _drift(second)] == [(False, "", "label")]  # evolve keeps the sink's column


def test_cdc_reports_a_source_column_the_sink_does_not_have_yet(pipeline_env: str, duckdb_sink: SinkTarget) -> None:
    create_items(pipeline_env, 5)
    defs = cdc_project(duckdb_sink, cdc_pipeline("crashy", ["public.items"]))
    instance = dg.DagsterInstance.get()
    first = run_until_caught_up(defs, "acme__crashy", instance)
    assert first.success, failure_message(first)
    assert {_differences(e) for e in _drift(first)} == {(True, "", "")}
    with psycopg.connect(pipeline_env, autocommit=True) as conn:  # no row changes: the stream cannot know yet
        conn.execute("ALTER TABLE public.items ADD COLUMN note text")
    second = run_until_caught_up(defs, "acme__crashy", instance)
    assert second.success, failure_message(second)
    assert _differences(_drift(second)[-1]) == (False, "note", "")
    with psycopg.connect(pipeline_env, autocommit=True) as conn:  # a change: evolve adds the column
        conn.execute("UPDATE public.items SET note = 'n' WHERE id = 1")
    third = run_until_caught_up(defs, "acme__crashy", instance)
    assert third.success, failure_message(third)
    assert _differences(_drift(third)[-1]) == (True, "", "")
