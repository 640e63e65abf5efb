"""Operator jobs of a CDC pipeline: approve a held schema change, reset, resync tables, retry
failed tables, replay dead-letter entries."""

from collections.abc import Callable

import dagster as dg

from nilus_dagster.components.cdc_config import (
    ReplayDeadLettersConfig,
    ResyncConfig,
    RetryTablesConfig,
    cdc_config,
    pipeline_key,
)
from nilus_dagster.components.lifecycle import lifecycle_jobs
from nilus_dagster.components.operator_audit import Refusals, audited
from nilus_dagster.components.tags import operation_tags
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import NilusStateStore, StateStore


def _operator_job(
    pipeline: Pipeline, operation: str, action: str, act: Callable[[StateStore], str], refusals: Refusals
) -> dg.JobDefinition:
    """A one-op job `<tenant>__<pipeline>__<operation>` that acts on the pipeline's state (audited)."""
    name = f"{pipeline.job_name}__{operation}"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, operation))
    def _act(context: dg.OpExecutionContext, nilus_state: NilusStateStore) -> None:
        store = nilus_state.get_store()
        context.log.info(audited(context, store, pipeline, action, {}, lambda: act(store), refusals))

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

        store = nilus_state.get_store()

        def act() -> str:
            return resync_tables(
                cdc_config(spec, pipeline), store, config.tables, config.reason, wait_s=config.wait_s,
                log=context.log.info,
            )

        params = {"tables": list(config.tables), "reason": config.reason}
        context.log.info(audited(context, store, pipeline, "resync", params, act, (UnknownTables, ResyncFailed)))

    @dg.job(name=name, tags=operation_tags(pipeline, "resync"))
    def _job() -> None:
        _act()

    return _job


def _retry_tables_job(spec: PipelinesSpec, pipeline: Pipeline) -> dg.JobDefinition:
    """`<tenant>__<pipeline>__retry_tables`: stream failed tables again from their checkpoints."""
    name = f"{pipeline.job_name}__retry_tables"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, "retry_tables"))
    def _act(context: dg.OpExecutionContext, config: RetryTablesConfig, nilus_state: NilusStateStore) -> None:
        from nilus_dagster.cdc.operations import NothingToRetry, retry_tables
        from nilus_dagster.cdc.resync import UnknownTables

        store = nilus_state.get_store()

        def act() -> str:
            return retry_tables(cdc_config(spec, pipeline), store, config.tables)

        params = {"tables": list(config.tables)}
        refusals = (UnknownTables, NothingToRetry)
        context.log.info(audited(context, store, pipeline, "retry_tables", params, act, refusals))

    @dg.job(name=name, tags=operation_tags(pipeline, "retry_tables"))
    def _job() -> None:
        _act()

    return _job


def _replay_dead_letters_job(spec: PipelinesSpec, pipeline: Pipeline) -> dg.JobDefinition:
    """`<tenant>__<pipeline>__replay_dead_letters`: once the cause is fixed, write the current source
    rows of the chosen entries' keys and acknowledge them (the CDC run does it: cdc/dlq_replay.py)."""
    name = f"{pipeline.job_name}__replay_dead_letters"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, "replay_dead_letters"))
    def _act(context: dg.OpExecutionContext, config: ReplayDeadLettersConfig, nilus_state: NilusStateStore) -> None:
        from nilus_dagster.cdc.operations import NothingToReplay, ReplayFailed, replay_dead_letters
        from nilus_dagster.cdc.resync import UnknownTables

        try:
            context.log.info(replay_dead_letters(
                cdc_config(spec, pipeline), nilus_state.get_store(), config.ids, config.table, wait_s=config.wait_s
            ))
        except (UnknownTables, NothingToReplay, ReplayFailed) as error:
            raise dg.Failure(str(error)) from None

    @dg.job(name=name, tags=operation_tags(pipeline, "replay_dead_letters"))
    def _job() -> None:
        _act()

    return _job


def operator_jobs(spec: PipelinesSpec, pipeline: Pipeline) -> list[dg.JobDefinition]:
    from nilus_dagster.cdc.operations import NothingToApprove, approve_schema_change, reset_pipeline

    def approve(store: StateStore) -> str:
        table = approve_schema_change(store, pipeline_key(pipeline))
        return f"approved the schema change of {table}; the CDC run restarts with it"

    def reset(store: StateStore) -> str:
        slot = reset_pipeline(cdc_config(spec, pipeline), store)
        return f"dropped slot {slot} and the snapshot progress; the next run snapshots every table again"

    return [
        _operator_job(pipeline, "approve_schema", "schema:approve", approve, (NothingToApprove,)),
        _operator_job(pipeline, "reset", "reset", reset, ()),
        _resync_job(spec, pipeline),
        _retry_tables_job(spec, pipeline),
        _replay_dead_letters_job(spec, pipeline),
        *lifecycle_jobs(pipeline),
    ]
