"""A CDC pipeline in Dagster: one long-lived multi-asset op, its job, and a keep-alive sensor."""

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from nilus_dagster.components.batch_assets import STATE_RESOURCE_KEY, ensure_run_tags
from nilus_dagster.components.cdc_checks import cdc_check_specs, dlq_check, lag_check, open_dead_letters
from nilus_dagster.components.cdc_config import CdcRunConfig, cdc_config, pipeline_key
from nilus_dagster.components.cdc_operator_jobs import operator_jobs
from nilus_dagster.components.cdc_reporting import CdcAssetReporter
from nilus_dagster.components.held_wal import held_wal_evaluations
from nilus_dagster.components.lifecycle import LIVE_STATUSES, hold_watch, sensor_hold
from nilus_dagster.components.naming import asset_key, table_asset_attributes
from nilus_dagster.components.run_stop import DeliberateStop
from nilus_dagster.components.schema_drift import CdcDriftWatch
from nilus_dagster.components.stale_runs import end_stale_run
from nilus_dagster.components.tags import PIPELINE_TAG, TENANT_TAG, cdc_pool, ensure_pool_limit, run_tags
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import NilusStateStore

STATE_POLL_INTERVAL_S = 5.0
DLQ_READ_INTERVAL_S = 5.0  # how often a live run re-reads its tables' unacknowledged dead letters
STALE_HEARTBEAT = timedelta(minutes=3)
FAILURE_BACKOFF = timedelta(minutes=1)
FAILURE_BACKOFF_MAX = timedelta(minutes=30)


def _approval_watch(store, pipeline: Pipeline) -> Callable[[], bool]:  # noqa: ANN001
    """True once a schema change held during this run has been approved (the run then ends so
    the next one starts with the approved schema)."""
    seen_pending = False
    last_check = 0.0

    def approved() -> bool:
        nonlocal seen_pending, last_check
        if time.monotonic() - last_check < STATE_POLL_INTERVAL_S:
            return False
        last_check = time.monotonic()
        state = store.get_pipeline_state(pipeline.tenant, pipeline.name)
        pending = state is not None and state.state == "pending_schema_approval"
        if pending:
            seen_pending = True
            return False
        return seen_pending

    return approved


CDC_ASSET_METADATA = {
    "nilus/mode": "cdc",
    "nilus/generated_columns": "stored generated columns are not replicated: PostgreSQL before 18 does not "
    "publish them, so CDC leaves them out of the snapshot and the stream alike",
}


def _refuse_subset(context: dg.AssetExecutionContext, pipeline: Pipeline, specs: list[dg.AssetSpec]) -> None:
    """One run streams every table of the pipeline (one slot, one position): a subset cannot run."""
    selected = set(context.selected_asset_keys)
    if selected == {s.key for s in specs}:
        return
    names = ", ".join(sorted(str(s.metadata["nilus/source_table"]) for s in specs if s.key in selected))
    raise dg.Failure(
        description=(
            f"CDC pipeline {pipeline.name} streams all its tables in one run from one replication slot, so "
            f"{names} cannot be materialized alone: materialize all of the group {pipeline.job_name} (or let "
            f"the sensor {pipeline.job_name}__keep_alive run it); to re-snapshot one table run the job "
            f"{pipeline.job_name}__resync with that table"
        ),
        allow_retries=False,
    )


