"""A CDC pipeline in Dagster: one long-lived multi-asset op, its job, and a keep-alive sensor."""

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

import dagster as dg
from pydantic import Field

from nilus_dagster.components.batch_assets import STATE_RESOURCE_KEY, ensure_run_tags
from nilus_dagster.components.naming import table_asset_attributes
from nilus_dagster.components.stale_runs import end_stale_run
from nilus_dagster.components.tags import PIPELINE_TAG, TENANT_TAG, operation_tags, run_tags
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import NilusStateStore, PipelineKey, StateStore

OBSERVATION_INTERVAL_S = 30.0  # thousands of observations per run would make the UI crawl
STATE_POLL_INTERVAL_S = 5.0
STALE_HEARTBEAT = timedelta(minutes=3)
FAILURE_BACKOFF = timedelta(minutes=1)
FAILURE_BACKOFF_MAX = timedelta(minutes=30)


class CdcRunConfig(dg.Config):
    """`stop_at: caught_up` stops once the WAL position seen at the start is applied (tests,
    scheduled catch-up); `never` streams until the run is terminated."""

    stop_at: Literal["never", "caught_up"] = "never"


class ResyncConfig(dg.Config):
    """Run config of the `<tenant>__<pipeline>__resync` job."""

    tables: list[str] = Field(description="the tables to re-snapshot, as schema.table")
    reason: str = "operator request"
    wait_s: float = 600.0  # how long the job waits for the live CDC run to finish the resync


def pipeline_key(pipeline: Pipeline) -> PipelineKey:
    return PipelineKey(pipeline.tenant, pipeline.name, pipeline.effective_resource_id)


def cdc_config(spec: PipelinesSpec, pipeline: Pipeline):  # -> CdcPipelineConfig (imported lazily)
    from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcTableConfig
    from nilus_dagster.sinks.base import SinkTable

    source = spec.connections[pipeline.source.connection]
    options = pipeline.cdc
    return CdcPipelineConfig(
        key=pipeline_key(pipeline),
        source_connection=pipeline.source.connection,
        source_dsn=source.dsn(pipeline.source.connection),  # type: ignore[union-attr]
        tables=tuple(
            CdcTableConfig(
                t.table,
                SinkTable(pipeline.sink.dataset, t.target_name),
                tuple(t.primary_key) if t.primary_key else None,
            )
            for t in pipeline.source.tables
        ),
        snapshot=options.snapshot,
        snapshot_workers=options.snapshot_workers,
        snapshot_partition_blocks=options.snapshot_partition_blocks,
        batch_max_rows=options.batch_max_rows,
        batch_max_ms=options.batch_max_ms,
        soft_delete=options.soft_delete,
        schema_changes=pipeline.schema_changes,
        slot_name=options.slot_name,
        publication_name=options.publication_name,
        retry_for_s=options.retry_for_s,
    )


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


def _cdc_asset(spec: PipelinesSpec, pipeline: Pipeline) -> dg.AssetsDefinition:
    specs = [
        dg.AssetSpec(**table_asset_attributes(spec, pipeline, table, verb="streamed", **CDC_ASSET_METADATA))  # type: ignore[arg-type]
        for table in pipeline.source.tables
    ]

    @dg.multi_asset(specs=specs, name=f"{pipeline.job_name}__cdc", op_tags=run_tags(pipeline))
    def _stream(context: dg.AssetExecutionContext, config: CdcRunConfig, nilus_state: NilusStateStore):
        from nilus_dagster.cdc.pipeline import CdcProgress, run_cdc_pipeline
        from nilus_dagster.sinks.factory import open_pipeline_sink

        ensure_run_tags(context.op_execution_context, pipeline)
        store = nilus_state.get_store()
        last_observation = 0.0

        def observe(progress: CdcProgress) -> None:
            nonlocal last_observation
            if time.monotonic() - last_observation < OBSERVATION_INTERVAL_S:
                return
            last_observation = time.monotonic()
            for asset_spec in specs:
                context.log_event(dg.AssetObservation(asset_key=asset_spec.key, metadata=_metadata(progress)))

        sink = open_pipeline_sink(spec, pipeline)
        try:
            result = run_cdc_pipeline(
                cdc_config(spec, pipeline),
                sink,
                store,
                run_id=context.run.run_id,
                should_stop=_approval_watch(store, pipeline),
                on_progress=observe,
                stop_at_caught_up=config.stop_at == "caught_up",
                interrupts=(dg.DagsterExecutionInterruptedError,),
            )
        finally:
            sink.close()
        summary = {
            "snapshot_rows": dg.MetadataValue.int(result.snapshot_rows),
            "events_total": dg.MetadataValue.int(result.stats.events_total),
            "transactions": dg.MetadataValue.int(result.stats.transactions),
            "events_per_s": dg.MetadataValue.float(round(result.stats.events_per_s, 1)),
        }
        for asset_spec in specs:
            excluded = result.generated_columns.get(str(asset_spec.metadata["nilus/source_table"]))
            extra = {"excluded_generated_columns": dg.MetadataValue.text(", ".join(excluded))} if excluded else {}
            yield dg.MaterializeResult(asset_key=asset_spec.key, metadata={**summary, **extra})

    return _stream


def _metadata(progress) -> dict[str, dg.MetadataValue]:  # noqa: ANN001 - CdcProgress, imported lazily
    metadata = {
        "phase": dg.MetadataValue.text(progress.phase),
        "lsn": dg.MetadataValue.text(progress.lsn or ""),
        "lag_seconds": dg.MetadataValue.float(progress.lag_seconds),
        "events_total": dg.MetadataValue.int(progress.events_total),
        "events_per_s": dg.MetadataValue.float(progress.events_per_s),
    }
    if progress.retained_wal_bytes is not None:
        metadata["slot_retained_wal_bytes"] = dg.MetadataValue.int(progress.retained_wal_bytes)
    if getattr(progress, "unconfirmed_wal_bytes", None) is not None:  # the source's side of the lag
        metadata["slot_unconfirmed_wal_bytes"] = dg.MetadataValue.int(progress.unconfirmed_wal_bytes)
    if progress.phase == "snapshot":
        metadata["snapshot_rows"] = dg.MetadataValue.int(progress.snapshot_rows)
    return metadata


