"""Sinks from connection declarations (secrets are read from the environment here, at run time)."""

from __future__ import annotations

from nilus_dagster.sinks.base import Sink
from nilus_dagster.spec.connections import (
    BigQueryConnection,
    Connection,
    DuckDBConnection,
    PostgresConnection,
)
from nilus_dagster.spec.pipelines import BigQueryTableOptions, Pipeline
from nilus_dagster.spec.project import PipelinesSpec


def open_sink(
    name: str,
    connection: Connection,
    *,
    dataset: str | None = None,
    table_options: BigQueryTableOptions | None = None,
) -> Sink:
    """The sink of connection `name`. `dataset` is the pipeline's sink dataset: BigQuery keeps the
    checkpoint table there, next to the pipeline's tables (the SQL sinks keep theirs in a fixed
    schema); `table_options` apply to the BigQuery tables the sink creates."""
    if isinstance(connection, DuckDBConnection):
        from nilus_dagster.sinks.duckdb import DuckDBSink

        return DuckDBSink(connection.path)
    if isinstance(connection, PostgresConnection):
        from nilus_dagster.sinks.postgres import PostgresSink

        return PostgresSink(connection.dsn(name))
    if isinstance(connection, BigQueryConnection):
        from nilus_dagster.sinks.bigquery import open_bigquery_sink

        return open_bigquery_sink(name, connection, table_options, dataset=dataset)
    raise TypeError(f"connection '{name}' of type {connection.type} cannot be a sink")


def open_pipeline_sink(spec: PipelinesSpec, pipeline: Pipeline) -> Sink:
    """The sink a pipeline writes to, its dataset and table options applied."""
    return open_sink(
        pipeline.sink.connection,
        spec.connections[pipeline.sink.connection],
        dataset=pipeline.sink.dataset,
        table_options=pipeline.sink.table_options,
    )
