"""Staying up through blips before streaming: a source that is down while the run connects, and a
connection cut in the middle of the initial snapshot, are outlived by the SAME run (within
`retry_for`), which then snapshots (resuming the interrupted copy) and streams; sink == source.
"""

from __future__ import annotations

from pathlib import Path

import copy_gate
import pytest
from blips_harness import (
    COLUMNS,
    RECOVER_S,
    duckdb_rows_in_process,
    in_sink,
    make_table,
    pg_port,
    start_run,
    streaming,
    wait_until,
    write,
)
from fault_proxy import FaultProxy
from table_compare import assert_same_rows, source_rows
from test_cdc_blips import _stop_runs, store  # noqa: F401 - fixtures: stop left-over runs, a state store

import nilus_dagster.cdc.snapshot as snapshot_module
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.state.store import StateStore


def test_run_waits_out_a_source_that_is_down_while_it_sets_up(
    source_db: str, store: StateStore, duckdb_path: Path  # noqa: F811 - the imported fixture
) -> None:
    make_table(source_db)
    read = lambda: duckdb_rows_in_process(duckdb_path)  # noqa: E731
    with FaultProxy("127.0.0.1", pg_port(source_db)).start() as proxy:
        proxy.refuse()
        live = start_run(proxy.dsn(source_db), DuckDBSink(duckdb_path), store, "setupblip")
        wait_until(lambda: any(p.fault and p.phase == "setup" for _, p in live.progress), 20,
                   "the run to report the fault while setting up")
        assert live.thread.is_alive() and live.error is None
        proxy.refuse(False)
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot after the outage")
        write(source_db, 1000, 20)
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the outage")
        assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_a_cut_mid_snapshot_resumes_the_snapshot_in_the_same_run(
    source_db: str, store: StateStore, duckdb_path: Path, tmp_path: Path,  # noqa: F811 - the imported fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_table(source_db, rows=2000)
    monkeypatch.setattr(snapshot_module, "read_table", snapshot_module.read_table)  # undone after the test
    copy_gate.install(tmp_path, "public.t")
    read = lambda: duckdb_rows_in_process(duckdb_path)  # noqa: E731
    with FaultProxy("127.0.0.1", pg_port(source_db)).start() as proxy:
        live = start_run(proxy.dsn(source_db), DuckDBSink(duckdb_path), store, "snapblip")
        wait_until(lambda: copy_gate.reached(tmp_path), 30, "the snapshot to start copying")
        proxy.cut()  # the copy's connection and the slot's exported snapshot are gone
        copy_gate.release(tmp_path)
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot after the cut")
        assert any(p.fault and p.phase == "snapshot" for _, p in live.progress), "the fault was not reported"
        write(source_db, 5000, 20)
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the cut")
        assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())
