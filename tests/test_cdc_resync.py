"""Resync (re-snapshot some tables of a live pipeline) and snapshot resume for every table.

Every test compares sink and source row by row: a keyed table and a keyless one (REPLICA
IDENTITY FULL, distinct rows), with source writes running while the pipeline works, and a
SIGKILL at a random moment where the scenario allows it.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Iterator

import dagster as dg
import duckdb
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows
from test_cdc_crash import finish_worker, start_worker, wait_for

from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.cdc.pipeline import request_table_resync
from nilus_dagster.components.cdc_assets import cdc_config
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

ITEMS = ["id", "counter", "label", "updated_at"]
NOTES = ["note_id", "body", "n"]
TABLES = ["public.items", "public.notes"]


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> Iterator[str]:
    yield pipeline_env
    drop_slots(pipeline_env)


def drop_slots(dsn: str) -> None:
    """The test cluster has few replication slots for the whole session: give this test's back."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = current_database() AND active_pid IS NOT NULL"
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            slots = conn.execute(
                "SELECT slot_name, active FROM pg_replication_slots WHERE database = current_database()"
            ).fetchall()
            for name, active in slots:
                if not active:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            if all(not active for _, active in slots):
                return
            time.sleep(0.1)


def spec_dict(sink: SinkTarget, schema_changes: str = "evolve", **cdc: object) -> dict:
    pipeline = cdc_pipeline(
        "crashy", TABLES, schema_changes=schema_changes, cdc={"batch_max_ms": 100, "batch_max_rows": 500, **cdc}
    )
    return {
        "connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
        "pipelines": [pipeline],
    }


def create_tables(dsn: str, items: int, notes: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.items (id int PRIMARY KEY, counter int NOT NULL, label text, "
            "updated_at timestamptz NOT NULL)"
        )
        conn.execute("ALTER TABLE public.items ALTER COLUMN label SET STORAGE EXTERNAL")  # stored out of line
        conn.execute(  # one row in 20 has a TOASTed label, which updates of other columns leave unchanged
            "INSERT INTO public.items SELECT g, 0, CASE WHEN g %% 20 = 0 THEN repeat('t', 3000) ELSE repeat('x', 50) "
            "END, now() FROM generate_series(1, %s) g",
            (items,),
        )
        conn.execute("CREATE TABLE public.notes (note_id int NOT NULL, body text, n int NOT NULL)")
        conn.execute("ALTER TABLE public.notes REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO public.notes SELECT g, 'note ' || g, 0 FROM generate_series(1, %s) g", (notes,))


def churn(dsn: str, stop: threading.Event, first_id: int) -> None:
    """Small transactions on both tables: inserts, updates, deletes (notes rows stay distinct).
    Items with id % 100 = 1 are never changed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        next_id = first_id
        while not stop.is_set():
            with conn.transaction():
                conn.execute(
                    "INSERT INTO public.items SELECT g, 0, 'new', now() FROM generate_series(%s::int, %s::int) g",
                    (next_id, next_id + 9),
                )
                conn.execute(
                    "UPDATE public.items SET counter = counter + 1, updated_at = now() WHERE id %% 7 = %s::int "
                    "AND id %% 100 <> 1",
                    (next_id % 7,),
                )
                conn.execute("DELETE FROM public.items WHERE id = %s::int", (next_id - 35,))
                conn.execute(
                    "INSERT INTO public.notes SELECT g, 'added', 0 FROM generate_series(%s::int, %s::int) g",
                    (next_id, next_id + 4),
                )
                conn.execute("UPDATE public.notes SET n = n + 1 WHERE note_id %% 11 = %s::int", (next_id % 11,))
                conn.execute("DELETE FROM public.notes WHERE note_id = %s::int", (next_id - 20,))
            next_id += 10


def sink_rows(sink: SinkTarget, table: str, columns: list[str]) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, f"replica.{table}", columns, ", ".join(columns))


def assert_exact(env: str, sink: SinkTarget) -> None:
    assert_same_rows(source_rows(env, "public.items", ITEMS, "id"), sink_rows(sink, "items", ITEMS))
    # keyless: compared as multisets (sorted on every column)
    assert_same_rows(source_rows(env, "public.notes", NOTES, "note_id, body, n"), sink_rows(sink, "notes", NOTES))


def corrupt_sink(sink: SinkTarget) -> None:
    """Rows the stream alone would never repair: only a resync makes the sink exact again."""
    statements = [
        "DELETE FROM replica.items WHERE id % 3 = 0",
        "UPDATE replica.items SET label = 'corrupt' WHERE id % 5 = 0",
        "DELETE FROM replica.notes WHERE note_id % 4 = 0",
    ]
    if sink.kind == "duckdb":
        with duckdb.connect(sink.location) as conn:
            for statement in statements:
                conn.execute(statement)
    else:
        with psycopg.connect(sink.location, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)


def stop_churn(stop: threading.Event, writer: threading.Thread) -> None:
    stop.set()
    if writer.is_alive():
        writer.join()


def streaming_again(store: StateStore) -> bool:
    beat = store.last_heartbeat("acme", "crashy")
    return beat is not None and beat.detail.get("phase") == "streaming"


def test_sigkill_mid_snapshot_of_keyed_and_keyless_tables_then_exact(
    env: str, state_dsn: str, sink: SinkTarget
) -> None:
    """Before: a keyless table's interrupted snapshot made every later run fail ('cannot merge')."""
    create_tables(env, 80_000, 4_000)
    spec = json.dumps(spec_dict(sink, snapshot_partition_blocks=16, snapshot_workers=2))
    worker = start_worker(spec)
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop, 500_000))
    try:
        with StateStore(state_dsn).open() as store:

            def some_partitions_done() -> bool:
                progress = store.snapshot_progress("acme", "crashy")
                return sum(p.partitions_done for p in progress) >= 3

            wait_for(some_partitions_done, 120, "part of the snapshot to commit")
            writer.start()
            time.sleep(random.uniform(0.0, 0.3))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            progress = store.snapshot_progress("acme", "crashy")
            assert sum(p.partitions_done for p in progress) < sum(p.partitions_total for p in progress)
            time.sleep(0.5)  # writes after the crash, before the restart
            worker = start_worker(spec)  # restarts with the source still changing
            wait_for(lambda: streaming_again(store), 180, "the restarted run to stream")
            time.sleep(1.0)
    finally:
        stop_churn(stop, writer)
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    finish_worker(spec)
    assert_exact(env, sink)
    with StateStore(state_dsn).open() as store:
        state = store.get_pipeline_state("acme", "crashy")
    assert state is not None
    first_snapshot = parse_lsn(state.detail["consistent_lsn"])
    # The keyed table resumed: unchanged rows of partitions done before the crash keep the first
    # snapshot's LSN. The keyless one was resynced: all its rows are newer.
    assert min(sink_rows(sink, "items", ["_nilus_lsn"]))[0] == first_snapshot
    assert min(sink_rows(sink, "notes", ["_nilus_lsn"]))[0] > first_snapshot


