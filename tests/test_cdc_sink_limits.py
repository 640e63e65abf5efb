"""Values only the sink refuses at write time are poison rows, not a failed table: a NULL inside an
array into BigQuery (the emulator) is dead-lettered while the other rows land; DuckDB, which holds
it, takes it. A timestamptz past 9999 in UTC (pgoutput writes it as year 10000) is refused by the
decode itself, for every sink."""

from __future__ import annotations

from pathlib import Path

import psycopg
from blips_harness import duckdb_rows_in_process, start_run, streaming, wait_until
from google.cloud import bigquery
from table_compare import normalize

from nilus_dagster.sinks.bigquery import BigQuerySink
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.state.dead_letters import DeadLetterFilter
from nilus_dagster.state.store import StateStore

REFUSED = [
    "INSERT INTO public.t VALUES (2, '{1,NULL}', '2024-01-01 00:00:00+00')",
    "INSERT INTO public.t VALUES (3, '{3}', '9999-12-31 23:00:00-05')",  # 10000-01-01 04:00 UTC
]


def create_table(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v int[], at timestamptz)")
        conn.execute("INSERT INTO public.t VALUES (1, '{1,2}', '2024-01-01 00:00:00+00')")


def write_refused_among_good_rows(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for statement in REFUSED:
            conn.execute(statement)
        conn.execute("INSERT INTO public.t VALUES (4, '{4,5}', '9999-12-31 23:00:00+00')")
        conn.execute("UPDATE public.t SET v = '{1,2,3}' WHERE id = 1")


def test_bigquery_refusals_are_dead_lettered_and_the_rest_lands(
    source_db: str, bigquery_sink: BigQuerySink, bigquery_client: bigquery.Client, store: StateStore
) -> None:
    create_table(source_db)
    sink = BigQuerySink(bigquery_client.project, dataset=bigquery_sink.dataset, client=bigquery_client)

    def read() -> list[tuple]:
        try:
            rows = bigquery_client.query(f"SELECT id, v FROM `{bigquery_client.project}.replica.t` ORDER BY id").result()
        except Exception:  # noqa: BLE001 - not created yet
            return []
        return [(r["id"], list(r["v"])) for r in rows]

    live = start_run(source_db, sink, store, "bqlimits")
    try:
        wait_until(lambda: streaming(live) and read() == [(1, [1, 2])], 120, "the snapshot to stream")
        write_refused_among_good_rows(source_db)
        wait_until(lambda: read() == [(1, [1, 2, 3]), (4, [4, 5])], 120, "the good rows of the transaction")
        entries = store.dead_letters("acme", DeadLetterFilter(pipeline="bqlimits")).items
        assert sorted((e.row_key, e.error_kind) for e in entries) == [(["2"], "array_value"),
                                                                      (["3"], "timestamptz_out_of_range")]
        assert "'{1,NULL}' cannot be written to BigQuery: an array cannot hold a NULL element" in entries[0].message
        assert not store.table_failures("acme", "bqlimits")  # a row refused, not the table
    finally:
        live.finish()
        bigquery_client.delete_dataset("replica", delete_contents=True, not_found_ok=True)


def test_duckdb_holds_what_bigquery_refuses(source_db: str, duckdb_path: Path, store: StateStore) -> None:
    create_table(source_db)
    live = start_run(source_db, DuckDBSink(duckdb_path), store, "ddlimits")
    try:
        wait_until(lambda: streaming(live) and len(duckdb_rows_in_process(duckdb_path)) == 1, 60, "the snapshot")
        write_refused_among_good_rows(source_db)
        wait_until(lambda: len(duckdb_rows_in_process(duckdb_path)) == 3, 60, "every row but the year 10000")
        rows = dict(duckdb_rows_in_process(duckdb_path))
        assert sorted(rows) == [1, 2, 4] and normalize(rows[2]) == normalize([1, None])
        [entry] = store.dead_letters("acme", DeadLetterFilter(pipeline="ddlimits")).items
        assert entry.row_key == ["3"] and entry.error_kind == "timestamptz_out_of_range"
    finally:
        live.finish()
