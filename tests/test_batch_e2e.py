"""Batch pipelines end to end: Dagster job → real PostgreSQL source → DuckDB / PostgreSQL sink.

Every test compares the sink with the source row by row.
"""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows

ALL_TYPES_DDL = """
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s complicated');
CREATE TABLE public.everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, f4 real, f8 double precision,
    n numeric(38, 9), n_free numeric, t text, vc varchar(20), ch char(3), b boolean,
    d date, tm time, ts timestamp, tstz timestamptz, j json, jb jsonb, u uuid, raw bytea,
    ia integer[], ta text[], m mood,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.everything VALUES
 (1, 32767, -2147483648, 1.5, 3.141592653589793, 12345678901234567890123456789.123456789, 1.5,
  'plain', 'varchar', 'abc', true, '2024-02-29', '23:59:59.999999', '2024-01-01 12:34:56.789',
  '2024-06-01 12:00:00+05:30', '{"a": [1, 2, {"b": null}]}', '{"k": "v", "n": 1.25}',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10'::bytea, '{1,NULL,3}', '{"a,b","q\\"uote",NULL,""}',
  'it''s complicated', '2024-01-01 00:00:00+00'),
 (2, -32768, 0, -0.0, -1e300, -99999999999999999999999999999.999999999, -0.000000001,
  '', '', '', false, '0001-01-01', '00:00:00', '1970-01-01 00:00:00', '1999-12-31 23:59:59-08',
  '[]', '[]', '00000000-0000-0000-0000-000000000000', ''::bytea, '{}', '{}', 'sad',
  '2024-01-02 00:00:00+00'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, '2024-01-03 00:00:00+00');
"""
COLUMNS = [
    "id",
    "i2",
    "i4",
    "f4",
    "f8",
    "n",
    "n_free",
    "t",
    "vc",
    "ch",
    "b",
    "d",
    "tm",
    "ts",
    "tstz",
    "j",
    "jb",
    "u",
    "raw",
    "ia",
    "ta",
    "m",
    "updated_at",
]


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    return pipeline_env


def sink_rows(sink: SinkTarget, table: str, columns: list[str], order_by: str = "id") -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, table, columns, order_by)