def test_resync_job_repairs_tables_while_the_pipeline_streams(
    env: str, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    create_tables(env, 3_000, 2_000)
    spec = spec_dict(sink)
    finish_worker(json.dumps(spec))  # initial snapshot and stream
    corrupt_sink(sink)
    defs = cdc_project(sink, *spec["pipelines"])
    worker = start_worker(json.dumps(spec))
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop, 500_000))
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: streaming_again(store), 120, "the run to stream")
            writer.start()
            time.sleep(0.5)
            result = defs.resolve_job_def("acme__crashy__resync").execute_in_process(
                instance=instance,
                run_config={"ops": {"acme__crashy__resync_op": {"config": {"tables": TABLES, "wait_s": 120}}}},
                raise_on_error=False,
            )
            assert result.success, failure_message(result)
            tags = instance.get_run_by_id(result.run_id).tags
            assert tags["nilus/operation"] == "crashy:resync"
            requests = store.open_resyncs("acme", "crashy")
            assert requests == []
            assert worker.poll() is None  # the live run did it and keeps streaming
            time.sleep(1.0)
        stop_churn(stop, writer)
        time.sleep(random.uniform(0.0, 1.0))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        stop_churn(stop, writer)
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    finish_worker(json.dumps(spec))
    assert_exact(env, sink)


def test_sigkill_during_a_resync_then_exact(env: str, state_dsn: str, sink: SinkTarget) -> None:
    create_tables(env, 30_000, 3_000)
    spec = spec_dict(sink, snapshot_partition_blocks=16)
    finish_worker(json.dumps(spec))
    corrupt_sink(sink)
    parsed = validate_spec(PipelinesSpec, spec, "test")
    config = cdc_config(parsed, parsed.pipelines[0])
    worker = start_worker(json.dumps(spec))
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop, 500_000))
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: streaming_again(store), 120, "the run to stream")
            writer.start()
            request_table_resync(config, store, TABLES, "test")

            def resyncing() -> bool:
                beat = store.last_heartbeat("acme", "crashy")
                return beat is not None and bool(beat.detail.get("resync_tables"))  # beside the stream

            wait_for(lambda: resyncing() or not store.open_resyncs("acme", "crashy"), 60, "the resync to start")
            time.sleep(random.uniform(0.0, 2.0))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
            time.sleep(0.5)
    finally:
        stop_churn(stop, writer)
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    finish_worker(json.dumps(spec))
    with StateStore(state_dsn).open() as store:
        assert store.open_resyncs("acme", "crashy") == []
    assert_exact(env, sink)


