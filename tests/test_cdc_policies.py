"""CDC behaviour under schema changes, lost slots, bad tables, and the keep-alive sensor."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, source_rows

from nilus_dagster.state.store import StateStore


@pytest.fixture
def env(pipeline_env: str) -> str:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.people (id int PRIMARY KEY, name text)")
        conn.execute("CREATE TABLE public.pets (id int PRIMARY KEY, kind text)")
        conn.execute("INSERT INTO public.people VALUES (1, 'ann'), (2, 'bob')")
        conn.execute("INSERT INTO public.pets VALUES (1, 'cat')")
    return pipeline_env


def change_schema_and_rows(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.people VALUES (3, 'cy')")  # before the change
        conn.execute("ALTER TABLE public.people ADD COLUMN email text")
        conn.execute("INSERT INTO public.people VALUES (4, 'di', 'di@example.com')")
        conn.execute("UPDATE public.people SET email = 'ann@example.com' WHERE id = 1")
        conn.execute("INSERT INTO public.pets VALUES (2, 'dog')")  # another table keeps flowing


def people(sink: SinkTarget, columns: list[str]) -> list[tuple]:
    return duckdb_rows(sink.location, "replica.people", columns, "id")


def test_evolve_adds_the_column_and_records_schema_history(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people", "public.pets"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    change_schema_and_rows(env)
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    columns = ["id", "name", "email"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), people(sink, columns))
    history = store.list_schema_history("acme", pipeline="crm").items
    people_history = [h for h in history if h.table_name == "public.people"]
    assert len(people_history) == 2
    assert [c["name"] for c in people_history[0].table_schema["columns"]] == ["id", "name", "email"]
    assert people_history[0].lsn is not None


def test_ddl_inside_a_transaction_between_its_rows(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    with psycopg.connect(env, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO public.people VALUES (10, 'before the change')")
        conn.execute("UPDATE public.people SET name = 'ann b' WHERE id = 1")
        conn.execute("ALTER TABLE public.people ADD COLUMN email text")
        conn.execute("INSERT INTO public.people VALUES (11, 'after the change', 'x@example.com')")
        conn.execute("UPDATE public.people SET email = 'bob@example.com' WHERE id = 2")
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    columns = ["id", "name", "email"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), people(sink, columns))


def test_evolve_follows_a_column_renamed_mid_stream(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    """Rows from before the rename keep their values under the new name; later changes land in it."""
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.people VALUES (3, 'cy')")
        conn.execute("ALTER TABLE public.people RENAME COLUMN name TO full_name")
        conn.execute("INSERT INTO public.people VALUES (4, 'di')")
        conn.execute("UPDATE public.people SET full_name = 'ann b' WHERE id = 1")
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    columns = ["id", "full_name"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), people(sink, columns))


def test_evolve_widens_a_column_type(env: str, sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.pets ADD COLUMN grams int")
        conn.execute("UPDATE public.pets SET grams = 4000")
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.pets"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.pets ALTER COLUMN grams TYPE bigint")
        conn.execute("INSERT INTO public.pets VALUES (2, 'whale', 150000000000)")
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert result.success, failure_message(result)
    columns = ["id", "kind", "grams"]
    assert_same_rows(
        source_rows(env, "public.pets", columns, "id"), duckdb_rows(sink.location, "replica.pets", columns, "id")
    )


def test_pause_holds_the_table_until_approved(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people", "public.pets"], schema_changes="pause"))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    change_schema_and_rows(env)
    held = run_until_caught_up(defs, "acme__crm", instance)
    assert held.success, failure_message(held)
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "pending_schema_approval"
    assert state.detail["table"] == "public.people"
    assert state.detail["diff"] == "+email text"
    assert [c["name"] for c in state.detail["proposed_schema"]["columns"]] == ["id", "name", "email"]
    assert duckdb_rows(sink.location, "replica.pets", ["id", "kind"], "id") == [(1, "cat"), (2, "dog")]
    assert people(sink, ["id", "name"]) == [(1, "ann"), (2, "bob"), (3, "cy")]  # held at the change

    approval = defs.resolve_job_def("acme__crm__approve_schema").execute_in_process(instance=instance)
    assert approval.success
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "active"
    assert "slot" in state.detail  # the pipeline's identity survives the approval
    resumed = run_until_caught_up(defs, "acme__crm", instance)
    assert resumed.success, failure_message(resumed)
    columns = ["id", "name", "email"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), people(sink, columns))


def test_fail_stops_with_the_diff_and_applies_nothing_after_it(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"], schema_changes="fail"))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    change_schema_and_rows(env)
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert not result.success
    assert "public.people: the source schema changed (+email text) and schema_changes is 'fail'" in failure_message(
        result
    )
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "failed"
    assert people(sink, ["id", "name"]) == [(1, "ann"), (2, "bob"), (3, "cy")]


def test_dropped_slot_fails_clearly_and_never_restarts_silently(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'nilus_acme_crm%'"
        )
        conn.execute("INSERT INTO public.people VALUES (3, 'lost while no slot existed')")
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert not result.success
    assert "is gone (dropped or lost) although the pipeline has streamed before" in failure_message(result)
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None and state.state == "failed"
    again = run_until_caught_up(defs, "acme__crm", instance)  # a relaunch refuses too: no silent re-snapshot
    assert not again.success
    assert "reset it (re-snapshot) before it can run again: run the job <tenant>__<pipeline>__reset" in failure_message(
        again
    )
    with psycopg.connect(env, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'nilus_acme_crm%'"
        ).fetchone() == (0,)

    reset = defs.resolve_job_def("acme__crm__reset").execute_in_process(instance=instance)
    assert reset.success, failure_message(reset)
    run_tags = instance.get_run_by_id(reset.run_id).tags  # an operation, not a pipeline run
    assert "nilus/resource_id" not in run_tags and "nilus/cdc_pipeline" not in run_tags
    assert run_tags["nilus/operation"] == "crm:reset"
    recovered = run_until_caught_up(defs, "acme__crm", instance)
    assert recovered.success, failure_message(recovered)
    assert_same_rows(source_rows(env, "public.people", ["id", "name"], "id"), people(sink, ["id", "name"]))


def test_offsets_from_another_postgres_system_are_refused(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    """A source re-created (or failed over to a new cluster) has other LSNs: never apply old offsets."""
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"]))
    assert run_until_caught_up(defs, "acme__crm", instance).success
    state = store.get_pipeline_state("acme", "crm")
    assert state is not None
    store.set_pipeline_state(_key(), state.state, {**state.detail, "system_identifier": "1234567890"})
    result = run_until_caught_up(defs, "acme__crm", instance)
    assert not result.success
    assert "belongs to system 1234567890: the LSNs would be meaningless there" in failure_message(result)
    failed = store.get_pipeline_state("acme", "crm")
    assert failed is not None and failed.state == "failed"


def test_table_without_key_or_full_identity_is_refused_before_anything_starts(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.loose (a int, b text)")
    defs = cdc_project(sink, cdc_pipeline("loose", ["public.loose"]))
    result = run_until_caught_up(defs, "acme__loose", instance)
    assert not result.success
    assert (
        "public.loose has no primary key and REPLICA IDENTITY DEFAULT, so its updates and deletes cannot be matched: "
        "ALTER TABLE public.loose REPLICA IDENTITY FULL" in failure_message(result)
    )
    with psycopg.connect(env, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone() == (0,)


def test_keep_alive_sensor_one_run_per_generation_and_stale_runs(
    env: str, sink: SinkTarget, instance: dg.DagsterInstance, store: StateStore
) -> None:
    defs = cdc_project(sink, cdc_pipeline("crm", ["public.people"]))
    sensor = defs.resolve_sensor_def("acme__crm__keep_alive")

    def evaluate() -> dg.SensorResult | dg.RunRequest | dg.SkipReason:
        with dg.build_sensor_context(
            instance=instance, resources={"nilus_state": defs.resources["nilus_state"]}
        ) as context:
            data = sensor.evaluate_tick(context)
        if data.run_requests:
            return data.run_requests[0]
        return dg.SkipReason(data.skip_message)

    first = evaluate()
    assert isinstance(first, dg.RunRequest) and first.run_key == "acme__crm:initial"
    assert first.tags["nilus/tenant"] == "acme"

    finished = run_until_caught_up(defs, "acme__crm", instance)
    after = evaluate()
    assert isinstance(after, dg.RunRequest) and after.run_key == f"acme__crm:{finished.run_id}"

    live = instance.create_run_for_job(
        defs.resolve_job_def("acme__crm"), tags={"nilus/tenant": "acme", "nilus/pipeline": "crm"}
    )
    skipped = evaluate()
    assert isinstance(skipped, dg.SkipReason) and f"run {live.run_id} is live" in (skipped.skip_message or "")

    _report_started(instance, live)  # the run is created NOT_STARTED; now its process "starts"
    store.beat(_key(), live.run_id)
    _age_heartbeat(store, timedelta(minutes=10))
    relaunch = evaluate()
    assert isinstance(relaunch, dg.RunRequest)
    assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.FAILURE  # reported dead

    store.set_pipeline_state(_key(), "failed", {"reason": "slot lost"})
    blocked = evaluate()
    assert isinstance(blocked, dg.SkipReason) and "pipeline is failed: slot lost" in (blocked.skip_message or "")


def _key():  # noqa: ANN202
    from nilus_dagster.state.records import PipelineKey

    return PipelineKey("acme", "crm", "nilus:v1:crm:acme")


def _report_started(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    from dagster._core.events import DagsterEvent, DagsterEventType

    instance.report_dagster_event(
        DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=run.job_name), run_id=run.run_id
    )


def _age_heartbeat(store: StateStore, age: timedelta) -> None:
    with psycopg.connect(store._pool.conninfo, autocommit=True) as conn:  # noqa: SLF001 - test-only aging
        conn.execute(f"UPDATE {store.schema}.heartbeats SET beat_at = %s", (datetime.now(UTC) - age,))
