"""Source transactions far bigger than `batch_max_rows`: applied in chunks inside one sink
transaction, exact row by row, all or nothing (also when the worker is SIGKILLed mid-way)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psycopg
import pytest
from batch_project import SinkTarget
from cdc_project import cdc_pipeline
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows, source_rows

from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.cdc.operations import approve_schema_change
from nilus_dagster.cdc.pipeline import CdcRunResult, run_cdc_pipeline
from nilus_dagster.components.cdc_assets import cdc_config
from nilus_dagster.sinks.base import SinkError
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

WORKER = Path(__file__).with_name("cdc_worker.py")
BOUND = 500  # batch_max_rows: the transactions below are many times bigger
TABLES = {
    "public.items": (["id", "counter", "label", "payload"], "id"),
    "public.tags": (["id", "tag"], "id"),
    "public.loose": (["a", "b"], "a, b"),  # no primary key: REPLICA IDENTITY FULL
}


@pytest.fixture
def sink(sql_sink: SinkTarget) -> SinkTarget:
    return sql_sink


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.items (id int PRIMARY KEY, counter int NOT NULL, label text, payload text)")
        conn.execute("CREATE TABLE public.tags (id int PRIMARY KEY, tag text)")
        conn.execute("CREATE TABLE public.loose (a int, b text)")
        conn.execute("ALTER TABLE public.loose REPLICA IDENTITY FULL")
        # payload: incompressible text past the TOAST threshold, so untouched updates send it 'unchanged'
        conn.execute("INSERT INTO public.items SELECT g, 0, 'snap', (SELECT string_agg(md5(g::text || i::text), '') "
                     "FROM generate_series(1, 80) i) FROM generate_series(1, 200) g")
        conn.execute("INSERT INTO public.tags SELECT g, 'tag ' || g FROM generate_series(1, 100) g")
    return pipeline_env


def raw_spec(sink: SinkTarget, schema_changes: str = "evolve", **cdc: object) -> dict:
    pipeline = cdc_pipeline("bigtx", list(TABLES), cdc={"batch_max_rows": BOUND, "batch_max_ms": 100, **cdc},
                            schema_changes=schema_changes)
    return {"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
            "pipelines": [pipeline]}


def spec_of(sink: SinkTarget, schema_changes: str = "evolve", **cdc: object) -> PipelinesSpec:
    return validate_spec(PipelinesSpec, raw_spec(sink, schema_changes, **cdc), "test")


def run_caught_up(spec: PipelinesSpec, state_dsn: str) -> CdcRunResult:
    pipeline = spec.pipelines[0]
    sink = open_sink(pipeline.sink.connection, spec.connections[pipeline.sink.connection], dataset="replica")
    try:
        with StateStore(state_dsn).open() as store:
            return run_cdc_pipeline(cdc_config(spec, pipeline), sink, store, run_id="test", stop_at_caught_up=True)
    finally:
        sink.close()


def sink_rows(sink: SinkTarget, table: str, columns: list[str], order_by: str) -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, f"replica.{table.split('.')[1]}", columns, order_by)


def assert_exact(env: str, sink: SinkTarget, tables: dict[str, tuple[list[str], str]] = TABLES) -> None:
    for table, (columns, order_by) in tables.items():
        assert_same_rows(source_rows(env, table, columns, order_by), sink_rows(sink, table, columns, order_by))


def big_transaction(conn: psycopg.Connection, first_id: int, rows: int) -> None:
    """Inserts, then updates of those rows and of older ones (payload unchanged: TOAST), key changes
    (also with an unchanged TOASTed payload), deletes, a truncate of another table in the middle,
    and a keyless table with identical rows: each statement spans many chunks of BOUND changes."""
    last = first_id + rows - 1
    conn.execute("INSERT INTO public.items SELECT g, 0, 'toasty', (SELECT string_agg(md5(g::text || i::text), '') "
                 "FROM generate_series(1, 80) i) FROM generate_series(%s::int, %s::int) g", (last + 1, last + 300))
    conn.execute("INSERT INTO public.items SELECT g, 0, 'new', NULL FROM generate_series(%s::int, %s::int) g",
                 (first_id, last))
    conn.execute("INSERT INTO public.loose SELECT g, 'row ' || g FROM generate_series(1, %s::int) g", (rows // 2,))
    conn.execute("INSERT INTO public.loose SELECT g %% 7, 'dup' FROM generate_series(1, %s::int) g", (rows // 2,))
    conn.execute("UPDATE public.items SET counter = counter + 1, label = 'updated'")  # new and snapshot rows
    conn.execute("DELETE FROM public.items WHERE id % 10 = 3")
    conn.execute("TRUNCATE public.tags")
    conn.execute("INSERT INTO public.tags SELECT g, 'after truncate' FROM generate_series(1, %s::int) g", (rows,))
    conn.execute("UPDATE public.items SET id = id + 1000000 WHERE id % 10 = 7 AND payload IS NULL")  # key change
    conn.execute("UPDATE public.loose SET b = b || ' changed' WHERE a % 3 = 0")
    conn.execute("DELETE FROM public.loose WHERE a % 5 = 0")
    conn.execute("UPDATE public.items SET counter = counter + 1 WHERE id % 10 = 1")
    conn.execute("DELETE FROM public.loose WHERE ctid IN (SELECT ctid FROM public.loose WHERE b = 'dup' LIMIT 100)")
    # key changes leaving the TOASTed payload unchanged: rows of an earlier chunk, and snapshot rows
    conn.execute("UPDATE public.items SET id = id + 3000000 WHERE label = 'toasty' OR id <= 50")


def checkpoint_lsn(sink: SinkTarget) -> int:
    key = "acme/bigtx/public.items"
    if sink.kind == "duckdb":
        with duckdb.connect(sink.location) as conn:  # read-write: replays the WAL of a killed writer
            row = conn.execute("SELECT value FROM main._nilus_checkpoints WHERE key = ?", [key]).fetchone()
    else:
        with psycopg.connect(sink.location) as conn:
            row = conn.execute("SELECT value FROM public._nilus_checkpoints WHERE key = %s", (key,)).fetchone()
    return parse_lsn(row[0]) if row else 0


def test_a_transaction_many_times_the_bound_is_exact_and_bounded(env: str, state_dsn: str, sink: SinkTarget) -> None:
    spec = spec_of(sink)
    run_caught_up(spec, state_dsn)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.items VALUES (900000, 1, 'small, before', NULL)")  # pending when it starts
        with pytest.raises(Rollback), conn.transaction():
            big_transaction(conn, 500_000, 3000)  # aborted: never sent, leaves nothing
            raise Rollback
        with conn.transaction():
            big_transaction(conn, 1000, 4000)
        conn.execute("UPDATE public.items SET label = 'small, after' WHERE id = 1001")
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 1
    assert stats.peak_buffered_changes <= 2 * BOUND
    assert_exact(env, sink)


def test_a_transaction_a_few_times_the_bound_is_folded_in_memory(env: str, state_dsn: str, sink: SinkTarget) -> None:
    """Its chunks fold in memory (no spill file, no sink transaction of its own) and it lands as a
    batch: exact, with TOAST carried, keys moved, a truncate inside and a key-less table."""
    spec = spec_of(sink)
    run_caught_up(spec, state_dsn)
    with psycopg.connect(env, autocommit=True) as conn:
        with conn.transaction():
            big_transaction(conn, 1000, 250)  # ~2,400 changes (> BOUND) on ~1,400 keys (< MEMORY_PIECES x BOUND)
        conn.execute("UPDATE public.items SET label = 'small, after' WHERE id = 1001")
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 0 and stats.events_total > 4 * BOUND
    assert stats.peak_buffered_changes <= 2 * BOUND
    assert_exact(env, sink)


def test_soft_delete_in_a_big_transaction(env: str, state_dsn: str, sink: SinkTarget) -> None:
    """With soft_delete the live sink rows equal the source; deleted ones stay, flagged."""
    spec = spec_of(sink, soft_delete=True)
    run_caught_up(spec, state_dsn)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        big_transaction(conn, 1000, 3000)
    assert run_caught_up(spec, state_dsn).stats.chunked_transactions == 1
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    for table, (columns, order_by) in TABLES.items():
        live = reader(sink.location, f"replica.{table.split('.')[1]} WHERE _nilus_deleted IS NOT TRUE", columns,
                      order_by)
        assert_same_rows(source_rows(env, table, columns, order_by), live)
    deleted = reader(sink.location, "replica.items WHERE _nilus_deleted", ["id"], "id")
    assert (3,) in deleted and (1,) in deleted  # snapshot rows: deleted, and moved away from its key


class Rollback(Exception):
    pass


@pytest.mark.parametrize("sql_sink", ["postgres"], indirect=True)  # the fault: a constraint on the sink table
def test_sink_error_mid_transaction_rolls_all_of_it_back(env: str, state_dsn: str, sink: SinkTarget) -> None:
    spec = spec_of(sink)
    run_caught_up(spec, state_dsn)
    with psycopg.connect(sink.location, autocommit=True) as conn:  # rejects a row of a late chunk
        conn.execute("ALTER TABLE replica.items ADD CONSTRAINT not_yet CHECK (id <> 4900)")
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.items SELECT g, 0, 'new', NULL FROM generate_series(1000, 4999) g")
        conn.execute("UPDATE public.items SET counter = 5")
    with pytest.raises(SinkError, match="not_yet"):
        run_caught_up(spec, state_dsn)
    assert sink_rows(sink, "public.items", ["id", "counter"], "id") == [(i, 0) for i in range(1, 201)]
    with psycopg.connect(sink.location, autocommit=True) as conn:
        conn.execute("ALTER TABLE replica.items DROP CONSTRAINT not_yet")
    assert run_caught_up(spec, state_dsn).stats.chunked_transactions == 1
    assert_exact(env, sink)


def test_alter_table_inside_a_big_transaction(env: str, state_dsn: str, sink: SinkTarget) -> None:
    spec = spec_of(sink)
    run_caught_up(spec, state_dsn)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.items SELECT g, 0, 'before', NULL FROM generate_series(1000, 3999) g")
        conn.execute("ALTER TABLE public.items ADD COLUMN note text DEFAULT 'the default'")  # older rows read it
        conn.execute("INSERT INTO public.items SELECT g, 0, 'after', 'n' || g FROM generate_series(4000, 6999) g")
        conn.execute("UPDATE public.items SET note = 'set later', counter = 2 WHERE id % 2 = 0")
        conn.execute("DELETE FROM public.items WHERE id % 7 = 0")
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 1
    assert_exact(env, sink, {"public.items": (["id", "counter", "label", "payload", "note"], "id")})


def test_pause_holds_a_table_the_transaction_wrote_before_the_ddl(
    env: str, state_dsn: str, sink: SinkTarget
) -> None:
    """Under `pause` the table gets none of the transaction (also not what was spilled before the
    DDL); the other tables get all of it; after approval the replay gives the table all of it."""
    spec = spec_of(sink, "pause")
    run_caught_up(spec, state_dsn)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.items SELECT g, 0, 'before', NULL FROM generate_series(1000, 3999) g")
        conn.execute("INSERT INTO public.tags SELECT g, 'in the transaction' FROM generate_series(1000, 3999) g")
        conn.execute("UPDATE public.items SET counter = 1 WHERE id < 3000")
        conn.execute("ALTER TABLE public.items ADD COLUMN note text DEFAULT 'the default'")
        conn.execute("INSERT INTO public.items SELECT g, 0, 'after', 'n' || g FROM generate_series(4000, 5999) g")
        conn.execute("UPDATE public.tags SET tag = 'updated' WHERE id % 3 = 0")
        conn.execute("INSERT INTO public.loose SELECT g % 5, 'x' FROM generate_series(1, 2000) g")
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 1
    with StateStore(state_dsn).open() as store:
        state = store.get_pipeline_state("acme", "bigtx")
        assert state is not None and state.state == "pending_schema_approval"
        assert state.detail["table"] == "public.items"
        assert sink_rows(sink, "public.items", ["id", "counter", "label"], "id") == [(i, 0, "snap")
                                                                                   for i in range(1, 201)]
        assert_exact(env, sink, {t: TABLES[t] for t in ("public.tags", "public.loose")})
        approve_schema_change(store, cdc_config(spec, spec.pipelines[0]).key)
    assert run_caught_up(spec, state_dsn).stats.chunked_transactions == 1  # replayed for the held table
    assert_exact(env, sink, {**TABLES, "public.items": (["id", "counter", "label", "payload", "note"], "id")})


@pytest.mark.parametrize("ddl", [False, True], ids=["plain", "add-column-inside"])
def test_sigkill_while_spilling_then_the_next_run_is_exact(
    env: str, state_dsn: str, sink: SinkTarget, ddl: bool
) -> None:
    """Killed while the transaction streams into its spill file: nothing of it reached the sink
    (with `ddl`, an ADD COLUMN ... DEFAULT inside it may have reached the sink table already)."""
    spec = spec_of(sink, batch_max_rows=1000)
    run_caught_up(spec, state_dsn)
    before = checkpoint_lsn(sink)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        if ddl:
            conn.execute("INSERT INTO public.items SELECT g, 0, 'before', NULL FROM generate_series(900000, 905999) g")
            conn.execute("ALTER TABLE public.items ADD COLUMN note text DEFAULT 'the default'")
        big_transaction(conn, 1000, 60_000)
        before_commit = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    worker = subprocess.Popen([sys.executable, str(WORKER), json.dumps(raw_spec(sink, batch_max_rows=1000)), "bigtx"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_spill_file(worker)
        time.sleep(random.uniform(0.0, 0.3))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert before <= checkpoint_lsn(sink) < before_commit, "killed after the transaction committed: nothing tested"
    assert_same_rows([], sink_rows(sink, "public.loose", ["a", "b"], "a"))
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 1
    items = (["id", "counter", "label", "payload", *(["note"] if ddl else [])], "id")
    assert_exact(env, sink, {**TABLES, "public.items": items})


def wait_for_spill_file(worker: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Until the worker holds its (unlinked) spill file open: a transaction is being spilled."""
    deadline = time.monotonic() + timeout_s
    fds = Path(f"/proc/{worker.pid}/fd")
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.stderr.read().decode()[-3000:] if worker.stderr else ""
        try:
            if any("nilus-spill-" in os.readlink(fd) for fd in fds.iterdir()):
                return
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    raise AssertionError("the worker never spilled the transaction")


