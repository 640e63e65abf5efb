"""A resync runs beside the stream: while one table is re-read, the others keep streaming.

The copy of `public.items` is held deterministically by a gate in the snapshot reader
(tests/copy_gate.py): the resync's reader waits inside its snapshot, after the table was emptied
and marked, until the test releases it. Meanwhile changes to `public.notes` (keyless) must reach
the sink. At the end both tables equal the source row by row; a variant SIGKILLs the run while
the copy waits.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import copy_gate
import duckdb
import psycopg
import pytest
import test_cdc_partitioned as partitioned
from batch_project import SinkTarget
from cdc_project import cdc_pipeline
from table_compare import assert_same_rows, source_rows
from test_cdc_crash import finish_worker, start_worker, wait_for
from test_cdc_resync import NOTES, assert_exact, corrupt_sink, create_tables, sink_rows, spec_dict, stop_churn

import nilus_dagster.cdc.snapshot as snapshot_module
from nilus_dagster.cdc.pipeline import CdcRun, request_table_resync
from nilus_dagster.cdc.resync import RESYNC_MARKER
from nilus_dagster.components.cdc_assets import cdc_config
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

ITEMS_TABLE = TableName("public", "items")


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> Iterator[str]:
    from test_cdc_resync import drop_slots

    yield pipeline_env
    drop_slots(pipeline_env)


def in_sink(sink: SinkTarget, query: str) -> list[tuple]:
    """Read the sink beside a run of this process (DuckDB: the same in-process database)."""
    if sink.kind == "duckdb":
        with duckdb.connect(str(Path(sink.location))) as conn:
            return conn.execute(query).fetchall()
    with psycopg.connect(sink.location, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def write_during_copy_notes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.notes SELECT g, 'during', 0 FROM generate_series(800000, 800024) g")
        conn.execute("UPDATE public.notes SET n = n + 1 WHERE note_id % 13 = 0")
        conn.execute("DELETE FROM public.notes WHERE note_id % 17 = 0 AND note_id < 1000")


def write_during_copy(dsn: str) -> None:
    """Changes to both tables while the copy of items waits: items's come after its snapshot."""
    write_during_copy_notes(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.items SET counter = counter + 7, label = 'during' WHERE id % 10 = 3")
        conn.execute("DELETE FROM public.items WHERE id % 50 = 7")


def light_churn(dsn: str, stop: threading.Event, first_id: int) -> None:
    """Small transactions on both tables (inserts, updates, deletes) until stopped."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        next_id = first_id
        while not stop.is_set():
            with conn.transaction():
                conn.execute("INSERT INTO public.items VALUES (%s, 0, 'new', now()), (%s, 0, 'new', now())",
                             (next_id, next_id + 1))
                conn.execute("UPDATE public.items SET counter = counter + 1 WHERE id IN (%s, %s, %s)",
                             (next_id % 3000, (next_id * 7) % 3000, next_id - 2))
                conn.execute("DELETE FROM public.items WHERE id = %s", ((next_id * 13) % 3000,))
                conn.execute("INSERT INTO public.notes VALUES (%s, 'churn', 0)", (next_id,))
                conn.execute("UPDATE public.notes SET n = n + 1 WHERE note_id = %s", ((next_id * 3) % 2000,))
                conn.execute("DELETE FROM public.notes WHERE note_id = %s", ((next_id * 11) % 2000,))
            next_id += 2
            time.sleep(0.005)


def pipeline_config(spec: dict):  # noqa: ANN201 - CdcPipelineConfig
    parsed = validate_spec(PipelinesSpec, spec, "test")
    return parsed, cdc_config(parsed, parsed.pipelines[0])


@dataclass
class LiveRun:
    """A CDC run in a thread of this process (so the test reads a DuckDB sink beside it)."""

    store: StateStore
    config: Any
    failures: list[BaseException]

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        wait_for(lambda: condition() or bool(self.failures), timeout_s, what)
        assert not self.failures, self.failures

    def checkpoint(self, reader: Any, table: TableName) -> str | None:
        return reader.read_checkpoint(self.config.table_checkpoint(table))


@contextmanager
def live_run(spec: dict, state_dsn: str) -> Iterator[tuple[LiveRun, Any]]:
    """Yields the run and a second sink on the same target (to read checkpoints beside it)."""
    parsed, config = pipeline_config(spec)
    pipeline = parsed.pipelines[0]
    connection = parsed.connections[pipeline.sink.connection]
    run_sink, reader = (open_sink(pipeline.sink.connection, connection, dataset=pipeline.sink.dataset) for _ in range(2))
    stop = threading.Event()
    failures: list[BaseException] = []
    with StateStore(state_dsn).open() as store:
        run = CdcRun(config, run_sink, store, "live-resync", should_stop=stop.is_set, heartbeat_interval_s=0.2)

        def work() -> None:
            try:
                run.run()
            except BaseException as error:  # noqa: BLE001 - asserted below
                failures.append(error)

        thread = threading.Thread(target=work)
        thread.start()
        live = LiveRun(store, config, failures)
        try:
            live.wait(lambda: _phase(store) == "streaming", "the run to stream", 60)
            yield live, reader
        finally:
            stop.set()
            thread.join(timeout=60)
            reader.close()
    assert not thread.is_alive()
    assert not failures, failures


def test_other_tables_keep_streaming_while_a_table_is_resynced(
    env: str, state_dsn: str, sink: SinkTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(env, 3_000, 2_000)
    spec = spec_dict(sink, snapshot_partition_blocks=8)
    finish_worker(json.dumps(spec))  # initial snapshot
    corrupt_sink(sink)  # only a resync repairs items (and notes rows, which stay wrong: not resynced)
    with psycopg.connect(env, autocommit=True) as conn:  # notes must be exact for the comparison
        conn.execute("DELETE FROM public.notes WHERE note_id % 4 = 0")
    monkeypatch.setattr(snapshot_module, "read_table", snapshot_module.read_table)  # undone after the test
    copy_gate.install(tmp_path, "public.items")
    try:
        with live_run(spec, state_dsn) as (live, reader):
            request_table_resync(live.config, live.store, ["public.items"], "test")
            live.wait(lambda: copy_gate.reached(tmp_path), "the resync's copy to start")
            assert live.checkpoint(reader, ITEMS_TABLE) == RESYNC_MARKER  # emptied and marked, the copy waits
            write_during_copy(env)
            live.wait(
                lambda: in_sink(sink, "SELECT count(*) FROM replica.notes WHERE body = 'during'") == [(25,)],
                "the notes changes to reach the sink while items is resynced",
            )
            assert live.checkpoint(reader, ITEMS_TABLE) == RESYNC_MARKER  # items is still being copied
            assert in_sink(sink, "SELECT count(*) FROM replica.items") == [(0,)]  # emptied; its changes held
            assert [r.status for r in live.store.open_resyncs("acme", "crashy")] == ["running"]
            assert _beat(live.store).get("resync_tables") == ["public.items"]
            copy_gate.release(tmp_path)
            writer_stop = threading.Event()
            writer = threading.Thread(target=light_churn, args=(env, writer_stop, 600_000))
            writer.start()
            try:
                live.wait(lambda: not live.store.open_resyncs("acme", "crashy"), "the resync to end", 60)
                time.sleep(0.3)  # changes on both sides of the restart
            finally:
                stop_churn(writer_stop, writer)
    finally:
        copy_gate.release(tmp_path)
    finish_worker(json.dumps(spec))  # catch up to the last change
    assert_exact(env, sink)


def test_a_partitioned_table_is_resynced_beside_the_stream_with_a_partition_attached_meanwhile(
    env: str, state_dsn: str, sink: SinkTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute(partitioned.SOURCE_DDL)
        conn.execute("CREATE TABLE public.notes (note_id int NOT NULL, body text, n int NOT NULL)")
        conn.execute("ALTER TABLE public.notes REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO public.notes SELECT g, 'note ' || g, 0 FROM generate_series(1, 500) g")
    pipeline = cdc_pipeline(
        "crashy", ["public.measurements", "public.notes"], cdc={"batch_max_ms": 100, "snapshot_partition_blocks": 4}
    )
    spec = {"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
            "pipelines": [pipeline]}
    finish_worker(json.dumps(spec))
    monkeypatch.setattr(snapshot_module, "read_table", snapshot_module.read_table)
    copy_gate.install(tmp_path, "public.m_2024_01")  # a leaf: partitioned tables are read leaf by leaf
    try:
        with live_run(spec, state_dsn) as (live, reader):
            request_table_resync(live.config, live.store, ["public.measurements"], "test")
            live.wait(lambda: copy_gate.reached(tmp_path), "the resync's copy to start")
            partitioned.changes(env, 1)
            with psycopg.connect(env, autocommit=True) as conn:
                conn.execute(partitioned.LATE_PARTITION)  # after the copy's snapshot: merged after the restart
                conn.execute("UPDATE public.measurements SET note = 'after attach' WHERE id BETWEEN 100001 AND 100010")
            write_during_copy_notes(env)
            live.wait(
                lambda: in_sink(sink, "SELECT count(*) FROM replica.notes WHERE body = 'during'") == [(25,)],
                "the notes changes to reach the sink while measurements is resynced",
            )
            assert live.checkpoint(reader, TableName("public", "measurements")) == RESYNC_MARKER
            copy_gate.release(tmp_path)
            live.wait(lambda: not live.store.open_resyncs("acme", "crashy"), "the resync to end", 60)
            partitioned.changes(env, 2)
            time.sleep(0.5)
    finally:
        copy_gate.release(tmp_path)
    finish_worker(json.dumps(spec))
    partitioned.assert_exact(env, sink)
    assert_same_rows(source_rows(env, "public.notes", NOTES, "note_id, body, n"), sink_rows(sink, "notes", NOTES))
    assert sum(r[3] == "before attach" for r in partitioned.sink_rows(sink)) > 300  # merged, not streamed


def test_sigkill_while_a_table_is_resynced_beside_the_stream_then_exact(
    env: str, state_dsn: str, sink: SinkTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(env, 3_000, 2_000)
    spec = spec_dict(sink, snapshot_partition_blocks=8)
    finish_worker(json.dumps(spec))
    corrupt_sink(sink)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("DELETE FROM public.notes WHERE note_id % 4 = 0")
    _, config = pipeline_config(spec)
    monkeypatch.setenv("NILUS_TEST_COPY_GATE", str(tmp_path))
    monkeypatch.setenv("NILUS_TEST_COPY_GATE_TABLE", "public.items")
    worker = start_worker(json.dumps(spec))
    monkeypatch.delenv("NILUS_TEST_COPY_GATE")
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: _phase(store) == "streaming", 60, "the run to stream")
            request_table_resync(config, store, ["public.items"], "test")
            wait_for(lambda: copy_gate.reached(tmp_path), 30, "the resync's copy to start")
            write_during_copy(env)
            time.sleep(1.5)  # the notes changes stream (and are acknowledged) while items is held
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            with psycopg.connect(env, autocommit=True) as conn:
                conn.execute("UPDATE public.items SET counter = counter + 100 WHERE id % 9 = 0")
            assert [r.status for r in store.open_resyncs("acme", "crashy")] == ["running"]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    finish_worker(json.dumps(spec))
    with StateStore(state_dsn).open() as store:
        assert store.open_resyncs("acme", "crashy") == []
    assert_exact(env, sink)


def _beat(store: StateStore) -> dict:
    beat = store.last_heartbeat("acme", "crashy")
    return {} if beat is None else beat.detail


def _phase(store: StateStore) -> str | None:
    return _beat(store).get("phase")
