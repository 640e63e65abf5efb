"""DuckDBSink against real DuckDB files: the shared sink contract plus the single-writer rules."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from sink_cases import SIMPLE, TARGET, SinkContract, SinkHarness, batches_of, col

from nilus_dagster.sinks import Checkpoint, SinkError, SinkTable, WriteStrategy
from nilus_dagster.sinks.duckdb import DuckDBSink


def fetch_duckdb(path: Path, target: SinkTable, order_by: str) -> list[dict[str, Any]]:
    conn = duckdb.connect(str(path))
    try:
        conn.execute("SET TimeZone = 'UTC'")
        query = f'SELECT * FROM "{target.dataset}"."{target.name}" ORDER BY "{order_by}"'
        return conn.sql(query).to_arrow_table().to_pylist()
    finally:
        conn.close()


class TestDuckDBSink(SinkContract):
    @pytest.fixture
    def harness(self, duckdb_path: Path, tmp_path: Path) -> SinkHarness:
        not_a_folder = tmp_path / "a_file"
        not_a_folder.write_text("")
        return SinkHarness(
            make=lambda: DuckDBSink(duckdb_path),
            fetch=lambda target, order_by: fetch_duckdb(duckdb_path, target, order_by),
            unsupported=col("huge", "decimal", precision=50, scale=2),
            unreachable=lambda: DuckDBSink(not_a_folder / "s3cret" / "w.duckdb"),
        )

    def test_unreachable_sink_names_it_without_password(self, harness: SinkHarness) -> None:
        """A path is no secret; the message must name it."""
        with pytest.raises(SinkError, match="duckdb sink .*w.duckdb"):
            harness.unreachable().prepare_table(TARGET, SIMPLE)

    def test_read_checkpoint_does_not_create_the_file(self, duckdb_path: Path) -> None:
        assert DuckDBSink(duckdb_path).read_checkpoint("k") is None
        assert not duckdb_path.exists()


# -- two processes, one file ---------------------------------------------------------------------

WRITES_PER_PROCESS = 15
ROWS_PER_WRITE = 500


def _slow_batches(first_id: int) -> Iterator[pa.RecordBatch]:
    rows = [{"id": first_id + i, "name": f"w{first_id}", "qty": i} for i in range(ROWS_PER_WRITE)]
    for batch in batches_of(SIMPLE, rows, size=100):
        time.sleep(0.01)  # keep the transaction (and the file lock) open a little while
        yield batch


def _writer(path: str, process_no: int) -> None:
    sink = DuckDBSink(path, lock_timeout_s=120)
    sink.prepare_table(TARGET, SIMPLE)
    for n in range(WRITES_PER_PROCESS):
        first_id = (process_no * WRITES_PER_PROCESS + n) * ROWS_PER_WRITE
        sink.write(
            TARGET,
            SIMPLE,
            _slow_batches(first_id),
            WriteStrategy.APPEND,
            Checkpoint(f"writer-{process_no}", str(n)),
        )


def test_two_processes_write_one_file(duckdb_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(duckdb_path), n)) for n in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0]

    rows = fetch_duckdb(duckdb_path, TARGET, "id")
    assert [r["id"] for r in rows] == list(range(2 * WRITES_PER_PROCESS * ROWS_PER_WRITE))
    sink = DuckDBSink(duckdb_path)
    assert sink.read_checkpoint("writer-0") == sink.read_checkpoint("writer-1") == str(WRITES_PER_PROCESS - 1)


def test_lock_held_too_long_is_a_clear_error(duckdb_path: Path) -> None:
    DuckDBSink(duckdb_path).prepare_table(TARGET, SIMPLE)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(duckdb_path)!r}); "
            "print('held', flush=True); time.sleep(3)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(SinkError, match="locked by another process"):
            DuckDBSink(duckdb_path, lock_timeout_s=0.5).prepare_table(TARGET, SIMPLE)
        assert time.monotonic() - started < 4
        # A patient sink gets the file once the other process lets go.
        DuckDBSink(duckdb_path, lock_timeout_s=30).write(
            TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 1}]), WriteStrategy.APPEND
        )
    finally:
        holder.kill()
        holder.wait()
    assert [r["id"] for r in fetch_duckdb(duckdb_path, TARGET, "id")] == [1]
