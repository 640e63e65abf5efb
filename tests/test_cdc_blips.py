"""Staying up through blips: the live run survives source, network, sink and state-store faults.

Each test runs one CDC run in a thread, its source (or sink, or state store) reached through a
loopback `FaultProxy`, injects a fault while the run streams, makes changes after the fault, and
asserts that the SAME run applies them within a bound, that its lag rose during the stall and fell
after, and that the sink equals the source row by row at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from blips_harness import (
    COLUMNS,
    RECOVER_S,
    RUNS,
    duckdb_rows_in_process,
    in_sink,
    make_table,
    open_test_sink,
    outage,
    pg_port,
    start_run,
    streaming,
    wait_until,
    write,
)
from fault_proxy import FaultProxy
from table_compare import assert_same_rows, postgres_sink_rows, source_rows

from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.embedded.postgres import BIN_DIR, EmbeddedPostgres
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.store import StateStore


@pytest.fixture(autouse=True)
def _stop_runs() -> Iterator[None]:
    """A failed test does not leave its run streaming."""
    yield
    while RUNS:
        live = RUNS.pop()
        live.stop.set()
        live.thread.join(timeout=30)


@pytest.fixture(params=["duckdb", "postgres"])
def sink_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store(state_dsn: str) -> Iterator[StateStore]:
    with StateStore(state_dsn).open() as opened:
        yield opened


def test_run_survives_cut_replication_connections(
    source_db: str, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", int(source_db.rsplit(":", 1)[1].split("/")[0])).start() as proxy:
        live = start_run(proxy.dsn(source_db), sink, store, "cut")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        wait_until(lambda: store.last_heartbeat("acme", "cut").detail["phase"] == "streaming", 5,
                   "the heartbeat to say streaming")
        for round_ in range(2):  # two cuts: each is a new fault with the whole budget
            proxy.cut()
            write(source_db, 1000 + 100 * round_, 20)
            took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the cut")
            assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 2
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_run_survives_a_frozen_connection_and_lag_shows_the_stall(
    source_db: str, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", int(source_db.rsplit(":", 1)[1].split("/")[0])).start() as proxy:
        live = start_run(proxy.dsn(source_db), sink, store, "freeze", dead_after_s=3.0)
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        time.sleep(1.5)
        frozen_at = time.monotonic()
        proxy.freeze()
        write(source_db, 1000, 20)  # straight to the server: only the run's connections are frozen
        time.sleep(6)
        assert max(live.lag_since(frozen_at)) >= 3.0, "the lag did not rise while the connection was frozen"
        proxy.thaw()
        thawed_at = time.monotonic()
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the freeze")
        assert took < RECOVER_S
        wait_until(lambda: live.lag_since(thawed_at + took)[-1:] == [0.0], 15, "the lag to fall back to 0")
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A cluster of this test's own, which it may restart."""
    cluster = EmbeddedPostgres(tmp_path / "own-pg").start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_run_survives_a_source_restart(
    own_cluster: EmbeddedPostgres, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    with psycopg.connect(own_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE src")
    source = own_cluster.dsn("src")
    make_table(source)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    live = start_run(source, sink, store, "restart")
    wait_until(lambda: streaming(live) and in_sink(read, source)(), 30, "the snapshot to stream")
    import subprocess

    subprocess.run([str(BIN_DIR / "pg_ctl"), "-D", str(own_cluster.pgdata), "-w", "-m", "fast", "-l",
                    str(own_cluster.pgdata / "server.log"), "restart"], check=True, capture_output=True,
                   **({"user": "pgserver"} if own_cluster._run_as else {}))
    write(source, 1000, 20)
    took = wait_until(in_sink(read, source), RECOVER_S, "changes after the restart")
    assert took < RECOVER_S
    assert live.thread.is_alive() and live.run.reconnects >= 1
    live.finish()
    assert_same_rows(source_rows(source, "public.t", COLUMNS, "id"), read())


def test_run_survives_a_postgres_sink_outage(source_db: str, store: StateStore, sink_pg: str) -> None:
    make_table(source_db)
    with FaultProxy("127.0.0.1", pg_port(sink_pg)).start() as proxy:
        sink = PostgresSink(proxy.dsn(sink_pg))
        read = lambda: postgres_sink_rows(sink_pg, "replica.t", COLUMNS, "id")  # noqa: E731 - not through the proxy
        live = start_run(source_db, sink, store, "sinkdown")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        outage(proxy)
        down_at = time.monotonic()
        write(source_db, 1000, 20)
        time.sleep(4)
        assert max(live.lag_since(down_at)) >= 2.0, "the lag did not rise while the sink was down"
        assert live.thread.is_alive() and read() != source_rows(source_db, "public.t", COLUMNS, "id")
        proxy.refuse(False)
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the sink came back")
        assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_data_keeps_flowing_while_the_state_store_is_down(
    source_db: str, state_dsn: str, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", pg_port(state_dsn)).start() as proxy, StateStore(proxy.dsn(state_dsn)).open() as store:
        live = start_run(source_db, sink, store, "storedown")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        outage(proxy)
        down_at = datetime.now(UTC)
        write(source_db, 1000, 20)
        took = wait_until(in_sink(read, source_db), 10, "changes while the state store is down")
        assert took < 10
        write(source_db, 2000, 20)
        wait_until(in_sink(read, source_db), 10, "more changes while the state store is down")
        with StateStore(state_dsn).open() as direct:
            beat = direct.last_heartbeat("acme", "storedown")
            assert beat is not None and beat.beat_at < down_at + timedelta(seconds=1)  # none got through meanwhile
            proxy.refuse(False)
            back_at = datetime.now(UTC)
            wait_until(lambda: direct.last_heartbeat("acme", "storedown").beat_at > back_at, 40,
                       "heartbeats after the state store came back")
        assert live.thread.is_alive() and live.run.reconnects == 0
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_a_fault_longer_than_retry_for_fails_the_run_and_a_lost_slot_fails_it_at_once(
    source_db: str, store: StateStore, duckdb_path: Path
) -> None:
    make_table(source_db)
    with FaultProxy("127.0.0.1", pg_port(source_db)).start() as proxy:
        sink = DuckDBSink(duckdb_path)  # any sink: the source is what fails
        live = start_run(proxy.dsn(source_db), sink, store, "budget", retry_for_s=3.0)
        wait_until(lambda: streaming(live), 30, "the run to stream")
        outage(proxy)
        began = time.monotonic()
        live.thread.join(timeout=20)
        assert not live.thread.is_alive() and time.monotonic() - began < 15
        assert "could not recover within retry_for (3s)" in str(live.error)

        proxy.refuse(False)
        second = start_run(proxy.dsn(source_db), sink, store, "lostslot")
        wait_until(lambda: streaming(second), 30, "the second run to stream")
        outage(proxy)
        with psycopg.connect(source_db, autocommit=True) as conn:  # not through the proxy
            slot = second.run.slot
            wait_until(lambda: conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,)) is not None, 10,
                       "the slot to be dropped")
        proxy.refuse(False)
        began = time.monotonic()
        second.thread.join(timeout=10)
        assert not second.thread.is_alive() and time.monotonic() - began < 5, "a lost slot is not retried"
        assert "does not exist" in str(second.error) or "dropped" in str(second.error)


def test_run_survives_a_duckdb_file_locked_by_another_process(
    source_db: str, store: StateStore, duckdb_path: Path
) -> None:
    """The sink waits for the lock (never acknowledging the slot past what is durable); the run's
    first report after it shows the lag of the stall and the outage in `sink_errors_total`."""
    import subprocess

    make_table(source_db)
    live = start_run(source_db, DuckDBSink(duckdb_path), store, "locked")
    read = lambda: duckdb_rows_in_process(duckdb_path)  # noqa: E731
    wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
    holder = subprocess.Popen(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", f"import duckdb, sys, time; c = duckdb.connect({str(duckdb_path)!r}); "
         "print('locked', flush=True); time.sleep(6)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    locked_at = time.monotonic()
    with psycopg.connect(source_db, autocommit=True) as conn:
        before_writes = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
        write(source_db, 1000, 20)
        time.sleep(2)  # the run holds these changes, waiting for the file
        confirmed = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                 (live.run.slot,)).fetchone()[0]
    assert parse_lsn(confirmed) <= before_writes, "the slot was acknowledged past what the sink holds"
    holder.wait(timeout=30)
    took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the lock was released")
    assert took < RECOVER_S
    assert max(live.lag_since(locked_at)) >= 4.0, "the stall did not show in the lag"
    wait_until(lambda: live.lag_since(locked_at)[-1] == 0.0, 15, "the lag to fall back to 0")
    assert max(p.sink_errors_total for _, p in live.progress) >= 1, "the outage did not show"
    assert live.thread.is_alive()
    live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())
