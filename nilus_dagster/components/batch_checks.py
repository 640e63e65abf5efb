"""Standard Dagster metadata and asset checks of a batch table load.

`row_count_parity` (full loads: `replace`, and `merge` without cursor): the rows the load read in
its snapshot against the rows in the sink table after the commit. A `merge` keeps rows deleted in
the source, so there the check fails with the surplus until the table is reloaded with `replace`.
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from nilus_dagster.spec.pipelines import Pipeline, SourceTable

ROW_COUNT_CHECK = "row_count_parity"


def has_row_count_check(pipeline: Pipeline, table: SourceTable) -> bool:
    return pipeline.sink.strategy in ("replace", "merge") and not table.cursor


def batch_check_specs(pipeline: Pipeline, table: SourceTable, key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    if not has_row_count_check(pipeline, table):
        return []
    return [
        dg.AssetCheckSpec(
            ROW_COUNT_CHECK,
            asset=key,
            description="The sink table holds as many rows as the source table had in the load's snapshot.",
        )
    ]


def column_schema(schema: Any) -> dg.TableSchema:  # nilus TableSchema
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=c.name,
                type=c.source_type,
                constraints=dg.TableColumnConstraints(nullable=c.nullable),
            )
            for c in schema.columns
        ]
    )


def check_severity(pipeline: Pipeline) -> dg.AssetCheckSeverity:
    """`checks.severity` of the pipeline, as Dagster spells it."""
    return dg.AssetCheckSeverity.ERROR if pipeline.checks.severity == "error" else dg.AssetCheckSeverity.WARN


def row_count_result(
    pipeline: Pipeline, key: dg.AssetKey, source_rows: int, sink_rows: int, **extra: dg.MetadataValue
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=ROW_COUNT_CHECK,
        passed=source_rows == sink_rows,
        severity=check_severity(pipeline),
        metadata={
            "source_rows": dg.MetadataValue.int(source_rows),
            "sink_rows": dg.MetadataValue.int(sink_rows),
            "difference": dg.MetadataValue.int(sink_rows - source_rows),
            **extra,
        },
    )
