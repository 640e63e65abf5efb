"""What the batch loader needs from a source database, whatever it is.

A `BatchSnapshot` is one read-only transaction on the source: every call sees the same
consistent snapshot, so the cursor maximum and the rows read agree. `open_batch_snapshot` opens
the one a connection type provides (PostgreSQL: REPEATABLE READ; MySQL/MariaDB: `START TRANSACTION
WITH CONSISTENT SNAPSHOT`), both with the session time zone pinned to UTC, and commits it when
the block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

from nilus_dagster.schema.table import TableName, TableSchema


@dataclass(frozen=True)
class CursorRange:
    """Rows with `lower < column <= upper` (no lower bound when `lower` is None).

    Marks are the source's own text form of the cursor value (what `max_cursor` returned)."""

    column: str
    lower: str | None
    upper: str


class BatchSnapshot(Protocol):
    """One consistent, read-only view of the source database."""

    def table_schema(self, table: TableName) -> TableSchema:
        """Columns (logical types), nullability and primary key; TableNotFound-style SourceError if missing."""
        ...

    def max_cursor(self, schema: TableSchema, column: str, above: str | None) -> str | None:
        """The largest `column` value above `above` (all values when None) as text; None if there is none."""
        ...

    def estimated_rows(self, table: TableName) -> int | None:
        """A cheap row-count estimate of the whole table (None when unknown)."""
        ...

    def read(self, schema: TableSchema, cursor: CursorRange | None) -> Iterator[pa.RecordBatch]:
        """The rows (all, or those in `cursor`'s range) as batches of exactly `arrow_schema(schema)`."""
        ...


SOURCE_TYPES = ("postgres", "mysql")


def open_batch_snapshot(source_type: str, connection_name: str, dsn: str) -> AbstractContextManager[BatchSnapshot]:
    """The snapshot of a `postgres` or `mysql` connection (see the module docstring)."""
    if source_type == "postgres":
        from nilus_dagster.sources.postgres.batch import postgres_snapshot

        return postgres_snapshot(connection_name, dsn)
    if source_type == "mysql":
        from nilus_dagster.sources.mysql.batch import mysql_snapshot

        return mysql_snapshot(connection_name, dsn)
    raise ValueError(f"connection '{connection_name}' is {source_type}: batch sources are {', '.join(SOURCE_TYPES)}")
