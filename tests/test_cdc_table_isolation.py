"""Per-table isolation: one table whose sink apply keeps failing is held `failed`, the others keep
flowing, and once fixed it continues exactly from its checkpoint.

A live run (in a thread of this process) streams `public.items` and `public.notes` (keyless).
Mid-stream the sink table of items goes away (renamed: it can be restored with its rows), or, on
PostgreSQL, the sink role loses its privileges on it. Notes must keep reaching the sink, items must
be reported failed with the reason (state store, heartbeat), the slot must stay at or before
items's checkpoint, and after the fix and a retry (or a resync) both tables equal the source row
by row.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from blips_harness import COLUMNS, make_table, start_run, streaming, wait_until, write
from blips_harness import in_sink as pipeline_in_sink
from cdc_project import cdc_project
from table_compare import postgres_sink_rows, source_rows
from test_cdc_crash import finish_worker, wait_for
from test_cdc_live_resync import ITEMS_TABLE, LiveRun, _beat, in_sink, live_run, pipeline_config
from test_cdc_resync import NOTES, assert_exact, churn, create_tables, spec_dict, stop_churn

from nilus_dagster.cdc.operations import NothingToRetry, retry_tables
from nilus_dagster.cdc.pipeline import request_table_resync
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.store import StateStore


@pytest.fixture
def env(pipeline_env: str) -> Iterator[str]:
    from test_cdc_resync import drop_slots

    yield pipeline_env
    drop_slots(pipeline_env)


def sink_execute(sink: SinkTarget, statement: str, dsn: str | None = None) -> None:
    if sink.kind == "duckdb":
        in_sink(sink, statement)
        return
    with psycopg.connect(dsn or sink.location, autocommit=True) as conn:
        conn.execute(statement)


def failed_reason(live: LiveRun) -> str | None:
    failures = {f.table_name: f for f in live.store.table_failures("acme", "crashy")}
    failure = failures.get("public.items")
    return failure.reason if failure is not None and failure.status == "failed" else None


def notes_exact(env: str, sink: SinkTarget) -> bool:
    """Notes (keyless: compared as a multiset) equals the source, read beside the live run."""
    query = "SELECT note_id, body, n FROM {} ORDER BY note_id, body, n"
    return source_rows(env, "public.notes", NOTES, "note_id, body, n") == in_sink(sink, query.format("replica.notes"))


def break_items_and_see_notes_flow(env: str, sink: SinkTarget, live: LiveRun, reader, expect: str) -> str:  # noqa: ANN001
    """While items's sink table is broken: churn on both tables; notes keeps flowing, items fails.
    Returns the failure's reason."""
    stop = threading.Event()
    writer = threading.Thread(target=churn, args=(env, stop, 700_000))
    writer.start()
    try:
        live.wait(lambda: failed_reason(live) is not None, "items to be failed")
        time.sleep(0.5)  # changes to both tables after the failure
    finally:
        stop_churn(stop, writer)
    live.wait(lambda: notes_exact(env, sink), "notes to equal the source while items is failed", 120)
    reason = failed_reason(live)
    assert reason is not None and expect in reason, reason
    live.wait(lambda: "public.items" in _beat(live.store).get("failed_tables", {}), "the heartbeat to name items")
    checkpoint = live.checkpoint(reader, ITEMS_TABLE)
    failure = next(f for f in live.store.table_failures("acme", "crashy") if f.table_name == "public.items")
    assert checkpoint is not None and failure.checkpoint == checkpoint  # where it continues from
    return reason


def slot_released(env: str) -> None:
    """A stopped run's walsender may linger a moment: the next run must find the slot free."""

    def free() -> bool:
        with psycopg.connect(env, autocommit=True) as conn:
            return not conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE database = current_database() AND active"
            ).fetchone()

    wait_for(free, 30, "the slot to be released")


def recovered(live: LiveRun) -> None:
    live.wait(lambda: not live.store.table_failures("acme", "crashy"), "items to stream again", 60)


def finish_exact(env: str, sink: SinkTarget, spec: dict) -> None:
    """After the live run: a run catches up to the last change, then both tables equal the source."""
    slot_released(env)
    finish_worker(json.dumps(spec))
    assert_exact(env, sink)