def _cdc_asset(spec: PipelinesSpec, pipeline: Pipeline) -> dg.AssetsDefinition:
    specs = [
        dg.AssetSpec(**table_asset_attributes(spec, pipeline, table, verb="streamed", **CDC_ASSET_METADATA))  # type: ignore[arg-type]
        for table in pipeline.source.tables
    ]

    @dg.multi_asset(
        specs=specs,
        name=f"{pipeline.job_name}__cdc",
        op_tags=run_tags(pipeline),
        pool=cdc_pool(pipeline),
        can_subset=True,
        check_specs=cdc_check_specs(pipeline, specs),
    )
    def _stream(context: dg.AssetExecutionContext, config: CdcRunConfig, nilus_state: NilusStateStore):
        from nilus_dagster.cdc.pipeline import run_cdc_pipeline
        from nilus_dagster.cdc.snapshot import SnapshotCancelled
        from nilus_dagster.cdc.state_writer import BackgroundRead
        from nilus_dagster.sinks.factory import open_pipeline_sink

        _refuse_subset(context, pipeline, specs)
        ensure_pool_limit(context.instance, cdc_pool(pipeline))
        ensure_run_tags(context.op_execution_context, pipeline)
        store = nilus_state.get_store()
        stop = DeliberateStop(context.instance, context.run.run_id, context.log)
        approved = _approval_watch(store, pipeline)
        held = hold_watch(store, pipeline, stop)
        if held():  # launched while an operator holds the pipeline stopped or paused
            stop.end_canceled("nothing was read")
        engine_config = cdc_config(spec, pipeline)
        sink = open_pipeline_sink(spec, pipeline)
        targets = {
            t.table: (asset_key(pipeline, t), SinkTable(pipeline.sink.dataset, t.target_name))
            for t in pipeline.source.tables
        }
        drift = CdcDriftWatch(pipeline, engine_config.source_dsn, sink, targets)
        dead_letters = BackgroundRead(lambda: open_dead_letters(store, pipeline), DLQ_READ_INTERVAL_S)
        reporter = CdcAssetReporter(context, pipeline, drift, lambda: dead_letters.value_since(0.0))
        try:
            with stop.signals(), stop.ending(SnapshotCancelled, "finished snapshot partitions are kept"):
                result = run_cdc_pipeline(
                    engine_config,
                    sink,
                    store,
                    run_id=context.run.run_id,
                    should_stop=lambda: stop.requested() or held() or approved(),
                    on_progress=reporter,
                    stop_at_caught_up=config.stop_at == "caught_up",
                    interrupts=(dg.DagsterExecutionInterruptedError,),
                )
            drifts = {r.asset_key: r for r in drift.evaluate()} if reporter.streamed else {}
        finally:
            sink.close()
            dead_letters.close()
        if not reporter.streamed:  # stopped before the copies were current: no materialization
            stop.end_canceled("stopped before streaming (the next run resumes the snapshot)")
        summary = {
            "snapshot_rows": dg.MetadataValue.int(result.snapshot_rows),
            "events_total": dg.MetadataValue.int(result.stats.events_total),
            "transactions": dg.MetadataValue.int(result.stats.transactions),
            "events_per_s": dg.MetadataValue.float(round(result.stats.events_per_s, 1)),
            "lsn": dg.MetadataValue.text(reporter.last_lsn),
        }
        dlq_open = _read_or(lambda: open_dead_letters(store, pipeline), reporter.dlq_open)
        for table, key in reporter.tables.items():
            changes = reporter.changes_since_last(table, result.stats.table_changes)
            extra = {name: dg.MetadataValue.int(n) for name, n in changes.items()}
            if excluded := result.generated_columns.get(table):
                extra["excluded_generated_columns"] = dg.MetadataValue.text(", ".join(excluded))
            checks = [lag_check(pipeline, key, reporter.last_lag)] if pipeline.checks.max_lag else []
            checks.append(dlq_check(pipeline, key, None if dlq_open is None else dlq_open.get(table, 0)))
            checks += [drifts[key]] if key in drifts else []
            yield dg.MaterializeResult(asset_key=key, metadata={**summary, **extra}, check_results=checks)
        stop.end_canceled(f"{result.stats.events_total} changes applied in this run")

    return _stream


