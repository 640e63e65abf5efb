"""Poison rows (`on_error`): numeric NaN/Infinity into a DuckDB DECIMAL, among good rows.

dlq: the sink equals the source minus exactly the poison rows and the dead-letter queue holds
each once, also when the run is SIGKILLed after writing the entries and before the sink commit;
pause_table: that table is held while the others flow, until a resync; fail: a clear error.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import dagster as dg
import duckdb
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from blips_harness import duckdb_rows_in_process, outage, pg_port, start_run, streaming, wait_until
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from fault_proxy import FaultProxy
from table_compare import assert_same_rows, duckdb_rows, source_rows
from test_cdc_crash import finish_worker, start_worker

from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.state.dead_letters import DeadLetterFilter
from nilus_dagster.state.store import StateStore

TABLES = ["public.amounts", "public.others"]
AMOUNT_COLUMNS = ["id", "amount", "note"]
POISON = {101: "NaN", 103: "Infinity", 104: "-Infinity"}


def create_tables(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.amounts (id int PRIMARY KEY, amount numeric, note text)")
        conn.execute("CREATE TABLE public.others (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO public.amounts VALUES (1, 1.50, 'one'), (2, 2.25, 'two')")
        conn.execute("INSERT INTO public.others VALUES (1, 'first')")
    return dsn


@pytest.fixture
def env(pipeline_env: str) -> str:
    return create_tables(pipeline_env)


def write_poison_among_good_rows(dsn: str) -> None:
    """Good and poison rows in one transaction with another table's row, then more changes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO public.amounts VALUES (100, 10.00, 'good'), (101, 'NaN', 'bad'), "
                         "(102, 12.00, 'good'), (103, 'Infinity', 'bad'), (104, '-Infinity', 'bad')")
            conn.execute("INSERT INTO public.others VALUES (2, 'second')")
        conn.execute("UPDATE public.amounts SET note = 'changed' WHERE id = 2")
        conn.execute("INSERT INTO public.others VALUES (3, 'third')")


def amounts(sink: SinkTarget) -> list[tuple]:
    return duckdb_rows(sink.location, "replica.amounts", AMOUNT_COLUMNS, "id")


def good_source_amounts(env: str) -> list[tuple]:
    return [row for row in source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id") if row[0] not in POISON]


def assert_others_exact(env: str, sink: SinkTarget) -> None:
    assert_same_rows(source_rows(env, "public.others", ["id", "label"], "id"),
                     duckdb_rows(sink.location, "replica.others", ["id", "label"], "id"))


def assert_poison_dead_lettered_once(store: StateStore) -> None:
    entries = store.dead_letters("acme", DeadLetterFilter(pipeline="crm", unacked=False), limit=100).items
    assert sorted((e.row_key, e.row_data["amount"]) for e in entries) == sorted(
        ([str(k)], v) for k, v in POISON.items()
    )
    for entry in entries:
        assert entry.table_name == "public.amounts" and entry.op == "I" and entry.column_name == "amount"
        assert entry.error_kind == "not_finite" and entry.row_data["note"] == "bad"
        assert "amounts.amount" in entry.message and entry.commit_lsn > 0


def test_dlq_skips_exactly_the_poison_rows_and_records_them_once(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES))  # on_error defaults to dlq
    assert run_until_caught_up(defs, "acme__crm", instance).success
    write_poison_among_good_rows(env)
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    assert_same_rows(good_source_amounts(env), amounts(sink))
    assert_others_exact(env, sink)
    assert_poison_dead_lettered_once(store)
    assert store.count_dead_letters("acme", DeadLetterFilter(pipeline="crm", table="public.amounts")) == 3
    assert dead_letter_checks(result) == {"amounts": False, "others": True}

    store.ack_dead_letters("acme", up_to_id=10**9)  # handled: the check passes again
    again = run_until_caught_up(defs, "acme__crm", instance)  # nothing new: nothing recorded again
    assert again.success, failure_message(again)
    assert_poison_dead_lettered_once(store)
    assert dead_letter_checks(again) == {"amounts": True, "others": True}


