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
from collections.abc import Iterator
from pathlib import Path

import copy_gate
import duckdb
import psycopg
import pytest
from batch_project import SinkTarget
from test_cdc_crash import finish_worker, start_worker, wait_for
from test_cdc_resync import assert_exact, churn, corrupt_sink, create_tables, spec_dict, stop_churn

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


def write_notes(dsn: str, first: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.notes SELECT g, 'during', 0 FROM generate_series(%s::int, %s::int) g",
            (first, first + count - 1),
        )
        conn.execute("UPDATE public.notes SET n = n + 1 WHERE note_id % 13 = 0")
        conn.execute("DELETE FROM public.notes WHERE note_id % 17 = 0 AND note_id < 1000")


def pipeline_config(spec: dict):  # noqa: ANN201 - CdcPipelineConfig
    parsed = validate_spec(PipelinesSpec, spec, "test")
    return parsed, cdc_config(parsed, parsed.pipelines[0])


def test_other_tables_keep_streaming_while_a_table_is_resynced(
    env: str, state_dsn: str, sink: SinkTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_tables(env, 3_000, 2_000)
    spec = spec_dict(sink, snapshot_partition_blocks=8)
    finish_worker(json.dumps(spec))  # initial snapshot
    corrupt_sink(sink)  # only a resync repairs items (and notes rows, which stay wrong: not resynced)
    with psycopg.connect(env, autocommit=True) as conn:  # notes must be exact for the comparison
        conn.execute("DELETE FROM public.notes WHERE note_id % 4 = 0")
    parsed, config = pipeline_config(spec)
    monkeypatch.setattr(snapshot_module, "read_table", snapshot_module.read_table)  # undone after the test
    copy_gate.install(tmp_path, "public.items")
    pipeline = parsed.pipelines[0]
    run_sink = open_sink(pipeline.sink.connection, parsed.connections[pipeline.sink.connection], dataset="replica")
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
        try:
            wait_for(lambda: _phase(store) == "streaming" or bool(failures), 60, "the run to stream")
            request_table_resync(config, store, ["public.items"], "test")
            wait_for(lambda: copy_gate.reached(tmp_path) or bool(failures), 30, "the resync's copy to start")
            reader = open_sink(pipeline.sink.connection, parsed.connections[pipeline.sink.connection], dataset="replica")
            checkpoint = config.table_checkpoint(ITEMS_TABLE)
            assert reader.read_checkpoint(checkpoint) == RESYNC_MARKER  # emptied and marked, the copy waits
            write_notes(env, 800_000, 25)
            wait_for(
                lambda: in_sink(sink, "SELECT count(*) FROM replica.notes WHERE body = 'during'") == [(25,)],
                30,
                "the notes changes to reach the sink while items is resynced",
            )
            assert reader.read_checkpoint(checkpoint) == RESYNC_MARKER  # items is still being copied
            reader.close()
            assert [r.status for r in store.open_resyncs("acme", "crashy")] == ["running"]
            assert _beat(store).get("resync_tables") == ["public.items"]
            copy_gate.release(tmp_path)
            writer_stop = threading.Event()
            writer = threading.Thread(target=churn, args=(env, writer_stop, 600_000))
            writer.start()
            try:
                wait_for(lambda: not store.open_resyncs("acme", "crashy") or bool(failures), 60, "the resync to end")
                time.sleep(0.5)
            finally:
                stop_churn(writer_stop, writer)
            assert not failures, failures
        finally:
            copy_gate.release(tmp_path)
            stop.set()
            thread.join(timeout=60)
    assert not thread.is_alive()
    assert not failures, failures
    finish_worker(json.dumps(spec))  # catch up to the last change
    assert_exact(env, sink)


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
            write_notes(env, 800_000, 25)
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
