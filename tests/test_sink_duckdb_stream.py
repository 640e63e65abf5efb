"""DuckDBSink.stream_session: the file stays open between a stream's calls, and is let go when the
stream is idle, after holding it a while, and at the end, so another process gets its turn."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from sink_cases import SIMPLE, TARGET, batches_of

from nilus_dagster.sinks import SinkError, WriteStrategy
from nilus_dagster.sinks import duckdb as duckdb_sink
from nilus_dagster.sinks.duckdb import DuckDBSink


def other_process_opens(path: Path) -> bool:
    """Whether another process can open the file for writing right now."""
    code = f"import duckdb\ntry:\n    duckdb.connect({str(path)!r}).close()\nexcept duckdb.IOException:\n    raise SystemExit(3)"
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0  # noqa: S603 - our interpreter


def rows(path: Path) -> list[tuple]:
    with duckdb.connect(str(path)) as conn:  # in-process: shares the sink's open database
        return conn.execute(f"SELECT * FROM {TARGET.qualified} ORDER BY 1").fetchall()


def test_kept_between_calls_released_when_idle_and_at_the_end(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path, lock_timeout_s=0.5)
    with sink.stream_session():
        sink.prepare_table(TARGET, SIMPLE)
        kept = sink._session
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1, "name": "a"}]), WriteStrategy.APPEND)
        assert sink._session is kept is not None  # one connection for both calls
        assert rows(duckdb_path) == [(1, "a", None)]  # each call committed
        assert not other_process_opens(duckdb_path)  # held: DuckDB has one writing process
        sink.release_idle()
        assert other_process_opens(duckdb_path)
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 2, "name": "b"}]), WriteStrategy.APPEND)
        assert sink._session is not None and sink._session is not kept  # opened again when needed
    assert sink._session is None and other_process_opens(duckdb_path)
    assert rows(duckdb_path) == [(1, "a", None), (2, "b", None)]


def test_let_go_after_holding_the_file_a_while(duckdb_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = DuckDBSink(duckdb_path)
    monkeypatch.setattr(duckdb_sink, "_HOLD_MAX_S", 0.2)
    with sink.stream_session():
        sink.prepare_table(TARGET, SIMPLE)
        assert sink._session is not None
        time.sleep(0.3)
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1, "name": "a"}]), WriteStrategy.APPEND)
        assert sink._session is None  # released after the commit: a waiting process gets the file
        assert other_process_opens(duckdb_path)


def test_a_failed_call_releases_the_kept_connection(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    with sink.stream_session():
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1, "name": "a"}]), WriteStrategy.APPEND)
        with pytest.raises(SinkError):  # a duplicate key: the transaction rolls back
            sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1, "name": "b"}]), WriteStrategy.APPEND)
        assert sink._session is None
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 2, "name": "b"}]), WriteStrategy.APPEND)
    assert rows(duckdb_path) == [(1, "a", None), (2, "b", None)]


def test_other_threads_and_change_transactions_inside(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    with sink.stream_session():
        sink.prepare_table(TARGET, SIMPLE)
        with sink.change_transaction():
            sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1, "name": "a"}]), WriteStrategy.APPEND)
            sink.release_idle()  # not inside an open transaction
            assert sink._session is not None
            sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 2, "name": "b"}]), WriteStrategy.APPEND)
        assert sink._session is not None  # still kept for the stream
    assert rows(duckdb_path) == [(1, "a", None), (2, "b", None)]