def dead_letter_checks(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    """The last evaluation of each table's `dead_letters` asset check in the run."""
    return {e.asset_key.path[-1]: e.passed for e in result.get_asset_check_evaluations()
            if e.check_name == "dead_letters"}


def test_dlq_entry_is_durable_before_the_sink_commit_and_a_replay_adds_none(
    env: str, sink: SinkTarget, state_dsn: str, store: StateStore
) -> None:
    """SIGKILL after the entries are written while the sink commit waits for the DuckDB file
    (another process holds it): the restart replays the transaction and records nothing twice."""
    spec = json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [cdc_pipeline("crm", TABLES)]})
    worker = start_worker(spec, pipeline="crm")
    try:
        wait_until(lambda: store.latest_offset("acme", "crm") is not None, 120, "the snapshot to finish")

        def run_streams() -> bool:
            beat = store.last_heartbeat("acme", "crm")
            return beat is not None and beat.detail.get("phase") == "streaming"

        wait_until(run_streams, 120, "the run to stream")
        with duckdb.connect(sink.location):  # holds the file: the sink transaction cannot start
            write_poison_among_good_rows(env)
            wait_until(lambda: store.count_dead_letters("acme") == 3, 60, "the dead-letter entries")
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        assert [row[0] for row in amounts(sink)] == [1, 2]  # the entries are durable, the rows never committed
    finally:
        if worker.poll() is None:
            worker.kill()
    finish_worker(spec, "crm")
    assert_same_rows(good_source_amounts(env), amounts(sink))
    assert_others_exact(env, sink)
    assert_poison_dead_lettered_once(store)


def test_pause_table_holds_only_that_table_until_resynced(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES, on_error="pause_table"))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    before = amounts(sink)
    write_poison_among_good_rows(env)
    held = run_until_caught_up(defs, "acme__crm", instance)
    assert held.success, failure_message(held)
    assert_others_exact(env, sink)  # the other table flows
    assert amounts(sink) == before  # held at the poison row: none of its later changes either
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "paused"
    paused = state.detail["paused_tables"]["public.amounts"]
    assert paused["column"] == "amount" and paused["error_kind"] == "not_finite"
    assert "'NaN'" in paused["reason"] and "LSN" in paused["reason"]
    assert store.count_dead_letters("acme") == 0

    with psycopg.connect(env, autocommit=True) as conn:  # the user fixes the rows, then resyncs
        conn.execute("UPDATE public.amounts SET amount = 0 WHERE id IN (101, 103, 104)")
    resync = defs.resolve_job_def("acme__crm__resync").execute_in_process(
        instance=instance, run_config={"ops": {"acme__crm__resync_op": {"config": {"tables": ["public.amounts"]}}}}
    )
    assert resync.success
    resumed = run_until_caught_up(defs, "acme__crm", instance)
    assert resumed.success, failure_message(resumed)
    assert_same_rows(source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id"), amounts(sink))
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "active" and "paused_tables" not in state.detail


def test_fail_names_table_column_value_and_lsn(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES, on_error="fail"))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    write_poison_among_good_rows(env)
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert not result.success
    message = failure_message(result)
    assert "public.amounts" in message and "amounts.amount" in message and "'NaN'" in message
    assert "LSN" in message and "on_error is 'fail'" in message
    assert store.count_dead_letters("acme") == 0


