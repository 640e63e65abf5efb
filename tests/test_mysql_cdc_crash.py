"""SIGKILL a binlog CDC worker (MariaDB → PostgreSQL sink) at start-up and mid-stream while the
source keeps changing; after a clean restart the sink equals the source row by
row: nothing lost, nothing applied twice."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from mysql_cdc_harness import assert_replica_matches, execute, mysql_connect
from table_compare import postgres_sink_rows
from test_cdc_crash import finish_worker, start_worker, wait_for

from nilus_dagster.state.store import StateStore

COLUMNS = ["id", "counter", "label", "updated_at"]


@pytest.fixture
def source(mysql_source_db: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    execute(
        mysql_source_db,
        "SET GLOBAL binlog_row_metadata = 'FULL'",
        "CREATE TABLE items (id INT PRIMARY KEY, counter INT NOT NULL, label VARCHAR(60), updated_at DATETIME(6))",
        "INSERT INTO items SELECT seq, 0, REPEAT('x', 50), NOW(6) FROM seq_1_to_3000",
    )
    monkeypatch.setenv("MYSQL_SOURCE_DSN", mysql_source_db)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    return mysql_source_db


def churn(dsn: str, stop: threading.Event) -> None:
    """Many small transactions: inserts, increments, deletes and key changes."""
    next_id = 100_000
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        while not stop.is_set():
            cursor.execute("BEGIN")
            cursor.execute(f"INSERT INTO items SELECT {next_id} + seq, 0, 'new', NOW(6) FROM seq_0_to_9")
            cursor.execute(f"UPDATE items SET counter = counter + 1, updated_at = NOW(6) WHERE id % 97 = {next_id % 97}")
            cursor.execute(f"DELETE FROM items WHERE id = {next_id - 35}")
            cursor.execute(f"UPDATE items SET id = id + 1000000 WHERE id = {next_id - 20}")
            cursor.execute("COMMIT")
            next_id += 10
            time.sleep(0.005)


def test_sigkill_at_start_and_mid_stream_loses_and_doubles_nothing(
    source: str, sink_pg: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINK_DSN", sink_pg)
    pipeline = {
        "name": "crashy", "tenant": "acme", "type": "cdc",
        "source": {"connection": "src", "tables": [f"{source.rsplit('/', 1)[1]}.items"]},
        "sink": {"connection": "sink", "dataset": "replica"},
        "cdc": {"batch_max_ms": 100, "batch_max_rows": 200},
    }
    spec = json.dumps({"connections": {"src": {"type": "mysql", "dsn_env": "MYSQL_SOURCE_DSN"},
                                       "sink": {"type": "postgres", "dsn_env": "SINK_DSN"}},
                       "pipelines": [pipeline]})
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(source, stop))
    writer.start()
    rng = random.Random(16)
    try:
        worker = start_worker(spec)  # killed early: while it starts (setup, or the snapshot if it got there)
        time.sleep(rng.uniform(0.3, 1.5))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        with StateStore(state_dsn).open() as store:
            worker = start_worker(spec)  # then mid-stream, changes still arriving
            first = store.latest_offset("acme", "crashy")
            wait_for(lambda: store.latest_offset("acme", "crashy") != first, 120, "streamed batches to commit")
            time.sleep(rng.uniform(0.2, 1.0))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
    finally:
        stop.set()
        writer.join()
        if worker.poll() is None:
            worker.kill()
    finish_worker(spec)
    assert len(postgres_sink_rows(sink_pg, "replica.items", ["id"], "id")) > 3000  # the stream added rows
    assert_replica_matches(source, sink_pg, "items", COLUMNS, "id", sink="postgres")


def test_sigkill_mid_snapshot_keeps_the_tables_written(source: str, duckdb_path: Path, state_dsn: str) -> None:
    """Killed after the first table's snapshot committed and while the second one's is read: the
    restart keeps the first (its checkpoint), snapshots the second, and streams both exactly."""
    from nilus_dagster.sinks.factory import open_sink
    from nilus_dagster.spec.connections import DuckDBConnection

    execute(source, "CREATE TABLE big (id INT PRIMARY KEY, pad VARCHAR(200))",
            "INSERT INTO big SELECT seq, REPEAT('p', 200) FROM seq_1_to_120000")
    database = source.rsplit("/", 1)[1]
    pipeline = {
        "name": "crashy", "tenant": "acme", "type": "cdc",
        "source": {"connection": "src", "tables": [f"{database}.items", f"{database}.big"]},
        "sink": {"connection": "sink", "dataset": "replica"},
        "cdc": {"batch_max_ms": 100},
    }
    spec = json.dumps({"connections": {"src": {"type": "mysql", "dsn_env": "MYSQL_SOURCE_DSN"},
                                       "sink": {"type": "duckdb", "path": str(duckdb_path)}},
                       "pipelines": [pipeline]})
    worker = start_worker(spec)
    try:
        with StateStore(state_dsn).open() as store:

            def first_table_written() -> bool:
                beat = store.last_heartbeat("acme", "crashy")
                return beat is not None and beat.detail.get("snapshot_partitions_done") == 1

            wait_for(first_table_written, 120, "the first table's snapshot to commit")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    sink = open_sink("sink", DuckDBConnection(type="duckdb", path=str(duckdb_path)), dataset="replica")
    try:
        assert sink.read_checkpoint(f"acme/crashy/{database}.items") is not None
        assert sink.read_checkpoint(f"acme/crashy/{database}.big") is None  # killed while it was read
    finally:
        sink.close()
    execute(source, "UPDATE items SET counter = 5 WHERE id < 100", "DELETE FROM big WHERE id % 1000 = 0")
    finish_worker(spec)
    assert_replica_matches(source, duckdb_path, "items", COLUMNS, "id")
    assert_replica_matches(source, duckdb_path, "big", ["id", "pad"], "id")
