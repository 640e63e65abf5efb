"""A resync beside the stream on the BigQuery sink (the emulator): while `public.items` is re-read
through the sink's fork, the changes to `public.notes` keep reaching BigQuery.

The copy is held by the gate in the snapshot reader (tests/copy_gate.py), as in
tests/test_cdc_live_resync.py; at the end both tables equal the source row by row.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import copy_gate
import pytest
from batch_project import project
from bigquery_emulator import RunningEmulator
from cdc_project import cdc_pipeline, run_until_caught_up
from google.cloud import bigquery
from table_compare import assert_same_rows, source_rows
from test_bigquery_pipelines import Warehouse, env, execute, instance, succeeded, warehouse  # noqa: F401
from test_cdc_live_resync import ITEMS_TABLE, _beat, light_churn, live_run, write_during_copy
from test_cdc_resync import drop_slots, stop_churn

import nilus_dagster.cdc.snapshot as snapshot_module
from nilus_dagster.cdc.pipeline import request_table_resync
from nilus_dagster.cdc.resync import RESYNC_MARKER
from nilus_dagster.schema import Column, ColumnType, TableName, TableSchema
from nilus_dagster.sinks.base import SinkError, SinkTable
from nilus_dagster.sinks.bigquery import BigQuerySink

ITEMS = ["id", "counter", "label", "updated_at"]
NOTES = ["note_id", "body", "n"]


@pytest.fixture
def source(env: str) -> Iterator[str]:  # noqa: F811 - the fixture imported above
    execute(
        env,
        "CREATE TABLE public.items (id int PRIMARY KEY, counter int NOT NULL, label text, updated_at timestamptz NOT NULL)",
        "INSERT INTO public.items SELECT g, 0, 'item ' || g, now() FROM generate_series(1, 3000) g",
        "CREATE TABLE public.notes (note_id int PRIMARY KEY, body text, n int NOT NULL)",
        "INSERT INTO public.notes SELECT g, 'note ' || g, 0 FROM generate_series(1, 200) g",
    )
    yield env
    drop_slots(env)


def count(warehouse: Warehouse, table: str, where: str = "TRUE") -> int:  # noqa: F811
    sql = f"SELECT COUNT(*) AS n FROM `{warehouse.ref(table)}` WHERE {where}"
    return next(iter(warehouse.client.query(sql).result()))["n"]


def columns_of(warehouse: Warehouse) -> set[str]:  # noqa: F811
    return {f.name for f in warehouse.table("items").schema}


def test_bigquery_other_tables_keep_streaming_while_a_table_is_resynced(
    source: str,
    state_dsn: str,
    warehouse: Warehouse,  # noqa: F811
    instance: object,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cdc = {"batch_max_ms": 300, "snapshot_partition_blocks": 4}  # a copy in several partitions
    pipeline = cdc_pipeline("crashy", ["public.items", "public.notes"], sink=warehouse.sink(), cdc=cdc)
    spec = {
        "connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": warehouse.target.connection},
        "pipelines": [pipeline],
    }
    defs = project(warehouse.target, pipeline)
    succeeded(run_until_caught_up(defs, "acme__crashy", instance))  # the initial snapshot
    warehouse.client.query(f"DELETE FROM `{warehouse.ref('items')}` WHERE MOD(id, 3) = 0").result()  # only a resync repairs
    monkeypatch.setattr(snapshot_module, "read_table", snapshot_module.read_table)  # undone after the test
    copy_gate.install(tmp_path, "public.items")
    try:
        with live_run(spec, state_dsn) as (live, reader):
            request_table_resync(live.config, live.store, ["public.items"], "test")
            live.wait(lambda: copy_gate.reached(tmp_path), "the resync's copy to start", 60)
            assert live.checkpoint(reader, ITEMS_TABLE) == RESYNC_MARKER  # emptied and marked, the copy waits
            write_during_copy(source)
            live.wait(
                lambda: count(warehouse, "notes", "body = 'during'") == 25,
                "the notes changes to reach BigQuery while items is resynced",
                90,
            )
            assert live.checkpoint(reader, ITEMS_TABLE) == RESYNC_MARKER  # items is still being copied
            assert count(warehouse, "items") == 0  # emptied; its changes held
            assert [r.status for r in live.store.open_resyncs("acme", "crashy")] == ["running"]
            assert _beat(live.store).get("resync_tables") == ["public.items"]
            copy_gate.release(tmp_path)
            writer_stop = threading.Event()  # the stream writes notes while the fork writes items
            writer = threading.Thread(target=light_churn, args=(source, writer_stop, 600_000))
            writer.start()
            try:
                live.wait(lambda: not live.store.open_resyncs("acme", "crashy"), "the resync to end", 120)
                time.sleep(0.5)  # changes on both sides of the restart
            finally:
                stop_churn(writer_stop, writer)
            execute(  # after the restart: both tables stream again
                source,
                "UPDATE public.items SET counter = counter + 1 WHERE id % 7 = 0",
                "INSERT INTO public.notes SELECT g, 'after', 0 FROM generate_series(900000, 900009) g",
            )
    finally:
        copy_gate.release(tmp_path)
    succeeded(run_until_caught_up(defs, "acme__crashy", instance))  # catch up to the last change
    assert_same_rows(source_rows(source, "public.items", ITEMS, "id"), warehouse.rows("items", ITEMS, live=True))
    assert_same_rows(
        source_rows(source, "public.notes", NOTES, "note_id"), warehouse.rows("notes", NOTES, "note_id", live=True)
    )
    assert warehouse.duplicate_keys("items") == 0 and warehouse.duplicate_keys("notes", "note_id") == 0


def test_a_fork_has_its_own_client_and_transaction_and_its_close_refreshes_the_parent(
    bigquery_emulator: RunningEmulator, bigquery_client: bigquery.Client
) -> None:
    dataset = f"fork_{uuid.uuid4().hex[:10]}"
    sink = BigQuerySink(bigquery_emulator.project, dataset=dataset, api_endpoint=bigquery_emulator.url)
    target = SinkTable(dataset, "t")
    columns = (Column("id", ColumnType("int64")), Column("v", ColumnType("text")))
    schema = TableSchema(TableName("public", "t"), columns, ("id",))
    wider = TableSchema(schema.table, (*columns, Column("extra", ColumnType("int64"))), ("id",))
    try:
        assert sink.can_fork
        fork = sink.fork()
        assert fork.client is not sink.client
        with sink.change_transaction(), fork.change_transaction():  # no transaction state shared
            assert fork._span is not sink._span
        sink.prepare_table(target, schema, cdc=True)  # the parent caches the table
        assert fork.prepare_table(target, wider, cdc=True) == ["extra"]
        fork.close()
        assert sink.prepare_table(target, wider, cdc=True) == []  # read again: the fork's column is there
    finally:
        sink.close()
        bigquery_client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
    injected = BigQuerySink(bigquery_emulator.project, dataset=dataset, client=bigquery_client)
    assert not injected.can_fork  # a live resync then pauses the stream, as before
    with pytest.raises(SinkError, match="cannot fork"):
        injected.fork()


def test_bigquery_a_rewrite_mid_stream_is_resynced_beside_the_stream(
    source: str, state_dsn: str, warehouse: Warehouse, instance: object  # noqa: F811
) -> None:
    pipeline = cdc_pipeline("crashy", ["public.items", "public.notes"], sink=warehouse.sink(), cdc={"batch_max_ms": 300})
    spec = {
        "connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": warehouse.target.connection},
        "pipelines": [pipeline],
    }
    defs = project(warehouse.target, pipeline)
    succeeded(run_until_caught_up(defs, "acme__crashy", instance))
    with live_run(spec, state_dsn) as (live, _reader):
        execute(
            source,
            "ALTER TABLE public.items ADD COLUMN extra float8 DEFAULT random()",  # rewrites every row
            "UPDATE public.items SET counter = counter + 1 WHERE id = 1",  # its Relation message shows the change
        )
        live.wait(
            lambda: "extra" in columns_of(warehouse) and not live.store.open_resyncs("acme", "crashy"),
            "the rewrite's resync to end",
            120,
        )
        execute(
            source,
            "UPDATE public.items SET label = 'after' WHERE id % 100 = 0",  # through the stream's own sink
            "INSERT INTO public.notes VALUES (900000, 'after', 0)",
        )
        live.wait(lambda: count(warehouse, "items", "label = 'after'") == 30, "the stream to apply items again", 60)
        done = live.store.resync_requests(range(1, 100))  # a fresh state database
        assert [(r.table_name, r.status) for r in done] == [("public.items", "done")]
    succeeded(run_until_caught_up(defs, "acme__crashy", instance))
    wider = [*ITEMS, "extra"]
    assert_same_rows(source_rows(source, "public.items", wider, "id"), warehouse.rows("items", wider, live=True))
    assert_same_rows(
        source_rows(source, "public.notes", NOTES, "note_id"), warehouse.rows("notes", NOTES, "note_id", live=True)
    )
