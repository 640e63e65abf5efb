"""How pipelines and tables are named in Dagster: asset keys, groups, kinds, tags."""

from __future__ import annotations

import re

import dagster as dg

from nilus_dagster.spec.pipelines import Pipeline, SourceTable
from nilus_dagster.spec.project import PipelinesSpec

_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.-]{0,63}$")


def asset_key(pipeline: Pipeline, table: SourceTable) -> dg.AssetKey:
    return dg.AssetKey([pipeline.tenant, pipeline.name, table.table.schema, table.table.name])


def source_asset_key(pipeline: Pipeline, table: SourceTable) -> dg.AssetKey:
    """The source table as an external asset, upstream of the table's sink asset (lineage)."""
    return dg.AssetKey([pipeline.tenant, "sources", pipeline.source.connection, table.table.schema, table.table.name])


_PRODUCT = {"postgres": "PostgreSQL", "mysql": "MySQL"}


def source_asset_specs(spec: PipelinesSpec) -> list[dg.AssetSpec]:
    """One external asset per source table read by any pipeline (shared by pipelines reading it)."""
    specs: dict[dg.AssetKey, dg.AssetSpec] = {}
    for pipeline in spec.pipelines:
        for table in pipeline.source.tables:
            key = source_asset_key(pipeline, table)
            source_type = spec.connections[pipeline.source.connection].type
            specs.setdefault(
                key,
                dg.AssetSpec(
                    key=key,
                    group_name=f"{pipeline.tenant}__sources",
                    kinds={source_type},
                    description=f"{table.name} in the {_PRODUCT[source_type]} connection {pipeline.source.connection}",
                    metadata={"dagster/table_name": dg.MetadataValue.text(table.name)},
                ),
            )
    return list(specs.values())


def kinds(pipeline: Pipeline, spec: PipelinesSpec) -> set[str]:
    return {spec.connections[pipeline.source.connection].type, spec.connections[pipeline.sink.connection].type}


def asset_tags(pipeline: Pipeline) -> dict[str, str]:
    """Labels become asset tags (those Dagster accepts as tags; all remain in the YAML)."""
    tags = {"nilus/tenant": pipeline.tenant, "nilus/type": pipeline.type}
    tags.update({k: v for k, v in pipeline.labels.items() if _TAG_VALUE.match(k) and _TAG_VALUE.match(v)})
    return tags


def table_asset_attributes(
    spec: PipelinesSpec, pipeline: Pipeline, table: SourceTable, *, verb: str, **metadata: str
) -> dict[str, object]:
    """What every table asset carries: key, group, kinds, tags, description and where it lands."""
    return {
        "key": asset_key(pipeline, table),
        "deps": [source_asset_key(pipeline, table)],
        "group_name": pipeline.job_name,
        "kinds": kinds(pipeline, spec),
        "tags": asset_tags(pipeline),
        "description": pipeline.description or f"{table.name} {verb} by {pipeline.type} pipeline {pipeline.name}",
        "metadata": {
            "dagster/table_name": dg.MetadataValue.text(f"{pipeline.sink.dataset}.{table.target_name}"),
            "nilus/source_table": table.name,
            "nilus/sink": f"{pipeline.sink.connection}:{pipeline.sink.dataset}.{table.target_name}",
            **metadata,
        },
    }
