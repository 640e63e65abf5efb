"""Run tags: the join key between Dagster run storage and the monitoring API."""

from __future__ import annotations

from typing import Any

from nilus_dagster.spec.pipelines import Pipeline

TENANT_TAG = "nilus/tenant"
PIPELINE_TAG = "nilus/pipeline"
RESOURCE_ID_TAG = "nilus/resource_id"
RUN_AS_USER_TAG = "nilus/run_as_user"
PIPELINE_TYPE_TAG = "nilus/type"
# A tag whose value is unique per pipeline: the run queue limits CDC runs to one per pipeline by it.
CDC_PIPELINE_TAG = "nilus/cdc_pipeline"
OPERATION_TAG = "nilus/operation"


def run_tags(pipeline: Pipeline) -> dict[str, str]:
    tags = {
        TENANT_TAG: pipeline.tenant,
        PIPELINE_TAG: pipeline.name,
        RESOURCE_ID_TAG: pipeline.effective_resource_id,
        PIPELINE_TYPE_TAG: pipeline.type,
    }
    if pipeline.run_as_user:
        tags[RUN_AS_USER_TAG] = pipeline.run_as_user
    if pipeline.type == "cdc":
        tags[CDC_PIPELINE_TAG] = pipeline.job_name
    return tags


def operation_tags(pipeline: Pipeline, operation: str) -> dict[str, str]:
    """Tags of an operator job (approve, reset) on a pipeline. Not the pipeline's own run tags: such
    a run is not a pipeline run in the API's history, and must not queue behind the live CDC run
    that it acts on (the run queue admits one `nilus/cdc_pipeline` run per pipeline)."""
    return {TENANT_TAG: pipeline.tenant, OPERATION_TAG: f"{pipeline.name}:{operation}"}


def cdc_pool(pipeline: Pipeline) -> str:
    """The Dagster concurrency pool of a CDC pipeline's op. Its limit of one holds every launch of
    the pipeline (its job, the sensor, "Materialize" on its assets, the launchpad) behind the live run."""
    return f"nilus_cdc__{pipeline.job_name}"


def ensure_pool_limit(instance: Any, pool: str) -> None:  # a DagsterInstance
    """Give the pool its limit of one run (idempotent; storages without pools are left alone)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    if storage.get_concurrency_info(pool).slot_count != 1:
        storage.set_concurrency_slots(pool, 1)
