"""What the DuckDB and PostgreSQL sinks share: table preparation and the batch write algorithm.

A subclass says how to open a transaction and run statements, and how rows get into a table
(`_load_rows`): DuckDB scans an Arrow stream, PostgreSQL COPYs CSV.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import pyarrow as pa
from psycopg import sql

from nilus_dagster.schema import Column, TableSchema
from nilus_dagster.sinks.base import LSN_COLUMN, Checkpoint, SinkError, SinkTable, WriteResult, WriteStrategy
from nilus_dagster.sinks.sql_changes import delete_all_statement
from nilus_dagster.sinks.sql_dialect import (
    SqlDialect,
    SqlRunner,
    column_ddls,
    ensure_table,
    existing_columns,
    save_checkpoint,
    sink_columns,
    table_ident,
    widen_columns,
)
from nilus_dagster.sinks.streaming import CountingBatches


class SqlSink(ABC):
    """A sink over a SQL database with transactions; see the module docstring."""

    name: str
    dialect: SqlDialect

    @abstractmethod
    def _transaction(self, target: SinkTable | None = None) -> AbstractContextManager[Any]: ...

    @staticmethod
    @abstractmethod
    def _runner(conn: Any) -> SqlRunner: ...

    @abstractmethod
    def _load_rows(
        self, conn: Any, target: SinkTable, schema: TableSchema, rows: CountingBatches, *, merge: bool
    ) -> None:
        """Insert (or, with `merge`, upsert by primary key) every batch, inside `conn`'s transaction."""

    def _ensure_table(
        self, conn: Any, target: SinkTable, schema: TableSchema, *, cdc: bool, checkpoint_key: str | None = None
    ) -> list[str]:
        return ensure_table(self._runner(conn), self.dialect, target, schema, cdc=cdc, checkpoint_key=checkpoint_key)

    def _save_checkpoint(self, conn: Any, checkpoint: Checkpoint) -> None:
        save_checkpoint(self._runner(conn), self.dialect, checkpoint)

    def check_table(
        self, target: SinkTable, schema: TableSchema, *, cdc: bool, strategy: WriteStrategy | None = None
    ) -> None:
        """Refuse column types the dialect cannot hold, and a merge without primary key; no I/O."""
        column_ddls(self.dialect, target, sink_columns(schema, cdc))
        if strategy is not None and WriteStrategy(strategy) is WriteStrategy.MERGE and not schema.primary_key:
            raise SinkError(f"{self.name} sink cannot merge into {target.qualified}: it has no primary key")

    def prepare_table(self, target: SinkTable, schema: TableSchema, *, cdc: bool = False) -> list[str]:
        """Create/evolve the table. `cdc=True` adds the `_nilus_*` metadata columns apply_changes sets."""
        column_ddls(self.dialect, target, sink_columns(schema, cdc))  # reject before touching the database
        with self._transaction(target) as conn:
            return self._ensure_table(conn, target, schema, cdc=cdc)

    def recreate_table(self, target: SinkTable, schema: TableSchema, checkpoint: Checkpoint) -> None:
        """Drop the table and create it empty for `schema` (CDC columns included), with the
        checkpoint, in one transaction: a resync whose source columns changed type."""
        with self._transaction(target) as conn:
            self._runner(conn)(sql.SQL("DROP TABLE IF EXISTS {}").format(table_ident(target)))
            self._ensure_table(conn, target, schema, cdc=True)
            self._save_checkpoint(conn, checkpoint)

    def table_exists(self, target: SinkTable) -> bool:
        with self._transaction(target) as conn:
            return bool(existing_columns(self._runner(conn), self.dialect, target))

    def row_count(self, target: SinkTable) -> int:
        with self._transaction(target) as conn:
            run = self._runner(conn)
            return _count(run, target) if existing_columns(run, self.dialect, target) else 0

    def column_names(self, target: SinkTable) -> list[str]:
        with self._transaction(target) as conn:
            return existing_columns(self._runner(conn), self.dialect, target)

    def widen_columns(self, target: SinkTable, columns: list[Column]) -> None:
        with self._transaction(target) as conn:
            widen_columns(self._runner(conn), self.dialect, target, columns)

    def fill_column(self, target: SinkTable, column: Column, value: pa.Array, *, before_lsn: int) -> None:
        """Set `column` to `value` (one element, None for NULL) in every CDC row older than `before_lsn`."""
        type_ddl = self.dialect.column_type_ddl(target, column)
        python_value = value[0].as_py() if len(value) else None
        if column.type.kind == "interval" and python_value is not None:  # spelled the way both parse
            months, days, nanoseconds = python_value
            python_value = f"{months} months {days} days {nanoseconds // 1000} microseconds"
        with self._transaction(target) as conn:
            self._runner(conn)(
                sql.SQL("UPDATE {t} SET {c} = CAST({p} AS {type}) WHERE {lsn} < {p}").format(
                    t=table_ident(target),
                    c=sql.Identifier(column.name),
                    p=self.dialect.param,
                    type=type_ddl,
                    lsn=sql.Identifier(LSN_COLUMN),
                ),
                (python_value, before_lsn),
            )

    def write(
        self,
        target: SinkTable,
        schema: TableSchema,
        batches: Iterable[pa.RecordBatch],
        strategy: WriteStrategy,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        """All batches with the strategy, then the checkpoint, in one transaction."""
        strategy = WriteStrategy(strategy)
        self.check_table(target, schema, cdc=False, strategy=strategy)
        counted = CountingBatches(batches)
        try:
            with self._transaction(target) as conn:
                added = self._ensure_table(conn, target, schema, cdc=False)
                run = self._runner(conn)
                before = None
                if strategy is WriteStrategy.MERGE:
                    self._hold_writers(conn, target)  # the counts around the merge are exact
                    before = _count(run, target)
                if strategy is WriteStrategy.REPLACE:
                    run(delete_all_statement(target))
                self._load_rows(conn, target, schema, counted, merge=strategy is WriteStrategy.MERGE)
                after = counted.rows if strategy is WriteStrategy.REPLACE else _count(run, target)
                if checkpoint is not None:
                    self._save_checkpoint(conn, checkpoint)
        except SinkError:
            counted.reraise_source_error()
            raise
        inserted = after - before if before is not None else None
        return WriteResult(counted.rows, counted.bytes, added, table_rows=after, inserted=inserted)

    @abstractmethod
    def _hold_writers(self, conn: Any, target: SinkTable) -> None:
        """Keep other writers of the table out until the commit."""


def _count(run: SqlRunner, target: SinkTable) -> int:
    return int(run(sql.SQL("SELECT count(*) FROM {}").format(table_ident(target)))[0][0])
