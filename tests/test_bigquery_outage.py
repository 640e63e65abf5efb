"""The BigQuery backend unavailable for a while mid-stream (every API call answered 503
`backendError` by a proxy before the emulator): the run waits the outage out with its retries,
never acknowledges the slot past what BigQuery holds, shows the outage in `sink_errors_total`, and
ends with sink == source row by row."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest
from bigquery_emulator import RunningEmulator
from blips_harness import COLUMNS, RECOVER_S, in_sink, make_table, start_run, streaming, wait_until, write
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from http_fault_proxy import HttpFaultProxy
from table_compare import assert_same_rows, bigquery_rows, source_rows
from test_cdc_blips import _stop_runs  # noqa: F401 - fixture: stop left-over runs

from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.sinks.bigquery import BigQuerySink
from nilus_dagster.state.store import StateStore

OUTAGE_S = 8
DATASET = "replica"  # where the blip harness's run writes its table


@pytest.fixture
def proxy(bigquery_emulator: RunningEmulator, bigquery_client: bigquery.Client) -> Iterator[HttpFaultProxy]:
    bigquery_client.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)
    with HttpFaultProxy(bigquery_emulator.url) as running:
        yield running
    bigquery_client.delete_dataset(DATASET, delete_contents=True, not_found_ok=True)


def test_a_bigquery_backend_outage_is_waited_out(
    source_db: str, store: StateStore, bigquery_client: bigquery.Client, proxy: HttpFaultProxy
) -> None:
    make_table(source_db)
    through_proxy = bigquery.Client(
        project=bigquery_client.project,
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=proxy.url),
    )
    sink = BigQuerySink(bigquery_client.project, dataset=DATASET, client=through_proxy)
    read = lambda: bigquery_rows(bigquery_client, f"{bigquery_client.project}.{DATASET}.t", COLUMNS, "id")  # noqa: E731
    live = start_run(source_db, sink, store, "bqoutage")
    wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 90, "the snapshot to stream")
    with psycopg.connect(source_db, autocommit=True) as conn:
        before_writes = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    proxy.failing = True
    write(source_db, 1000, 20)
    time.sleep(OUTAGE_S)
    with psycopg.connect(source_db, autocommit=True) as conn:
        confirmed = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                 (live.run.slot,)).fetchone()[0]
    assert proxy.refused >= 1, "the run made no BigQuery call during the outage"
    assert parse_lsn(confirmed) <= before_writes, "the slot was acknowledged past what BigQuery holds"
    assert live.thread.is_alive(), "the run gave up during the outage"
    proxy.failing = False
    wait_until(in_sink(read, source_db), RECOVER_S + 40, "changes after BigQuery came back")
    wait_until(lambda: max(p.sink_errors_total for _, p in live.progress) >= 1, 10, "the outage in the progress")
    live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())
    through_proxy.close()
