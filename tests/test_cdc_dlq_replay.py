"""Replaying dead-letter entries (`<tenant>__<pipeline>__replay_dead_letters`) once the cause is
fixed: the current source row of each entry's key reaches the sink (never the stored, older row),
the entries are acknowledged once, and an entry whose row still cannot be taken stays.

The fix here is the user's `ALTER COLUMN ... TYPE ... USING`, a table rewrite that logical
replication does not stream: only a replay brings the corrected row to the sink.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from blips_harness import duckdb_rows_in_process, in_sink, start_run, streaming, wait_until
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, source_rows
from test_cdc_poison import (
    AMOUNT_COLUMNS,
    TABLES,
    amounts,
    assert_others_exact,
    create_tables,
    write_poison_among_good_rows,
)

from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.state.dead_letters import DeadLetterFilter
from nilus_dagster.state.store import StateStore

REPLAY_JOB = "acme__crm__replay_dead_letters"
FIX_NAN = "ALTER TABLE public.amounts ALTER COLUMN amount TYPE numeric USING (CASE WHEN amount = 'NaN' THEN 0 ELSE amount END)"


@pytest.fixture
def env(pipeline_env: str) -> str:
    return create_tables(pipeline_env)


def replay(defs: dg.Definitions, instance: dg.DagsterInstance, **config: object) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(REPLAY_JOB).execute_in_process(
        instance=instance, run_config={"ops": {f"{REPLAY_JOB}_op": {"config": config}}}, raise_on_error=False
    )


def entries_by_key(store: StateStore) -> dict[str, tuple[int, bool, int | None]]:
    """key → (entry id, acknowledged, replay id)."""
    page = store.dead_letters("acme", DeadLetterFilter(pipeline="crm", unacked=False), limit=100).items
    return {e.row_key[0]: (e.id, e.acked_at is not None, e.replay_id) for e in page}


def test_replay_writes_the_current_source_rows_and_acknowledges_once(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    write_poison_among_good_rows(env)  # 101 NaN, 103 Infinity, 104 -Infinity: dead-lettered
    assert run_until_caught_up(defs, "acme__crm", instance).success
    assert set(entries_by_key(store)) == {"101", "103", "104"}

    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute(FIX_NAN)  # 101 becomes 0 in the source: not streamed
        conn.execute("DELETE FROM public.amounts WHERE id = 103")  # gone since: the replay must not bring it back
        conn.execute("UPDATE public.amounts SET note = 'after' WHERE id = 100")  # the stream goes on meanwhile
    asked = replay(defs, instance, table="public.amounts")  # no run is live: the next run replays first
    assert asked.success, failure_message(asked)
    resumed = run_until_caught_up(defs, "acme__crm", instance)
    assert resumed.success, failure_message(resumed)

    expected = [r for r in source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id") if r[0] != 104]
    assert [r[:2] for r in expected if r[0] == 101] == [(101, 0)]
    assert_same_rows(expected, amounts(sink))  # 101 as it is now, 103 absent, 104 still refused
    assert_others_exact(env, sink)
    entries = entries_by_key(store)
    assert entries["101"][1] and entries["103"][1] and not entries["104"][1]
    replay_id = entries["101"][2]
    assert replay_id is not None and entries["103"][2] == replay_id and entries["104"][2] is None
    request = store.dlq_replay(replay_id)
    assert request is not None and request.status == "failed"  # one entry could not be replayed: named
    assert request.message is not None and "replayed 2" in request.message and "['104']" in request.message
    assert "still cannot be taken" in request.message

    again = replay(defs, instance, ids=[entries["101"][0]])  # acknowledged already: nothing to replay
    assert not again.success and "no unacknowledged dead-letter entry" in failure_message(again)
    unknown = replay(defs, instance, table="public.nope")
    assert not unknown.success and "public.amounts" in failure_message(unknown)


def test_replay_inside_a_live_run(source_db: str, duckdb_path: Path, store: StateStore) -> None:
    """The live run picks the request up between polls and carries it out on its stream thread;
    the changes streamed after it still land on top of the replayed row."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v numeric)")
        conn.execute("INSERT INTO public.t VALUES (1, 1)")
    read = lambda: duckdb_rows_in_process(duckdb_path)  # noqa: E731
    live = start_run(source_db, DuckDBSink(duckdb_path), store, "livereplay")
    try:
        wait_until(lambda: streaming(live) and len(read()) == 1, 60, "the snapshot to stream")
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO public.t VALUES (2, 'NaN'), (3, 3)")
        wait_until(lambda: store.count_dead_letters("acme") == 1 and len(read()) == 2, 60, "the dead-letter entry")
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("ALTER TABLE public.t ALTER COLUMN v TYPE numeric USING (CASE WHEN v = 'NaN' THEN 2 ELSE v END)")
        key = live.run.config.key
        request_id, _ = store.request_dlq_replay(key, table="public.t")
        wait_until(lambda: store.dlq_replay(request_id).status != "pending", 60, "the live run to replay")  # type: ignore[union-attr]
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("UPDATE public.t SET v = 22 WHERE id = 2")  # after the replay: lands on top
        wait_until(in_sink(read, source_db), 60, "the change after the replay")
        assert store.dlq_replay(request_id).status == "done"  # type: ignore[union-attr]
        assert store.count_dead_letters("acme") == 0
    finally:
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", ["id", "v"], "id"), read())