def _read_or(read: Callable[[], Any], fallback: Any) -> Any:
    """`read()`, or `fallback` when the state store does not answer."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - the state store is down: the newest value seen
        return fallback


def _keep_alive_sensor(spec: PipelinesSpec, pipeline: Pipeline) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{pipeline.job_name}__keep_alive",
        job_name=pipeline.job_name,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Keeps one CDC run of {pipeline.name} ({pipeline.tenant}) alive.",
    )
    def _keep_alive(context: dg.SensorEvaluationContext, nilus_state: NilusStateStore):
        ensure_pool_limit(context.instance, cdc_pool(pipeline))  # before any run of the pipeline launches
        store = nilus_state.get_store()
        decision = keep_alive_decision(context.instance, store, pipeline, pipeline.job_name)
        if not isinstance(decision, dg.SkipReason):
            return decision
        evaluations, cursor = held_wal_evaluations(spec, pipeline, store, context.cursor)  # while held
        return dg.SensorResult(skip_reason=decision, asset_events=evaluations, cursor=cursor)

    return _keep_alive


def keep_alive_decision(instance: dg.DagsterInstance, store, pipeline: Pipeline, job_name: str):  # noqa: ANN001
    """A RunRequest for the next generation, or a SkipReason saying why not."""
    tags_filter = {TENANT_TAG: pipeline.tenant, PIPELINE_TAG: pipeline.name}
    latest = instance.get_runs(dg.RunsFilter(tags=tags_filter), limit=1)
    last = latest[0] if latest else None
    held, operator_tags = sensor_hold(instance, store, pipeline, last)
    if held is not None:
        return dg.SkipReason(held)
    state = store.get_pipeline_state(pipeline.tenant, pipeline.name)
    if state is not None and state.state in ("failed", "stopped"):
        return dg.SkipReason(f"pipeline is {state.state}: {state.detail.get('reason', 'see its state')}")
    live = instance.get_runs(dg.RunsFilter(tags=tags_filter, statuses=list(LIVE_STATUSES)), limit=1)
    if live:
        run = live[0]
        if not _is_stale(store, pipeline, run):
            return dg.SkipReason(f"run {run.run_id} is live")
        end_stale_run(instance, run)  # terminate it (it may be wedged, not dead), then mark it failed
        return dg.RunRequest(run_key=f"{job_name}:{run.run_id}", tags=run_tags(pipeline))  # a crash: no backoff
    if last is not None and last.status == dg.DagsterRunStatus.FAILURE:
        wait = _backoff(instance, job_name, tags_filter)
        record = instance.get_run_record_by_id(last.run_id)
        ended = record.end_time if record and record.end_time else None
        if ended is not None and datetime.now(UTC).timestamp() - ended < wait.total_seconds():
            return dg.SkipReason(f"last run failed; retrying after {int(wait.total_seconds())}s")
    tags = {**run_tags(pipeline), **operator_tags}
    return dg.RunRequest(run_key=f"{job_name}:{last.run_id if last else 'initial'}", tags=tags)


def _is_stale(store, pipeline: Pipeline, run: dg.DagsterRun) -> bool:  # noqa: ANN001
    if run.status != dg.DagsterRunStatus.STARTED:
        return False
    beat = store.last_heartbeat(pipeline.tenant, pipeline.name)
    now = datetime.now(UTC)
    if beat is not None and beat.run_id == run.run_id:
        return now - beat.beat_at > STALE_HEARTBEAT
    return False  # the run has not beaten yet: its start is guarded by the run monitor


def _backoff(instance: dg.DagsterInstance, job_name: str, tags: dict[str, str]) -> timedelta:
    """Doubles with each consecutive failure, capped."""
    recent = instance.get_runs(dg.RunsFilter(tags=tags), limit=6)
    failures = 0
    for run in recent:
        if run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    return min(FAILURE_BACKOFF * (2 ** max(failures - 1, 0)), FAILURE_BACKOFF_MAX)


def cdc_pipeline_definitions(spec: PipelinesSpec, pipeline: Pipeline) -> dg.Definitions:
    assets = _cdc_asset(spec, pipeline)
    job = dg.define_asset_job(
        name=pipeline.job_name,
        selection=dg.AssetSelection.assets(assets),
        tags=run_tags(pipeline),
        executor_def=dg.in_process_executor,
        description=pipeline.description or f"CDC pipeline {pipeline.name} of tenant {pipeline.tenant}",
    )
    return dg.Definitions(
        assets=[assets],
        jobs=[job, *operator_jobs(spec, pipeline)],
        sensors=[_keep_alive_sensor(spec, pipeline)],
    )


__all__ = ["STATE_RESOURCE_KEY", "cdc_config", "cdc_pipeline_definitions", "keep_alive_decision", "pipeline_key"]
