"""Source-independent table schemas: the contract between sources, CDC and sinks."""

from nilus_dagster.schema.arrow import arrow_schema, arrow_type
from nilus_dagster.schema.table import Column, ColumnType, TableName, TableSchema, TypeKind

__all__ = ["Column", "ColumnType", "TableName", "TableSchema", "TypeKind", "arrow_schema", "arrow_type"]