def test_resync_after_a_table_rewrite_retypes_the_sink_columns(env: str, state_dsn: str, sink: SinkTarget) -> None:
    """ALTER COLUMN TYPE ... USING rewrites every row without streaming them: a resync recreates
    the sink table with the new type and copies the rewritten rows."""
    create_tables(env, 500, 100)
    spec = spec_dict(sink, snapshot_partition_blocks=4)
    finish_worker(json.dumps(spec))
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("UPDATE public.items SET counter = 5 WHERE id <= 10")  # streamed under the old type
        conn.execute("ALTER TABLE public.items ALTER COLUMN counter TYPE text USING (counter::text || '!')")
        conn.execute("UPDATE public.items SET counter = 'after' WHERE id > 490")
    parsed = validate_spec(PipelinesSpec, spec, "test")
    with StateStore(state_dsn).open() as store:
        request_table_resync(cdc_config(parsed, parsed.pipelines[0]), store, ["public.items"], "rewritten by DDL")
    finish_worker(json.dumps(spec))
    assert_exact(env, sink)
    assert sink_rows(sink, "items", ["id", "counter"])[0] == (1, "5!")


def test_a_table_held_after_a_rewrite_is_resynced_by_the_job_while_streaming(
    env: str, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    """`pause` holds a table whose column was retyped (its rows rewritten without being streamed);
    the resync job re-reads it inside the live run, which settles the held change and streams on."""
    create_tables(env, 500, 100)
    spec = spec_dict(sink, schema_changes="pause")
    finish_worker(json.dumps(spec))
    defs = cdc_project(sink, *spec["pipelines"])
    worker = start_worker(json.dumps(spec))
    try:
        with StateStore(state_dsn).open() as store, psycopg.connect(env, autocommit=True) as conn:
            wait_for(lambda: streaming_again(store), 120, "the run to stream")
            conn.execute("ALTER TABLE public.items ALTER COLUMN counter TYPE text USING (counter::text || '!')")
            conn.execute("UPDATE public.items SET label = 'after the rewrite' WHERE id <= 5")

            def held() -> bool:
                state = store.get_pipeline_state("acme", "crashy")
                return state is not None and state.state == "pending_schema_approval"

            wait_for(held, 60, "the rewritten table to be held")
            result = defs.resolve_job_def("acme__crashy__resync").execute_in_process(
                instance=instance,
                run_config={
                    "ops": {"acme__crashy__resync_op": {"config": {"tables": ["public.items"], "wait_s": 120}}}
                },
                raise_on_error=False,
            )
            assert result.success, failure_message(result)
            state = store.get_pipeline_state("acme", "crashy")
            assert state is not None and state.state == "active"
            conn.execute("UPDATE public.items SET counter = 'streamed' WHERE id = 7")
            conn.execute("INSERT INTO public.notes VALUES (9999, 'after the resync', 1)")
            time.sleep(1.0)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=30)
    finish_worker(json.dumps(spec))
    assert_exact(env, sink)


def test_resync_job_names_the_valid_tables(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    spec = spec_dict(sink)
    defs = cdc_project(sink, *spec["pipelines"])
    result = defs.resolve_job_def("acme__crashy__resync").execute_in_process(
        instance=instance,
        run_config={"ops": {"acme__crashy__resync_op": {"config": {"tables": ["public.nope"]}}}},
        raise_on_error=False,
    )
    assert not result.success
    message = failure_message(result)
    assert "not tables of this pipeline: public.nope" in message
    assert "public.items, public.notes" in message


def test_refill_condition_selects_exactly_the_tuples_newer_than_the_snapshot(source_db: str) -> None:
    """The resume re-reads, in done partitions, the tuples written after the first snapshot."""
    from nilus_dagster.cdc.replication import ReplicationConnection
    from nilus_dagster.cdc.resume import newer_than_snapshot, snapshot_facts
    from nilus_dagster.cdc.setup import resolve_tables
    from nilus_dagster.schema import TableName

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO public.t SELECT g, 0 FROM generate_series(1, 100) g")
        (table,) = resolve_tables(conn, [TableName("public", "t")], {})
        with ReplicationConnection.connect(source_db) as replication:
            slot = replication.create_slot("nilus_test_refill", export_snapshot=True, temporary=True)
            facts = snapshot_facts("src", source_db, slot.snapshot_name, [table])
        with conn.transaction():  # a subtransaction writes too: its xid is not in a snapshot's list
            conn.execute("UPDATE public.t SET v = 1 WHERE id <= 10")
            conn.execute("SAVEPOINT s")
            conn.execute("INSERT INTO public.t VALUES (101, 1)")
            conn.execute("RELEASE SAVEPOINT s")
        condition, params = newer_than_snapshot(conn, facts["xmin"])
        newer = conn.execute(f"SELECT id FROM public.t WHERE {condition} ORDER BY id", params).fetchall()
        assert facts["filenodes"]["public.t"] is not None
    assert [row[0] for row in newer] == [*range(1, 11), 101]
