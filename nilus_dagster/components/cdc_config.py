"""A CDC pipeline's run settings: the run config of its jobs and the engine's configuration."""

from typing import Literal

import dagster as dg
from pydantic import Field

from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import PipelineKey


class CdcRunConfig(dg.Config):
    """`stop_at: caught_up` stops once the WAL position seen at the start is applied (tests,
    scheduled catch-up); `never` streams until the run is terminated."""

    stop_at: Literal["never", "caught_up"] = "never"


class ResyncConfig(dg.Config):
    """Run config of the `<tenant>__<pipeline>__resync` job."""

    tables: list[str] = Field(description="the tables to re-snapshot, as schema.table")
    reason: str = "operator request"
    wait_s: float = 600.0  # how long the job waits for the live CDC run to finish the resync


class RetryTablesConfig(dg.Config):
    """Run config of the `<tenant>__<pipeline>__retry_tables` job."""

    tables: list[str] = Field(description="the failed tables to stream again, as schema.table")


class ReplayDeadLettersConfig(dg.Config):
    """Run config of the `<tenant>__<pipeline>__replay_dead_letters` job: the unacknowledged
    entries with these ids and/or of this table (at least one of the two)."""

    ids: list[int] = Field(default_factory=list, description="dead-letter entry ids (empty: any)")
    table: str | None = Field(default=None, description="only entries of this table, as schema.table")
    wait_s: float = 600.0  # how long the job waits for the live CDC run to replay them


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
        on_error=pipeline.on_error,
        slot_name=options.slot_name,
        publication_name=options.publication_name,
        retry_for_s=options.retry_for_s,
        row_count_interval_s=None if options.soft_delete else pipeline.checks.row_count_interval_seconds,
    )