def test_all_types_and_nulls_land_exactly(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute(ALL_TYPES_DDL)
    defs = project(sink, pipeline("types", ["public.everything"], run_as_user="bob"))
    result = run_job(defs, "acme__types", instance)
    assert result.success, failure_message(result)
    assert_same_rows(
        source_rows(env, "public.everything", COLUMNS, "id"), sink_rows(sink, "analytics.everything", COLUMNS)
    )
    materialization = result.asset_materializations_for_node("acme__types__public__everything")[0]
    assert materialization.metadata["rows"].value == 3
    assert materialization.metadata["bytes"].value > 0


def test_empty_table_and_100k_rows(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.empty (id int PRIMARY KEY, v text)")
        conn.execute(
            "CREATE TABLE public.big AS SELECT g AS id, md5(g::text) AS label, (g * 1.01)::numeric(12,2) AS amount, "
            "'2024-01-01'::timestamptz + g * interval '1 second' AS at FROM generate_series(1, 100000) g"
        )
        conn.execute("ALTER TABLE public.big ADD PRIMARY KEY (id)")
    defs = project(sink, pipeline("bulk", ["public.empty", "public.big"]))
    result = run_job(defs, "acme__bulk", instance)
    assert result.success, failure_message(result)
    assert sink_rows(sink, "analytics.empty", ["id", "v"]) == []
    columns = ["id", "label", "amount", "at"]
    assert_same_rows(source_rows(env, "public.big", columns, "id"), sink_rows(sink, "analytics.big", columns))
    big = result.asset_materializations_for_node("acme__bulk__public__big")[0]
    print(f"\n100k-row load into {sink.kind}: {big.metadata['duration_s'].value}s")


def test_incremental_reruns_load_only_new_rows_and_merge_updates_in_place(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.orders (id int PRIMARY KEY, status text, updated_at timestamptz NOT NULL)")
        conn.execute(
            "INSERT INTO public.orders SELECT g, 'new', '2024-01-01'::timestamptz + g * interval '1 minute' "
            "FROM generate_series(1, 100) g"
        )
    defs = project(sink, pipeline("orders", [{"name": "public.orders", "cursor": "updated_at"}]))
    first = run_job(defs, "acme__orders", instance)
    assert first.success, failure_message(first)
    node = "acme__orders__public__orders"
    assert first.asset_materializations_for_node(node)[0].metadata["rows"].value == 100

    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET status = 'paid', updated_at = '2025-01-01' WHERE id <= 10")
        conn.execute("INSERT INTO public.orders VALUES (101, 'new', '2025-01-02'), (102, 'new', '2025-01-02')")
    second = run_job(defs, "acme__orders", instance)
    assert second.success, failure_message(second)
    metadata = second.asset_materializations_for_node(node)[0].metadata
    assert metadata["rows"].value == 12  # 10 updated + 2 new, nothing else re-read
    assert metadata["high_water_mark"].value == "2025-01-02 00:00:00+00"

    third = run_job(defs, "acme__orders", instance)
    assert third.asset_materializations_for_node(node)[0].metadata["rows"].value == 0
    columns = ["id", "status", "updated_at"]
    assert_same_rows(source_rows(env, "public.orders", columns, "id"), sink_rows(sink, "analytics.orders", columns))


def test_append_with_id_cursor_and_replace(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.events (id bigserial PRIMARY KEY, kind text)")
        conn.execute("CREATE TABLE public.catalog (sku text PRIMARY KEY, price numeric(10,2))")
        conn.execute("INSERT INTO public.events (kind) SELECT 'view' FROM generate_series(1, 50)")
        conn.execute("INSERT INTO public.catalog VALUES ('a', 1.00), ('b', 2.00)")
    defs = project(
        sink,
        pipeline("events", [{"name": "public.events", "cursor": "id"}], strategy="append"),
        pipeline("catalog", ["public.catalog"], strategy="replace"),
    )
    for job in ("acme__events", "acme__catalog"):
        assert run_job(defs, job, instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.events (kind) SELECT 'click' FROM generate_series(1, 7)")
        conn.execute("DELETE FROM public.catalog WHERE sku = 'a'")
        conn.execute("INSERT INTO public.catalog VALUES ('c', 3.00)")
    for job in ("acme__events", "acme__catalog"):
        assert run_job(defs, job, instance).success
    assert_same_rows(
        source_rows(env, "public.events", ["id", "kind"], "id"), sink_rows(sink, "analytics.events", ["id", "kind"])
    )
    assert_same_rows(
        source_rows(env, "public.catalog", ["sku", "price"], "sku"),
        sink_rows(sink, "analytics.catalog", ["sku", "price"], "sku"),
    )


def test_full_table_append_keeps_every_load_although_the_source_has_a_key(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    """`append` without a cursor appends what it reads on every run: the sink table has no key."""
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.readings (id int PRIMARY KEY, value int)")
        conn.execute("INSERT INTO public.readings SELECT g, g * 10 FROM generate_series(1, 5) g")
    defs = project(sink, pipeline("readings", ["public.readings"], strategy="append"))
    first = run_job(defs, "acme__readings", instance)
    assert first.success, failure_message(first)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("UPDATE public.readings SET value = -1 WHERE id = 1")
    second = run_job(defs, "acme__readings", instance)
    assert second.success, failure_message(second)
    source = source_rows(env, "public.readings", ["id", "value"], "id")
    once = [(1, 10)] + [row for row in source if row[0] != 1]
    assert_same_rows(sorted(once + source), sink_rows(sink, "analytics.readings", ["id", "value"], "id, value"))


def test_new_source_column_is_added_and_a_widened_type_follows(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.people (id int PRIMARY KEY, name text, score smallint)")
        conn.execute("INSERT INTO public.people VALUES (1, 'ann', 7)")
    defs = project(sink, pipeline("people", ["public.people"]))
    assert run_job(defs, "acme__people", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.people ADD COLUMN email text")
        conn.execute("ALTER TABLE public.people ALTER COLUMN score TYPE integer")
        conn.execute("INSERT INTO public.people VALUES (2, 'bob', 100000, 'bob@example.com')")
    result = run_job(defs, "acme__people", instance)
    assert result.success, failure_message(result)
    metadata = result.asset_materializations_for_node("acme__people__public__people")[0].metadata
    assert metadata["added_columns"].value == "email"
    assert metadata["schema_change"].value == "+email text, ~score int16 -> int32"
    columns = ["id", "name", "score", "email"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), sink_rows(sink, "analytics.people", columns))


def test_schema_change_with_policy_fail_loads_nothing(
    env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    sink = duckdb_sink
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.strict (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.strict VALUES (1, 'a')")
    defs = project(sink, pipeline("strict", ["public.strict"], schema_changes="fail"))
    assert run_job(defs, "acme__strict", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.strict ADD COLUMN extra int")
        conn.execute("INSERT INTO public.strict VALUES (2, 'b', 7)")
    result = run_job(defs, "acme__strict", instance)
    assert not result.success
    assert "source schema changed (+extra int32) and schema_changes is 'fail'" in failure_message(result)
    assert sink_rows(sink, "analytics.strict", ["id", "v"]) == [(1, "a")]


def test_every_run_carries_the_pipeline_tags(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY)")
    defs = project(sink, pipeline("tagged", ["public.t"], run_as_user="carol", tenant="globex"))
    run_job(defs, "globex__tagged", instance)
    # An ad-hoc materialization (as the UI's "Materialize" button does) gets the tags as well.
    adhoc = dg.materialize(
        [defs.resolve_assets_def(dg.AssetKey(["globex", "tagged", "public", "t"]))],
        instance=instance,
    )
    assert adhoc.success
    runs = instance.get_runs()
    assert len(runs) == 2
    for run in runs:
        assert run.tags["nilus/tenant"] == "globex"
        assert run.tags["nilus/pipeline"] == "tagged"
        assert run.tags["nilus/resource_id"] == "nilus:v1:tagged:globex"
        assert run.tags["nilus/run_as_user"] == "carol"


def test_unreachable_source_names_the_connection(
    state_dsn: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DSN", "postgresql://nobody:secret-pw@127.0.0.1:1/none")
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    sink = duckdb_sink
    result = run_job(project(sink, pipeline("down", ["public.t"])), "acme__down", instance)
    assert not result.success
    message = failure_message(result)
    assert "connection 'src': cannot connect to PostgreSQL" in message
    assert "secret-pw" not in message


def test_missing_table_fails_before_data_moves(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.here (id int PRIMARY KEY)")
        conn.execute("INSERT INTO public.here VALUES (1)")
    defs = project(sink, pipeline("partial", ["public.here", "public.nowhere"]))
    result = run_job(defs, "acme__partial", instance)
    assert not result.success
    assert "public.nowhere" in failure_message(result)
    assert "does not exist" in failure_message(result)
    assert sink_rows(sink, "analytics.here", ["id"]) == [(1,)]  # the other table still loaded


def test_type_the_sink_cannot_hold_names_the_column(
    env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    sink = duckdb_sink
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.wide (id int PRIMARY KEY, huge numeric(60, 2))")
        conn.execute("INSERT INTO public.wide VALUES (1, 1.5)")
    result = run_job(project(sink, pipeline("wide", ["public.wide"])), "acme__wide", instance)
    assert not result.success
    assert "'huge'" in failure_message(result)


def test_merge_without_a_key_is_refused_with_the_fix(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.nokey (a int, b text)")
    result = run_job(project(sink, pipeline("nokey", ["public.nokey"])), "acme__nokey", instance)
    assert not result.success
    assert "has no primary key, so strategy merge cannot match rows: declare primary_key" in failure_message(result)
