"""The CDC pipeline as Dagster shows it: materializations that carry what each run applied, one
run per pipeline however it is launched, a clear refusal of a one-table subset.

Real Dagster instance (DAGSTER_HOME), real PostgreSQL source, DuckDB sink.
"""

from __future__ import annotations

import signal
import threading
import time

import dagster as dg
import psycopg
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from test_cdc_crash import create_items, spec_json, start_worker, wait_for

from nilus_dagster.components.tags import PIPELINE_TAG
from nilus_dagster.state import NilusStateStore
from nilus_dagster.state.store import StateStore

ITEMS = dg.AssetKey(["acme", "crashy", "public", "items"])
POOL = "nilus_cdc__acme__crashy"


def _materializations(instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str) -> list[dg.AssetMaterialization]:
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=100).records
    return [r.event_log_entry.asset_materialization for r in reversed(records) if r.run_id == run_id]


def test_materializations_count_the_changes_applied_and_name_the_lsn(
    pipeline_env: str, duckdb_sink: SinkTarget
) -> None:
    env = pipeline_env
    create_items(env, 10)
    defs = cdc_project(duckdb_sink, cdc_pipeline("crashy", ["public.items"], checks={"max_lag": "5m"}))
    instance = dg.DagsterInstance.get()
    first = run_until_caught_up(defs, "acme__crashy", instance)
    assert first.success, failure_message(first)
    with psycopg.connect(env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.items VALUES (11, 0, 'a', now()), (12, 0, 'b', now()), (13, 0, 'c', now())")
        conn.execute("UPDATE public.items SET counter = 5 WHERE id IN (1, 2)")
        conn.execute("DELETE FROM public.items WHERE id = 3")
    second = run_until_caught_up(defs, "acme__crashy", instance)
    assert second.success, failure_message(second)
    events = _materializations(instance, ITEMS, second.run_id)
    assert len(events) >= 2  # current once streaming starts, then what the run applied
    assert all(e.metadata["lsn"].value for e in events)  # never blank, also before any change
    counts = {name: sum(e.metadata[name].value for e in events) for name in ("rows_inserted", "rows_updated",
                                                                              "rows_deleted")}
    assert counts == {"rows_inserted": 3, "rows_updated": 2, "rows_deleted": 1}
    lag_checks = [e for e in second.get_asset_check_evaluations() if e.check_name == "max_lag"]
    assert lag_checks and all(e.passed and e.metadata["max_lag_seconds"].value == 300 for e in lag_checks)


def test_selecting_one_table_of_a_cdc_pipeline_says_why_it_cannot_run(
    pipeline_env: str, duckdb_sink: SinkTarget
) -> None:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.a (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE public.b (id int PRIMARY KEY)")
    defs = cdc_project(duckdb_sink, cdc_pipeline("two", ["public.a", "public.b"]))
    instance = dg.DagsterInstance.get()
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey(["acme", "two", "public", "a"])], raise_on_error=False
    )
    assert not result.success
    message = failure_message(result)
    assert "public.a cannot be materialized alone" in message and "acme__two__resync" in message, message
    assert PIPELINE_TAG not in instance.get_run_by_id(result.run_id).tags  # not counted as a pipeline run


def test_materialize_waits_for_the_live_run_of_its_pipeline(
    pipeline_env: str, state_dsn: str, duckdb_sink: SinkTarget
) -> None:
    """The live run (the job's, in its own process) holds the pipeline's pool; "Materialize" on
    the assets (the implicit asset job, no pipeline tags) waits for it instead of failing."""
    env = pipeline_env
    create_items(env, 10)
    spec = spec_json(duckdb_sink)
    defs = cdc_project(duckdb_sink, cdc_pipeline("crashy", ["public.items"]))
    instance = dg.DagsterInstance.get()
    sensor = defs.resolve_sensor_def("acme__crashy__keep_alive")  # its tick gives the pool its limit
    with dg.build_sensor_context(instance=instance, resources={"nilus_state": NilusStateStore(dsn=state_dsn)}) as ctx:
        tick = sensor(ctx)
    assert isinstance(tick, dg.RunRequest)
    assert instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1
    worker = start_worker(spec, "dagster")
    materialize: dict[str, object] = {}
    try:
        with StateStore(state_dsn).open() as store:
            wait_for(lambda: (b := store.last_heartbeat("acme", "crashy")) is not None
                     and b.detail.get("phase") == "streaming", 120, "the live run to stream")
            job = defs.resolve_implicit_global_asset_job_def()

            def launch() -> None:
                materialize["result"] = job.execute_in_process(
                    instance=instance,
                    asset_selection=[ITEMS],
                    run_config={"ops": {"acme__crashy__cdc": {"config": {"stop_at": "caught_up"}}}},
                    raise_on_error=False,
                )

            thread = threading.Thread(target=launch)
            thread.start()
            time.sleep(8)
            assert thread.is_alive()  # held behind the live run's slot
            (live,) = [r for r in instance.get_runs() if r.job_name == "acme__crashy"]
            assert store.last_heartbeat("acme", "crashy").run_id == live.run_id
            with psycopg.connect(env, autocommit=True) as conn:
                conn.execute("INSERT INTO public.items VALUES (900, 0, 'after the hand-over', now())")
            worker.send_signal(signal.SIGINT)
            worker.communicate(timeout=120)
            thread.join(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
    result = materialize["result"]
    assert isinstance(result, dg.ExecuteInProcessResult)
    assert result.success, failure_message(result)
    assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.CANCELED
    assert instance.get_run_by_id(result.run_id).tags[PIPELINE_TAG] == "crashy"