def test_sigkill_mid_transaction_then_the_next_run_is_exact(env: str, state_dsn: str, sink: SinkTarget) -> None:
    spec = spec_of(sink, batch_max_rows=1000)
    run_caught_up(spec, state_dsn)
    before = checkpoint_lsn(sink)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        big_transaction(conn, 1000, 20_000)
        before_commit = parse_lsn(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    worker = subprocess.Popen([sys.executable, str(WORKER), json.dumps(raw_spec(sink, batch_max_rows=1000)), "bigtx"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_open_sink_transaction(sink, worker)
        time.sleep(random.uniform(0.0, 0.5))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert before <= checkpoint_lsn(sink) < before_commit, "killed after the transaction committed: nothing tested"
    assert_same_rows([], sink_rows(sink, "public.loose", ["a", "b"], "a"))  # nothing of it is visible
    stats = run_caught_up(spec, state_dsn).stats
    assert stats.chunked_transactions == 1
    assert_exact(env, sink)


def wait_for_open_sink_transaction(sink: SinkTarget, worker: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    """Until the worker holds a sink transaction that has written (PostgreSQL), or holds the DuckDB
    file for a while (it only keeps it open across calls for a transaction applied in chunks)."""
    deadline = time.monotonic() + timeout_s
    held_since: float | None = None
    while time.monotonic() < deadline:
        assert worker.poll() is None, worker.stderr.read().decode()[-3000:] if worker.stderr else ""
        if sink.kind == "postgres":
            with psycopg.connect(sink.location, autocommit=True) as conn:
                writing = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                       "AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()").fetchone()[0]
            if writing:
                return
        else:
            try:
                duckdb.connect(sink.location, read_only=True).close()
                held_since = None
            except duckdb.IOException:
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 0.3:
                    return
        time.sleep(0.05)
    raise AssertionError("the worker never opened a sink transaction")