def test_a_table_whose_sink_table_went_away_is_failed_the_other_flows_and_it_resumes_exactly(
    env: str, state_dsn: str, sql_sink: SinkTarget
) -> None:
    sink = sql_sink
    create_tables(env, 1_500, 800)
    spec = spec_dict(sink)
    finish_worker(json.dumps(spec))  # the initial snapshot
    with live_run(spec, state_dsn) as (live, reader):
        sink_execute(sink, "ALTER TABLE replica.items RENAME TO items_away")
        break_items_and_see_notes_flow(env, sink, live, reader, "replica.items is missing")
        assert in_sink(sink, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'items'") == [(0,)]
        with pytest.raises(NothingToRetry, match="public.items"):
            retry_tables(live.config, live.store, ["public.notes"])
    # The run stopped with items failed; more changes while nothing runs: the next run keeps it
    # held (the slot still has every change after its checkpoint) until it is retried.
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("UPDATE public.items SET counter = counter + 5 WHERE id % 11 = 0")
    slot_released(env)
    finish_worker(json.dumps(spec))
    assert in_sink(sink, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'items'") == [(0,)]
    assert notes_exact(env, sink)
    with live_run(spec, state_dsn) as (live, _):
        assert failed_reason(live) is not None
        sink_execute(sink, "ALTER TABLE replica.items_away RENAME TO items")  # restored with its rows
        assert retry_tables(live.config, live.store, ["public.items"]).startswith("retry of public.items")
        recovered(live)
    finish_exact(env, sink, spec)


def test_a_failed_table_whose_sink_rows_are_lost_is_resynced_exactly(
    env: str, state_dsn: str, duckdb_sink: SinkTarget
) -> None:
    """Every churn transaction is over `batch_max_rows` here: applied in chunks in one sink
    transaction, which the missing table fails as a whole; it is replayed without the table."""
    sink = duckdb_sink
    create_tables(env, 1_000, 500)
    spec = spec_dict(sink, batch_max_rows=100)
    finish_worker(json.dumps(spec))
    with live_run(spec, state_dsn) as (live, reader):
        sink_execute(sink, "DROP TABLE replica.items")
        break_items_and_see_notes_flow(env, sink, live, reader, "replica.items is missing")
        request_table_resync(live.config, live.store, ["public.items"], "its sink table was dropped")
        live.wait(lambda: not live.store.open_resyncs("acme", "crashy"), "the resync to end", 60)
        recovered(live)
    finish_exact(env, sink, spec)


@pytest.fixture
def sink_role(sink_pg: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[SinkTarget, str]]:
    """A PostgreSQL sink written by a role of its own (privileges can be revoked from it); yields
    the sink target (read as the superuser) and the role's name."""
    role = f"sink_{uuid.uuid4().hex[:8]}"
    database = sink_pg.rsplit("/", 1)[1]
    with psycopg.connect(sink_pg, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
    role_dsn = psycopg.conninfo.make_conninfo(sink_pg, user=role)
    monkeypatch.setenv("SINK_DSN", role_dsn)
    yield SinkTarget("postgres", {"type": "postgres", "dsn_env": "SINK_DSN"}, sink_pg), role
    with psycopg.connect(sink_pg, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" OWNER TO CURRENT_USER')
        conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_a_table_whose_sink_privileges_are_revoked_is_failed_then_resumes_exactly_after_a_grant(
    env: str, state_dsn: str, sink_role: tuple[SinkTarget, str]
) -> None:
    sink, role = sink_role
    create_tables(env, 1_500, 800)
    spec = spec_dict(sink)
    finish_worker(json.dumps(spec))
    with live_run(spec, state_dsn) as (live, reader):
        sink_execute(sink, f"REVOKE ALL ON replica.items FROM {role}")
        break_items_and_see_notes_flow(env, sink, live, reader, "replica.items")
        sink_execute(sink, f"GRANT ALL ON replica.items TO {role}")
        retry_tables(live.config, live.store, ["public.items"])
        recovered(live)
    finish_exact(env, sink, spec)


def test_the_retry_tables_job_asks_for_a_retry_of_failed_tables_only(
    pipeline_env: str, state_dsn: str, duckdb_sink: SinkTarget, instance
) -> None:
    """The operator job (no CDC run needed: it records the request the live run picks up)."""
    spec = spec_dict(duckdb_sink)
    defs = cdc_project(duckdb_sink, *spec["pipelines"])
    job = defs.resolve_job_def("acme__crashy__retry_tables")
    _, config = pipeline_config(spec)

    def retry(tables: list[str]):  # noqa: ANN202 - Dagster's result
        return job.execute_in_process(instance=instance, raise_on_error=False,
                                      run_config={"ops": {"acme__crashy__retry_tables_op": {"config": {"tables": tables}}}})

    with StateStore(state_dsn).open() as store:
        store.record_table_failure(config.key, "public.items", "permission denied", "0/10", "r1")
        refused = retry(["public.notes"])
        assert not refused.success and "none of public.notes is failed" in failure_message(refused)
        assert "failed tables: public.items" in failure_message(refused)
        unknown = retry(["public.nope"])
        assert not unknown.success and "not tables of this pipeline" in failure_message(unknown)
        done = retry(["public.items", "public.notes"])
        assert done.success, failure_message(done)
        assert [(f.table_name, f.status) for f in store.table_failures("acme", "crashy")] == [("public.items", "retry")]
        assert instance.get_run_by_id(done.run_id).tags["nilus/operation"] == "crashy:retry_tables"


def test_the_only_table_of_a_pipeline_is_held_failed_and_the_run_waits_for_a_retry(
    source_db: str, state_dsn: str, sink_role: tuple[SinkTarget, str]
) -> None:
    """No other table can show that the sink works: the table is failed anyway (holding it stops
    nothing else), the run stays alive and says so, and a retry after the grant resumes it exactly."""
    sink, role = sink_role
    make_table(source_db)
    read = lambda: postgres_sink_rows(sink.location, "replica.t", COLUMNS, "id")  # noqa: E731 - as the superuser
    with StateStore(state_dsn).open() as store:
        live = start_run(source_db, PostgresSink(os.environ["SINK_DSN"]), store, "solo")
        try:
            wait_until(lambda: streaming(live) and pipeline_in_sink(read, source_db)(), 60, "the snapshot to stream")
            sink_execute(sink, f"REVOKE ALL ON replica.t FROM {role}")
            write(source_db, 100, 20)

            def failed() -> bool:
                return any(f.status == "failed" for f in store.table_failures("acme", "solo"))

            wait_until(failed, 60, "the only table to be held failed")
            [failure] = store.table_failures("acme", "solo")
            assert failure.table_name == "public.t" and "replica.t" in failure.reason
            wait_until(lambda: "public.t" in (store.last_heartbeat("acme", "solo").detail.get("failed_tables") or {}),  # type: ignore[union-attr]
                       30, "the heartbeat to name it")
            assert live.thread.is_alive() and live.error is None  # the run waits, it did not fail
            sink_execute(sink, f"GRANT ALL ON replica.t TO {role}")
            retry_tables(live.run.config, store, ["public.t"])
            wait_until(lambda: not store.table_failures("acme", "solo") and pipeline_in_sink(read, source_db)(), 60,
                       "the table to resume from its checkpoint")
        finally:
            live.finish()
