"""The one protocol every sink implements.

Batch loads call `prepare_table` then `write`; CDC calls `apply_changes`. A sink with
transactions stores the checkpoint (a batch high-water mark or a CDC LSN) in the same transaction
as the data, so a crash can never separate the two; `read_checkpoint` returns it on restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import pyarrow as pa

from nilus_dagster.schema import Column, TableSchema
from nilus_dagster.schema.table import SinkLimits, numerics_as_text, with_limits

# Sink-side bookkeeping table holding checkpoints atomically with the data.
CHECKPOINT_TABLE = "_nilus_checkpoints"

# Metadata columns carried by CDC sink rows.
LSN_COLUMN = "_nilus_lsn"
OP_COLUMN = "_nilus_op"
SYNCED_AT_COLUMN = "_nilus_synced_at"
DELETED_COLUMN = "_nilus_deleted"


class WriteStrategy(StrEnum):
    APPEND = "append"
    REPLACE = "replace"
    MERGE = "merge"


@dataclass(frozen=True)
class SinkTable:
    """Where a source table lands: a dataset (schema) and a table name."""

    dataset: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.dataset}.{self.name}"


@dataclass(frozen=True)
class Checkpoint:
    """A progress marker stored with the data, e.g. key 'acme/orders_sync/public.orders'."""

    key: str
    value: str


@dataclass(frozen=True)
class MarkCheckpoint(Checkpoint):
    """A batch high-water mark moving from `previous`: what the sink's checkpoint held when the load
    read the source (None: no checkpoint yet).

    A sink that cannot commit rows and checkpoint in one transaction with its reads (BigQuery)
    appends only while its checkpoint still holds `previous`, so a replay of the range is a no-op.
    """

    previous: str | None = None


@dataclass
class WriteResult:
    rows: int = 0
    bytes: int = 0
    added_columns: list[str] = field(default_factory=list)
    table_rows: int | None = None  # rows in the table at the commit (None: the sink does not say)
    inserted: int | None = None  # merge: rows that were new (the others updated); None: not known


# In ChangeSet.upserts: per row, the columns whose unchanged TOASTed value the sink must keep.
UNCHANGED_COLUMN = "_nilus_unchanged"
# In ChangeSet.deletes of a table without a primary key: how many identical rows to remove.
COUNT_COLUMN = "_nilus_count"
# In ChangeSet.moved: the old key of a row whose key changed, one column per key column.
OLD_KEY_PREFIX = "_nilus_old_"


def old_key_column(name: str) -> str:
    return f"{OLD_KEY_PREFIX}{name}"


@dataclass
class ChangeSet:
    """The net effect of whole source transactions on one table, ready to apply.

    The CDC engine collapses changes per primary key (last one wins, by LSN) before a sink sees
    them, so a key appears at most once across `deletes` and `upserts`. A sink applies, in one
    transaction: the truncate (if any), then deletes, then upserts, then the checkpoint.

    - `upserts`: the table's columns plus `_nilus_lsn` (int64), `_nilus_op` ('I' or 'U') and
      `_nilus_unchanged` (list<string>, null when every value is present): for those columns the
      sink keeps its current value (unchanged TOAST).
    - `deletes`: the key columns plus `_nilus_lsn`. With `soft_delete` the sink sets
      `_nilus_deleted = true` (and `_nilus_lsn`, `_nilus_op = 'D'`) instead of removing the row.
    - `truncate`: the table was truncated before these changes.
    - `moved`: rows whose key changed while TOASTed values stayed unchanged and the batch did not
      hold the old row: the new key columns, the old key as `_nilus_old_<column>` per key column,
      and `_nilus_unchanged` (the columns to carry). The sink reads those columns from its row at
      the old key *before* the deletes and writes them into the row at the new key *after* the
      upserts (the upsert itself inserted them as NULL), all in the same transaction.

    A table without a primary key is a multiset (identical rows are distinct rows): `deletes`
    then holds whole rows (every column) plus `_nilus_lsn` and `_nilus_count` (int64, how many
    identical live rows to remove), and `upserts` rows are plain inserts, one sink row per
    ChangeSet row (identical rows repeated), never with `_nilus_unchanged`. The engine nets the
    counts per identical row, so a row value is never both deleted and inserted in one ChangeSet.
    """

    upserts: pa.Table
    deletes: pa.Table
    truncate: bool = False
    moved: pa.Table | None = None

    @property
    def is_empty(self) -> bool:
        return not self.truncate and self.upserts.num_rows == 0 and self.deletes.num_rows == 0


class SinkError(Exception):
    """A sink refused or failed a write; the message names the sink and what to do."""


class SinkUnavailable(SinkError):
    """The sink could not be reached (worth retrying: it may be restarting or the network down)."""


class SinkTableMissing(SinkError):
    """A CDC sink table is gone although its checkpoint says it holds the rows up to it (dropped
    behind the pipeline's back): it is never recreated silently with only the newer changes."""

    def __init__(self, sink: str, table: str, checkpoint: str):
        super().__init__(
            f"{sink} sink table {table} is missing although its checkpoint ({checkpoint}) says it holds the "
            "rows up to there (dropped or renamed?): restore it and retry the table, or resync the table"
        )


class ChunkedApplyUnsupported(SinkError):
    """The sink cannot hold one transaction open across several `apply_changes` calls."""


class UnsupportedColumnType(SinkError):
    def __init__(self, sink: str, table: str, column: Column, reason: str):
        super().__init__(
            f"{sink} sink cannot hold column '{column.name}' of {table} "
            f"(source type {column.source_type or column.type.describe()}): {reason}"
        )
        self.column = column


class Sink(Protocol):
    """A destination. Implementations: DuckDBSink, PostgresSink (and BigQuerySink)."""

    name: str
    # Its numeric type holds NaN, ±Infinity and any precision (PostgreSQL 14+): source decimals are
    # then carried as their exact text (see `carried_schema`) instead of a fixed-precision decimal.
    holds_numeric_specials: bool

    def check_table(
        self, target: SinkTable, schema: TableSchema, *, cdc: bool, strategy: WriteStrategy | None = None
    ) -> None:
        """Raise what prepare_table/write/apply_changes would refuse for this table, touching nothing.

        UnsupportedColumnType names the column; a sink that needs a primary key (BigQuery CDC,
        any `merge`) raises SinkError naming the table and the fix. Callers run it for every table
        before they create anything in the source or the sink.
        """
        ...

    def prepare_table(self, target: SinkTable, schema: TableSchema, *, cdc: bool = False) -> list[str]:
        """Create the table if missing, add new source columns; return the added column names.

        `cdc=True` also creates the metadata columns `_nilus_lsn`, `_nilus_op`, `_nilus_synced_at`
        and `_nilus_deleted`.

        Raises UnsupportedColumnType (naming the column) before any data moves.
        """
        ...

    def widen_columns(self, target: SinkTable, columns: list[Column]) -> None:
        """Give existing columns their new, wider types (int32 → int64, more decimal digits...)."""
        ...

    def write(
        self,
        target: SinkTable,
        schema: TableSchema,
        batches: Iterable[pa.RecordBatch],
        strategy: WriteStrategy,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        """Write all batches with the strategy as one atomic unit, with the checkpoint."""
        ...

    def apply_changes(
        self,
        target: SinkTable,
        schema: TableSchema,
        changes: ChangeSet,
        checkpoint: Checkpoint | None,
        *,
        soft_delete: bool = False,
    ) -> WriteResult:
        """Apply one ChangeSet and the checkpoint atomically (idempotently where no transactions).

        The CDC sink table is `schema`'s columns plus the metadata columns `_nilus_lsn`,
        `_nilus_op`, `_nilus_synced_at` and `_nilus_deleted`.
        """
        ...

    def change_transaction(self) -> AbstractContextManager[None]:
        """One sink transaction around every `apply_changes` call made inside the block.

        For a source transaction too big to apply at once: its net effect is applied in pieces
        (distinct keys, or distinct rows of a key-less table, in each) and the checkpoints last; the
        block's end commits all of it, an exception rolls all of it back. Raises
        ChunkedApplyUnsupported (before anything is written) when the sink cannot do this exactly.
        """
        ...

    def read_checkpoint(self, key: str) -> str | None:
        ...

    def row_count(self, target: SinkTable) -> int:
        """How many rows the table holds now (0 if it does not exist)."""
        ...

    def column_names(self, target: SinkTable) -> list[str]:
        """The table's columns, in order (none if it does not exist)."""
        ...

    def close(self) -> None:
        ...


def carried_schema(sink: Sink, schema: TableSchema) -> TableSchema:
    """`schema` with its values carried the way `sink` holds them exactly: decimals as their source
    text where the sink's numeric holds NaN and ±Infinity, else as Arrow decimals; and the values
    the sink refuses at write time (its optional `value_limits`) refused when they are decoded."""
    carried = numerics_as_text(schema) if getattr(sink, "holds_numeric_specials", False) else schema
    limits: SinkLimits | None = getattr(sink, "value_limits", None)
    return with_limits(carried, limits) if limits is not None else carried



def stream_session(sink: Sink) -> AbstractContextManager[None]:
    """The sink's `stream_session()` around a CDC stream (DuckDB keeps its file open between the
    stream's calls, see sinks/duckdb.py), or nothing."""
    session = getattr(sink, "stream_session", None)
    return session() if callable(session) else nullcontext()


def release_idle(sink: Sink) -> None:
    """The stream has nothing to apply: let the sink release what its stream session keeps."""
    release = getattr(sink, "release_idle", None)
    if callable(release):
        release()
