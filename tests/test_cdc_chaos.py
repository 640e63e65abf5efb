"""Chaos the blip and crash suites do not cover: the source restarted (fast and immediate shutdown)
in the middle of the initial snapshot. The run reconnects or fails; either way the next run
resumes, and the sink equals the source row by row (a keyed and a keyless table)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from batch_project import SinkTarget, sink_target
from test_cdc_crash import finish_worker, start_worker, wait_for
from test_cdc_resync import assert_exact, create_tables, spec_dict

from nilus_dagster.embedded.postgres import BIN_DIR, EmbeddedPostgres
from nilus_dagster.state.store import StateStore


@pytest.fixture
def own_source(tmp_path: Path, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedPostgres]:
    """A source cluster of this test's own (it restarts it); the pipeline reads SOURCE_DSN."""
    cluster = EmbeddedPostgres(tmp_path / "own-pg").start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE src")
        monkeypatch.setenv("SOURCE_DSN", cluster.dsn("src"))
        monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
        yield cluster
    finally:
        cluster.destroy()


def restart(cluster: EmbeddedPostgres, mode: str) -> None:
    user = {"user": "pgserver"} if cluster._run_as else {}  # noqa: SLF001 - the cluster runs as this user
    subprocess.run(  # noqa: S603 - the bundled pg_ctl
        [str(BIN_DIR / "pg_ctl"), "-D", str(cluster.pgdata), "-w", "-m", mode, "-l",
         str(cluster.pgdata / "server.log"), "restart"],
        check=True, capture_output=True, **user,
    )


@pytest.mark.parametrize(("mode", "sink_kind"), [("fast", "duckdb"), ("immediate", "postgres")])
def test_source_restart_mid_snapshot_then_the_next_run_resumes_exactly(
    own_source: EmbeddedPostgres, state_dsn: str, mode: str, sink_kind: str, duckdb_path: Path, sink_pg: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = own_source.dsn("src")
    sink: SinkTarget = sink_target(sink_kind, duckdb_path, sink_pg, monkeypatch)
    create_tables(source, 30_000, 2_000)
    spec = json.dumps(spec_dict(sink, snapshot_partition_blocks=8, snapshot_workers=2))
    worker = start_worker(spec, "caught_up")
    with StateStore(state_dsn).open() as store:

        def some_partitions_done() -> bool:
            return sum(p.partitions_done for p in store.snapshot_progress("acme", "crashy")) >= 2

        wait_for(lambda: some_partitions_done() or worker.poll() is not None, 120, "the snapshot to progress")
        assert worker.poll() is None, "the snapshot ended before the restart"
        with psycopg.connect(source, autocommit=True) as conn:  # changes during the snapshot
            conn.execute("UPDATE public.items SET counter = counter + 1 WHERE id % 13 = 0")
            conn.execute("DELETE FROM public.notes WHERE note_id % 9 = 0")
        restart(own_source, mode)
        done = sum(p.partitions_done for p in store.snapshot_progress("acme", "crashy"))
        total = sum(p.partitions_total for p in store.snapshot_progress("acme", "crashy"))
    assert done < total, "the restart came after the snapshot"
    worker.communicate(timeout=300)  # it reconnected and caught up, or failed: the next run resumes
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("INSERT INTO public.items SELECT g, 0, 'after', now() FROM generate_series(90001, 90100) g")
        conn.execute("UPDATE public.notes SET n = n + 1 WHERE note_id % 5 = 0")
    finish_worker(spec)
    assert_exact(source, sink)
