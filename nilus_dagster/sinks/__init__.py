"""Sinks: where rows land (DuckDB, PostgreSQL, BigQuery), behind one protocol."""

from nilus_dagster.sinks.base import (
    ChangeSet,
    Checkpoint,
    Sink,
    SinkError,
    SinkTable,
    UnsupportedColumnType,
    WriteResult,
    WriteStrategy,
)

__all__ = [
    "ChangeSet",
    "Checkpoint",
    "Sink",
    "SinkError",
    "SinkTable",
    "UnsupportedColumnType",
    "WriteResult",
    "WriteStrategy",
]
