"""One Dagster asset per source table of a batch pipeline."""

import dagster as dg

from nilus_dagster.components.naming import table_asset_attributes
from nilus_dagster.components.tags import run_tags
from nilus_dagster.sinks.base import SinkTable, WriteStrategy
from nilus_dagster.spec.pipelines import Pipeline, SourceTable
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state import NilusStateStore, PipelineKey

STATE_RESOURCE_KEY = "nilus_state"


def ensure_run_tags(context: dg.OpExecutionContext, pipeline: Pipeline) -> None:
    """Runs launched outside the pipeline's job (e.g. 'Materialize' in the UI) get the tags too."""
    missing = {k: v for k, v in run_tags(pipeline).items() if context.run.tags.get(k) != v}
    if missing:
        context.instance.add_run_tags(context.run_id, missing)


def batch_table_asset(spec: PipelinesSpec, pipeline: Pipeline, table: SourceTable) -> dg.AssetsDefinition:
    source = spec.connections[pipeline.source.connection]

    @dg.asset(
        **table_asset_attributes(  # type: ignore[arg-type]
            spec,
            pipeline,
            table,
            verb="loaded",
            **{"nilus/strategy": pipeline.sink.strategy, "nilus/cursor": table.cursor or "(full load)"},
        ),
        op_tags=run_tags(pipeline),
    )
    def _load(context: dg.AssetExecutionContext, nilus_state: NilusStateStore) -> dg.MaterializeResult:
        from nilus_dagster.batch import BatchTableLoad, load_table
        from nilus_dagster.sinks.factory import open_pipeline_sink

        ensure_run_tags(context.op_execution_context, pipeline)
        load = BatchTableLoad(
            key=PipelineKey(pipeline.tenant, pipeline.name, pipeline.effective_resource_id),
            source_connection=pipeline.source.connection,
            source_dsn=source.dsn(pipeline.source.connection),  # type: ignore[union-attr]
            table=table,
            target=SinkTable(pipeline.sink.dataset, table.target_name),
            strategy=WriteStrategy(pipeline.sink.strategy),
            schema_changes=pipeline.schema_changes,
        )
        sink = open_pipeline_sink(spec, pipeline)
        try:
            result = load_table(load, sink, nilus_state.get_store())
        finally:
            sink.close()
        metadata: dict[str, object] = {
            "rows": dg.MetadataValue.int(result.rows),
            "bytes": dg.MetadataValue.int(result.bytes),
            "duration_s": dg.MetadataValue.float(round(result.duration_s, 3)),
            "rows_per_s": dg.MetadataValue.float(round(result.rows / max(result.duration_s, 1e-9), 1)),
        }
        if table.cursor:
            metadata["high_water_mark"] = dg.MetadataValue.text(result.high_water_mark or "")
            metadata["previous_high_water_mark"] = dg.MetadataValue.text(result.previous_mark or "")
        if result.added_columns:
            metadata["added_columns"] = dg.MetadataValue.text(", ".join(result.added_columns))
        if result.schema_change:
            metadata["schema_change"] = dg.MetadataValue.text(result.schema_change)
        return dg.MaterializeResult(metadata=metadata)

    return _load