def _keep_alive_sensor(pipeline: Pipeline) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"{pipeline.job_name}__keep_alive",
        job_name=pipeline.job_name,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Keeps one CDC run of {pipeline.name} ({pipeline.tenant}) alive.",
    )
    def _keep_alive(context: dg.SensorEvaluationContext, nilus_state: NilusStateStore):
        return keep_alive_decision(context.instance, nilus_state.get_store(), pipeline, pipeline.job_name)

    return _keep_alive


def keep_alive_decision(instance: dg.DagsterInstance, store, pipeline: Pipeline, job_name: str):  # noqa: ANN001
    """A RunRequest for the next generation, or a SkipReason saying why not."""
    state = store.get_pipeline_state(pipeline.tenant, pipeline.name)
    if state is not None and state.state in ("failed", "stopped"):
        return dg.SkipReason(f"pipeline is {state.state}: {state.detail.get('reason', 'see its state')}")
    tags_filter = {TENANT_TAG: pipeline.tenant, PIPELINE_TAG: pipeline.name}
    live = instance.get_runs(dg.RunsFilter(job_name=job_name, tags=tags_filter, statuses=list(_LIVE_STATUSES)), limit=1)
    if live:
        run = live[0]
        if not _is_stale(store, pipeline, run):
            return dg.SkipReason(f"run {run.run_id} is live")
        end_stale_run(instance, run)  # terminate it (it may be wedged, not dead), then mark it failed
        return dg.RunRequest(run_key=f"{job_name}:{run.run_id}", tags=run_tags(pipeline))  # a crash: no backoff
    latest = instance.get_runs(dg.RunsFilter(job_name=job_name, tags=tags_filter), limit=1)
    last = latest[0] if latest else None
    if last is not None and last.status == dg.DagsterRunStatus.FAILURE:
        wait = _backoff(instance, job_name, tags_filter)
        record = instance.get_run_record_by_id(last.run_id)
        ended = record.end_time if record and record.end_time else None
        if ended is not None and datetime.now(UTC).timestamp() - ended < wait.total_seconds():
            return dg.SkipReason(f"last run failed; retrying after {int(wait.total_seconds())}s")
    return dg.RunRequest(run_key=f"{job_name}:{last.run_id if last else 'initial'}", tags=run_tags(pipeline))


_LIVE_STATUSES = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)


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
    recent = instance.get_runs(dg.RunsFilter(job_name=job_name, tags=tags), limit=6)
    failures = 0
    for run in recent:
        if run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    return min(FAILURE_BACKOFF * (2 ** max(failures - 1, 0)), FAILURE_BACKOFF_MAX)


def _operator_job(pipeline: Pipeline, operation: str, act: Callable[[StateStore], str]) -> dg.JobDefinition:
    """A one-op job `<tenant>__<pipeline>__<operation>` that acts on the pipeline's state."""
    name = f"{pipeline.job_name}__{operation}"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, operation))
    def _act(context: dg.OpExecutionContext, nilus_state: NilusStateStore) -> None:
        context.log.info(act(nilus_state.get_store()))

    @dg.job(name=name, tags=operation_tags(pipeline, operation))
    def _job() -> None:
        _act()

    return _job


def _resync_job(spec: PipelinesSpec, pipeline: Pipeline) -> dg.JobDefinition:
    """`<tenant>__<pipeline>__resync`: re-snapshot the tables named in the run config while the
    others keep streaming; the live CDC run (or else the next one) does it, this job waits."""
    name = f"{pipeline.job_name}__resync"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, "resync"))
    def _act(context: dg.OpExecutionContext, config: ResyncConfig, nilus_state: NilusStateStore) -> None:
        from nilus_dagster.cdc.operations import ResyncFailed, resync_tables
        from nilus_dagster.cdc.resync import UnknownTables

        try:
            message = resync_tables(
                cdc_config(spec, pipeline),
                nilus_state.get_store(),
                config.tables,
                config.reason,
                wait_s=config.wait_s,
                log=context.log.info,
            )
        except (UnknownTables, ResyncFailed) as error:
            raise dg.Failure(str(error)) from None
        context.log.info(message)

    @dg.job(name=name, tags=operation_tags(pipeline, "resync"))
    def _job() -> None:
        _act()

    return _job


def _operator_jobs(spec: PipelinesSpec, pipeline: Pipeline) -> list[dg.JobDefinition]:
    from nilus_dagster.cdc.operations import approve_schema_change, reset_pipeline

    def approve(store: StateStore) -> str:
        table = approve_schema_change(store, pipeline_key(pipeline))
        return f"approved the schema change of {table}; the CDC run restarts with it"

    def reset(store: StateStore) -> str:
        slot = reset_pipeline(cdc_config(spec, pipeline), store)
        return f"dropped slot {slot} and the snapshot progress; the next run snapshots every table again"

    return [
        _operator_job(pipeline, "approve_schema", approve),
        _operator_job(pipeline, "reset", reset),
        _resync_job(spec, pipeline),
    ]


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
        jobs=[job, *_operator_jobs(spec, pipeline)],
        sensors=[_keep_alive_sensor(pipeline)],
    )


__all__ = ["STATE_RESOURCE_KEY", "cdc_pipeline_definitions", "keep_alive_decision"]