def test_dlq_inside_a_transaction_applied_in_chunks(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    """A transaction of more than batch_max_rows changes is applied in pieces inside one sink
    transaction: its poison rows are dead-lettered piece by piece, the rest commits whole."""
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES, cdc={"batch_max_rows": 50}))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.amounts SELECT g, g, 'good' FROM generate_series(200, 399) g")
        conn.execute("UPDATE public.amounts SET amount = 'NaN', note = 'bad' WHERE id % 40 = 0 AND id >= 200")
        conn.execute("INSERT INTO public.others VALUES (2, 'second')")
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    poison = [row for row in source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id") if row[2] == "bad"]
    assert len(poison) == 5
    assert_same_rows([r for r in source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id") if r[2] != "bad"],
                     amounts(sink))
    assert_others_exact(env, sink)
    entries = store.dead_letters("acme", DeadLetterFilter(pipeline="crm"), limit=100).items
    assert sorted(e.row_key[0] for e in entries) == sorted(str(row[0]) for row in poison)
    assert {e.op for e in entries} == {"U"}  # a key's changes collapse: its last one is recorded


def test_a_poison_row_in_the_snapshot_fails_it_naming_the_column(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    """Not dead-lettered (yet): the snapshot refuses the value rather than dropping the row."""
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.amounts VALUES (101, 'NaN', 'bad')")
    result = run_until_caught_up(cdc_project(sink, cdc_pipeline("crm", TABLES)), "acme__crm", instance)
    assert not result.success
    assert "public.amounts.amount" in failure_message(result) and "NaN" in failure_message(result)
    assert store.count_dead_letters("acme") == 0


def test_a_poison_row_waits_for_its_entry_while_the_state_store_is_down(
    source_db: str, state_dsn: str, duckdb_path: Path
) -> None:
    """The batch with a poison row is not applied until its dead-letter entry is durable: the run
    retries through the outage (it does not skip the row, nor fail), then applies the rest."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v numeric)")
        conn.execute("INSERT INTO public.t VALUES (1, 1)")
    read = lambda: [row[0] for row in duckdb_rows_in_process(duckdb_path)]  # noqa: E731
    with FaultProxy("127.0.0.1", pg_port(state_dsn)).start() as proxy, StateStore(proxy.dsn(state_dsn)).open() as store:
        live = start_run(source_db, DuckDBSink(duckdb_path), store, "storedown")
        wait_until(lambda: streaming(live) and read() == [1], 60, "the snapshot to stream")
        outage(proxy)
        with psycopg.connect(source_db, autocommit=True) as conn:
            conn.execute("INSERT INTO public.t VALUES (2, 'NaN'), (3, 3)")
        time.sleep(3)
        assert read() == [1]  # held back: its entry cannot be written yet
        proxy.refuse(False)
        wait_until(lambda: read() == [1, 3], 60, "the batch once the state store is back")
        live.finish()
    with StateStore(state_dsn).open() as direct:
        entries = direct.dead_letters("acme").items
    assert [(e.table_name, e.row_key, e.row_data) for e in entries] == [("public.t", ["2"], {"id": "2", "v": "NaN"})]


def test_pause_table_inside_a_transaction_applied_in_chunks(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    """The sink transaction of a chunked (spilled) transaction is rolled back at the poison piece and
    applied again without the held table: the transaction's other table gets its rows, the held
    one none of them, until it is fixed and resynced."""
    defs = cdc_project(sink, cdc_pipeline("crm", TABLES, on_error="pause_table", cdc={"batch_max_rows": 50}))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    before = amounts(sink)
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.others SELECT g, 'in the big one' FROM generate_series(10, 309) g")
        conn.execute("INSERT INTO public.amounts SELECT g, g, 'good' FROM generate_series(200, 499) g")
        conn.execute("UPDATE public.amounts SET amount = 'NaN', note = 'bad' WHERE id = 450")
    held = run_until_caught_up(defs, "acme__crm", instance)
    assert held.success, failure_message(held)
    assert_others_exact(env, sink)  # 300 rows of the same source transaction: applied
    assert amounts(sink) == before  # none of the transaction reached the held table
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "paused"
    assert state.detail["paused_tables"]["public.amounts"]["column"] == "amount"
    assert store.count_dead_letters("acme") == 0

    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("UPDATE public.amounts SET amount = 0 WHERE id = 450")
    resync = defs.resolve_job_def("acme__crm__resync").execute_in_process(
        instance=instance, run_config={"ops": {"acme__crm__resync_op": {"config": {"tables": ["public.amounts"]}}}}
    )
    assert resync.success
    assert run_until_caught_up(defs, "acme__crm", instance).success
    assert_same_rows(source_rows(env, "public.amounts", AMOUNT_COLUMNS, "id"), amounts(sink))
    assert_others_exact(env, sink)
