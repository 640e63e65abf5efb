"""Network partitions and a stopped sink server, beside the blip suite (tests/test_cdc_blips.py):

* the replication connection slowed down (latency on every chunk), then partitioned for longer than
  the server's `wal_sender_timeout`, so the server ends the walsender while the client still sees an
  open socket; the run recovers by itself;
* the PostgreSQL sink server stopped for ~15 s (a minute in production terms, short in CI); the run
  waits and retries, never acknowledging the slot past what the sink holds.

Each ends with sink == source row by row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from blips_harness import COLUMNS, RECOVER_S, in_sink, make_table, pg_port, start_run, streaming, wait_until, write
from fault_proxy import FaultProxy
from table_compare import assert_same_rows, postgres_sink_rows, source_rows
from test_cdc_blips import _stop_runs  # noqa: F401 - fixture: stop left-over runs

from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.embedded.postgres import EmbeddedPostgres
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.store import StateStore

WAL_SENDER_TIMEOUT_MS = 2000
SINK_DOWN_S = 15


def walsenders(dsn: str, slot: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active", (slot,))
        return [r[0] for r in rows.fetchall()]


def test_a_slow_link_then_a_partition_longer_than_wal_sender_timeout(
    source_db: str, store: StateStore, sink_pg: str
) -> None:
    make_table(source_db)
    read = lambda: postgres_sink_rows(sink_pg, "replica.t", COLUMNS, "id")  # noqa: E731
    with FaultProxy("127.0.0.1", pg_port(source_db)).start() as proxy:
        # the server's timeout for this pipeline's connections only (settable per connection)
        through = proxy.dsn(source_db) + f"?options=-c%20wal_sender_timeout%3D{WAL_SENDER_TIMEOUT_MS}"
        # the client's own dead-link detection far later: the server's timeout must end this one
        live = start_run(through, PostgresSink(sink_pg), store, "partition", dead_after_s=60.0)
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 60, "the snapshot to stream")
        proxy.delay_s = 0.05  # a slow link: every chunk each way waits
        write(source_db, 1000, 20)
        wait_until(in_sink(read, source_db), RECOVER_S, "changes over the slow link")
        proxy.delay_s = 0.0
        [before] = walsenders(source_db, live.run.slot)
        proxy.freeze()
        write(source_db, 2000, 20)
        wait_until(lambda: before not in walsenders(source_db, live.run.slot), 15,
                   "the server to end its walsender (wal_sender_timeout)")
        proxy.thaw()
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the partition")
        assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


@pytest.fixture
def sink_cluster(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A sink server of this test's own, which it stops and starts."""
    cluster = EmbeddedPostgres(tmp_path / "sink-pg").start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def pg_ctl(cluster: EmbeddedPostgres, action: str) -> None:
    cluster._run("pg_ctl", "-D", str(cluster.pgdata), "-w", "-m", "fast", "-l",  # noqa: SLF001 - as its user
                 str(cluster.pgdata / "server.log"), action)


def test_the_postgres_sink_server_stopped_then_started(
    source_db: str, store: StateStore, sink_cluster: EmbeddedPostgres
) -> None:
    make_table(source_db)
    sink_dsn = sink_cluster.dsn()
    read = lambda: postgres_sink_rows(sink_dsn, "replica.t", COLUMNS, "id")  # noqa: E731
    live = start_run(source_db, PostgresSink(sink_dsn), store, "sinkstop")
    wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 60, "the snapshot to stream")
    with psycopg.connect(source_db, autocommit=True) as conn:
        before_writes = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    pg_ctl(sink_cluster, "stop")
    write(source_db, 1000, 20)
    time.sleep(SINK_DOWN_S)
    with psycopg.connect(source_db, autocommit=True) as conn:
        confirmed = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                 (live.run.slot,)).fetchone()[0]
    assert parse_lsn(confirmed) <= before_writes, "the slot was acknowledged past what the sink holds"
    assert live.thread.is_alive(), "the run gave up during the outage"
    pg_ctl(sink_cluster, "start")
    took = wait_until(in_sink(read, source_db), RECOVER_S + 10, "changes after the sink came back")
    assert took < RECOVER_S + 10
    assert max(p.sink_errors_total for _, p in live.progress) >= 1, "the outage did not show"
    live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())
