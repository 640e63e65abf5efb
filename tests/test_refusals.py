"""Declarations a sink cannot hold are refused before anything is created, in the source or the sink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job
from cdc_project import cdc_pipeline, run_until_caught_up
from refusals import assert_nothing_created


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.fine (id int PRIMARY KEY, name text)")
        conn.execute("CREATE TABLE public.huge (id int PRIMARY KEY, amount numeric(50, 2))")
        conn.execute("INSERT INTO public.fine VALUES (1, 'a')")
        conn.execute("INSERT INTO public.huge VALUES (1, 1.5)")
    return pipeline_env


def duckdb_tables(path: str) -> list[str]:
    if not Path(path).exists():
        return []
    with duckdb.connect(path, read_only=True) as conn:
        rows = conn.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()
    return [row[0] for row in rows]


def refusal(dataset: str) -> str:
    return f"cannot hold column 'amount' of {dataset}.huge (source type numeric(50,2)): DuckDB DECIMAL holds at most 38"


def test_cdc_column_type_the_sink_cannot_hold_is_refused_before_the_slot(
    env: str, state_dsn: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = project(duckdb_sink, cdc_pipeline("wide", ["public.fine", "public.huge"]))
    result = run_until_caught_up(defs, "acme__wide", instance)
    assert not result.success
    assert refusal("replica") in failure_message(result)
    assert_nothing_created(env, state_dsn, "acme", "wide")
    assert duckdb_tables(duckdb_sink.location) == []


def test_batch_column_type_the_sink_cannot_hold_is_refused_before_the_table(
    env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = project(duckdb_sink, pipeline("wide", [{"name": "public.huge", "cursor": "id"}], strategy="append"))
    result = run_job(defs, "acme__wide", instance)
    assert not result.success
    assert refusal("analytics") in failure_message(result)
    assert duckdb_tables(duckdb_sink.location) == []
