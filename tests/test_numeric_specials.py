"""NaN, ±Infinity and numerics of any size carried exactly into a PostgreSQL sink's numeric: in the
CDC snapshot, in streamed inserts, updates and deletes (also under a numeric key), and in batch
loads, compared row by row and as the numerics' exact text (digits and scale).
"""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job, sink_target
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, postgres_sink_rows, source_rows

HUGE = "9" * 130 + "." + "1" * 60  # 190 digits: far past any fixed-precision decimal
TINY = "0." + "0" * 150 + "7"
MEASURES = ["id", "fixed", "free", "many"]
AMOUNTS = ["amount", "note"]

SOURCE_DDL = f"""
CREATE TABLE public.measures (id int PRIMARY KEY, fixed numeric(12, 4), free numeric, many numeric[]);
INSERT INTO public.measures VALUES
  (1, 'NaN', 'NaN', '{{NaN,1.5,NULL}}'),
  (2, 12345678.1234, 'Infinity', '{{Infinity,-Infinity}}'),
  (3, -0.0001, '-Infinity', NULL),
  (4, 0, '{HUGE}', ARRAY['{HUGE}'::numeric]),
  (5, 1.5, '{TINY}', '{{}}'),
  (6, NULL, NULL, NULL),
  (7, -1.2500, '1.50', '{{1.50}}');
CREATE TABLE public.amounts (amount numeric PRIMARY KEY, note text);
INSERT INTO public.amounts VALUES
  ('NaN', 'nan'), ('Infinity', 'inf'), ('-Infinity', '-inf'), ('{HUGE}', 'huge'), ('{TINY}', 'tiny'), (1.50, 'x');
"""

CHANGES = [
    f"INSERT INTO public.measures VALUES (10, 'NaN', '-{HUGE}', '{{NaN}}'), (11, 2, 'Infinity', NULL), "
    f"(12, NULL, '-{TINY}', '{{-Infinity,NULL}}')",
    "UPDATE public.measures SET fixed = 'NaN', free = '-Infinity', many = '{NaN,NaN}' WHERE id = 4",
    f"UPDATE public.measures SET free = '{HUGE}', many = NULL WHERE id = 1",
    "UPDATE public.measures SET fixed = 3.1416, free = 'NaN' WHERE id = 6",
    "DELETE FROM public.measures WHERE id IN (2, 3)",
    "UPDATE public.amounts SET note = 'still inf' WHERE amount = 'Infinity'",
    "DELETE FROM public.amounts WHERE amount = 'NaN'",
    f"UPDATE public.amounts SET amount = 'NaN' WHERE amount = '{TINY}'",  # a key moved onto NaN
    "DELETE FROM public.amounts WHERE amount = '-Infinity'",
    "INSERT INTO public.amounts VALUES ('-Infinity', 'back'), (-0.000, 'zero')",
]


@pytest.fixture
def sink(duckdb_path, sink_pg: str, monkeypatch: pytest.MonkeyPatch) -> SinkTarget:  # noqa: ANN001
    return sink_target("postgres", duckdb_path, sink_pg, monkeypatch)


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute(SOURCE_DDL)
    return pipeline_env


def as_text(table: str, columns: list[str]) -> str:
    """The table with every column as its exact text (`1.50` is not `1.5`)."""
    texts = ", ".join(f'"{c}"::text AS "{c}"' for c in columns)
    return f"(SELECT {texts} FROM {table}) t"


def assert_exact(env: str, sink: SinkTarget, dataset: str) -> None:
    for table, columns, key in (("measures", MEASURES, "id"), ("amounts", AMOUNTS, "amount")):
        source, target = f"public.{table}", f"{dataset}.{table}"
        assert_same_rows(source_rows(env, source, columns, key), postgres_sink_rows(sink.location, target, columns, key))
        assert_same_rows(
            source_rows(env, as_text(source, columns), columns, key),
            postgres_sink_rows(sink.location, as_text(target, columns), columns, key),
        )


def test_cdc_carries_nan_infinity_and_any_precision_exactly(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = cdc_project(sink, cdc_pipeline("specials", ["public.measures", "public.amounts"]))
    result = run_until_caught_up(defs, "acme__specials", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink, "replica")  # the snapshot
    with psycopg.connect(env, autocommit=True) as conn:
        for statement in CHANGES:
            conn.execute(statement)
    result = run_until_caught_up(defs, "acme__specials", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink, "replica")  # the stream
    with psycopg.connect(sink.location) as conn:
        column_types = dict(
            conn.execute(
                "SELECT column_name, format_type(atttypid, atttypmod) FROM information_schema.columns c "
                "JOIN pg_attribute a ON a.attrelid = 'replica.measures'::regclass AND a.attname = c.column_name "
                "WHERE table_schema = 'replica' AND table_name = 'measures'"
            ).fetchall()
        )
    assert (column_types["fixed"], column_types["free"], column_types["many"]) == (
        "numeric(12,4)", "numeric", "numeric[]"
    )


def test_batch_loads_carry_nan_infinity_and_any_precision_exactly(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    defs = project(sink, pipeline("specials", ["public.measures", "public.amounts"], strategy="merge"))
    result = run_job(defs, "acme__specials", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink, "analytics")
    with psycopg.connect(env, autocommit=True) as conn:
        for statement in CHANGES:
            conn.execute(statement)
    defs = project(sink, pipeline("specials", ["public.measures", "public.amounts"], strategy="replace"))
    result = run_job(defs, "acme__specials", instance)
    assert result.success, failure_message(result)
    assert_exact(env, sink, "analytics")
