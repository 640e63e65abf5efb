"""One Dagster asset per source table of a batch pipeline."""

import dagster as dg

from nilus_dagster.components.batch_checks import (
    batch_check_specs,
    column_schema,
    has_row_count_check,
    row_count_result,
)
from nilus_dagster.components.naming import asset_key, table_asset_attributes
from nilus_dagster.components.schema_drift import drift_check_spec, drift_result
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
        check_specs=[
            *batch_check_specs(pipeline, table, asset_key(pipeline, table)),
            drift_check_spec(asset_key(pipeline, table)),
        ],
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
            source_type=source.type,
        )
        key = asset_key(pipeline, table)

        def progress(rows: int, total: int | None) -> None:
            share = f" (about {min(100, round(100 * rows / total))}% of ~{total:,})" if total else ""
            context.log.info(f"{table.name}: {rows:,} rows read{share}")
            metadata = {"rows_read": dg.MetadataValue.int(rows)}
            if total:
                metadata["estimated_total_rows"] = dg.MetadataValue.int(total)
            context.log_event(dg.AssetObservation(asset_key=key, metadata=metadata))

        sink = open_pipeline_sink(spec, pipeline)
        try:
            result = load_table(load, sink, nilus_state.get_store(), on_progress=progress)
            sink_rows = result.table_rows if result.table_rows is not None else sink.row_count(load.target)
            checks = [drift_result(pipeline, key, result.schema.column_names, sink.column_names(load.target))]
        finally:
            sink.close()
        if has_row_count_check(pipeline, table):
            checks.append(row_count_result(pipeline, key, result.rows, sink_rows))
        metadata: dict[str, object] = {
            "dagster/row_count": dg.MetadataValue.int(sink_rows),
            "dagster/column_schema": dg.MetadataValue.table_schema(column_schema(result.schema)),
            "rows": dg.MetadataValue.int(result.rows),
            "bytes": dg.MetadataValue.int(result.bytes),
            "duration_s": dg.MetadataValue.float(round(result.duration_s, 3)),
            "rows_per_s": dg.MetadataValue.float(round(result.rows / max(result.duration_s, 1e-9), 1)),
        }
        if result.inserted is not None:
            metadata["rows_inserted"] = dg.MetadataValue.int(result.inserted)
            metadata["rows_updated"] = dg.MetadataValue.int(result.rows - result.inserted)
        if table.cursor:
            metadata["high_water_mark"] = dg.MetadataValue.text(result.high_water_mark or "")
            metadata["previous_high_water_mark"] = dg.MetadataValue.text(result.previous_mark or "")
        if result.added_columns:
            metadata["added_columns"] = dg.MetadataValue.text(", ".join(result.added_columns))
        if result.schema_change:
            metadata["schema_change"] = dg.MetadataValue.text(result.schema_change)
        return dg.MaterializeResult(metadata=metadata, check_results=checks)

    return _load
