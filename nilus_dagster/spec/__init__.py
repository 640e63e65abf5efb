"""Pipeline declarations: pydantic models and their validation (no Dagster, no I/O)."""

from nilus_dagster.spec.connections import (
    BigQueryConnection,
    Connection,
    DuckDBConnection,
    MissingSecret,
    MySQLConnection,
    PostgresConnection,
)
from nilus_dagster.spec.pipelines import CdcOptions, Pipeline, Sink, Source, SourceTable
from nilus_dagster.spec.project import PipelinesSpec, StateStoreSettings

__all__ = [
    "BigQueryConnection",
    "CdcOptions",
    "Connection",
    "DuckDBConnection",
    "MissingSecret",
    "MySQLConnection",
    "Pipeline",
    "PipelinesSpec",
    "PostgresConnection",
    "Sink",
    "Source",
    "SourceTable",
    "StateStoreSettings",
]
