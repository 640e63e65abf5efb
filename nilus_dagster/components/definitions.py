"""Pipelines → Dagster definitions: assets per table, a job per pipeline, schedules, sensors."""

from __future__ import annotations

import functools

import dagster as dg

from nilus_dagster.components.batch_assets import STATE_RESOURCE_KEY, batch_table_asset
from nilus_dagster.components.naming import asset_key, source_asset_specs
from nilus_dagster.components.tags import run_tags
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import NilusStateStore


def _batch_definitions(spec: PipelinesSpec, pipeline: Pipeline) -> dg.Definitions:
    assets = [batch_table_asset(spec, pipeline, table) for table in pipeline.source.tables]
    job = dg.define_asset_job(
        name=pipeline.job_name,
        selection=dg.AssetSelection.assets(*(asset_key(pipeline, t) for t in pipeline.source.tables)),
        tags=run_tags(pipeline),
        description=pipeline.description or f"Batch pipeline {pipeline.name} of tenant {pipeline.tenant}",
    )
    schedules = []
    if pipeline.schedule:
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{pipeline.job_name}__schedule",
                job=job,
                cron_schedule=pipeline.schedule,
                execution_timezone=pipeline.schedule_timezone,
                tags=run_tags(pipeline),
                default_status=dg.DefaultScheduleStatus.RUNNING,
            )
        )
    return dg.Definitions(assets=assets, jobs=[job], schedules=schedules)


def _cdc_definitions(spec: PipelinesSpec, pipeline: Pipeline) -> dg.Definitions:
    from nilus_dagster.components.cdc_assets import cdc_pipeline_definitions

    return cdc_pipeline_definitions(spec, pipeline)


@functools.cache
def _state_store(dsn_env: str, schema_name: str) -> NilusStateStore:
    """One resource object per state store, so that several defs.yaml files merge into one project."""
    return NilusStateStore(dsn=dg.EnvVar(dsn_env), schema_name=schema_name)


def build_definitions(spec: PipelinesSpec) -> dg.Definitions:
    parts = [_batch_definitions(spec, p) if p.type == "batch" else _cdc_definitions(spec, p) for p in spec.pipelines]
    state_store = _state_store(spec.state_store.dsn_env, spec.state_store.schema_name)
    sources = dg.Definitions(assets=source_asset_specs(spec))
    return dg.Definitions.merge(*parts, sources, dg.Definitions(resources={STATE_RESOURCE_KEY: state_store}))
