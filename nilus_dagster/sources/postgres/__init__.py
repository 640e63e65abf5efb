"""The PostgreSQL source: catalog lookups and a COPY-based reader producing Arrow batches."""

from nilus_dagster.sources.postgres.catalog import (
    SourceError,
    TableNotFound,
    TableSize,
    read_table_schema,
    replica_identity,
    table_size,
)
from nilus_dagster.sources.postgres.reader import ReadStats, read_table
from nilus_dagster.sources.postgres.text_codec import (
    ValueDecodeError,
    json_text_array_to_arrow,
    parse_array_literal,
    text_to_arrow,
)

__all__ = [
    "ReadStats",
    "SourceError",
    "TableNotFound",
    "TableSize",
    "ValueDecodeError",
    "json_text_array_to_arrow",
    "parse_array_literal",
    "read_table",
    "read_table_schema",
    "replica_identity",
    "table_size",
    "text_to_arrow",
]
