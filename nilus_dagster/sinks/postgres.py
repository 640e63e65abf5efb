"""PostgreSQL sink: Arrow batches via COPY (CSV), one transaction per call.

- append: COPY straight into the table.
- replace: DELETE + COPY in one transaction. Chosen over TRUNCATE (ACCESS EXCLUSIVE lock: readers
  would block for the whole load, and TRUNCATE is not MVCC-safe for snapshots taken earlier) and
  over build-and-swap (breaks views, grants and foreign keys on the table). Readers keep seeing the
  old rows until commit; the price is dead tuples, which autovacuum reclaims.
- merge / CDC: COPY into a temp table (ON COMMIT DROP), then INSERT ... ON CONFLICT DO UPDATE.

One connection is kept open between calls and replaced when it breaks; not thread-safe.
`with sink.change_transaction():` holds one transaction on it for the whole block (a source
transaction applied in chunks): calls inside run in savepoints of it, the block's end commits; a
connection that breaks inside the block is never replaced (the block fails and rolls back).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from nilus_dagster.schema import Column, ColumnType, TableSchema
from nilus_dagster.sinks.base import (
    ChangeSet,
    Checkpoint,
    SinkError,
    SinkTable,
    SinkUnavailable,
    WriteResult,
)
from nilus_dagster.sinks.pg_copy import encode_csv
from nilus_dagster.sinks.sql_changes import (
    apply_change_set,
    merge_statement,
)
from nilus_dagster.sinks.sql_dialect import (
    SqlDialect,
    SqlRunner,
    TypeRejected,
    column_ddls,
    ensure_table,
    idents,
    load_checkpoint,
    save_checkpoint,
    sink_columns,
    table_ident,
)
from nilus_dagster.sinks.sql_sink import SqlSink
from nilus_dagster.sinks.streaming import CountingBatches

MAX_NUMERIC_PRECISION = 1000


def _numeric(precision: int | None, scale: int | None) -> str:
    if precision is None:
        return "numeric"
    if precision > MAX_NUMERIC_PRECISION:
        raise TypeRejected(f"PostgreSQL numeric holds at most {MAX_NUMERIC_PRECISION} digits")
    return f"numeric({precision}, {scale})"


def _array(element_ddl: str, element: ColumnType) -> str:
    if element.kind == "list":
        raise TypeRejected(
            "PostgreSQL arrays cannot hold lists of lists (multi-dimensional arrays must be rectangular)"
        )
    return f"{element_ddl}[]"


POSTGRES_DIALECT = SqlDialect(
    sink_name="postgres",
    simple_types={
        "bool": "boolean",
        "int16": "smallint",
        "int32": "integer",
        "int64": "bigint",
        "float32": "real",
        "float64": "double precision",
        "text": "text",
        "json": "jsonb",
        "uuid": "uuid",
        "bytes": "bytea",
        "date": "date",
        "time": "time",
        "timestamp": "timestamp",
        "timestamptz": "timestamptz",
        "interval": "interval",
    },
    decimal_type=_numeric,
    list_type=_array,
    param=sql.Placeholder(),
    default_schema="public",
    row_id="ctid",
)

_COPY_CHUNK_ROWS = 100_000


def describe_dsn(dsn: str) -> str:
    """`user@host:port/dbname` — the connection without its password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{params.get('host', 'localhost')}{port}/{params.get('dbname', '')}"


def _password_of(dsn: str) -> str | None:
    try:
        return conninfo_to_dict(dsn).get("password") or None
    except psycopg.ProgrammingError:
        return None


class PostgresSink(SqlSink):
    """Writes into the PostgreSQL database at `dsn` (a URL or key=value conninfo)."""

    name = "postgres"
    holds_numeric_specials = True  # numeric: NaN, ±Infinity (PostgreSQL 14+), any precision
    dialect = POSTGRES_DIALECT

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._password = _password_of(dsn)
        self.location = describe_dsn(dsn)
        self._conn: psycopg.Connection | None = None
        self._spanning: psycopg.Connection | None = None  # held by an open change_transaction

    def __repr__(self) -> str:
        return f"PostgresSink({self.location!r})"

    # -- connection -------------------------------------------------------------------------

    def _scrub(self, error: BaseException) -> str:
        text = str(error).strip()
        return text.replace(self._password, "***") if self._password else text

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
            except psycopg.Error as e:
                message = f"postgres sink cannot connect to {self.location}: {self._scrub(e)}"
                raise SinkUnavailable(message) from None
        return self._conn

    @contextmanager
    def change_transaction(self) -> Iterator[None]:
        """One transaction for every call in the block (see the module docstring)."""
        if self._spanning is not None:
            raise SinkError(f"postgres sink {self.location}: a change transaction is already open")
        with self._transaction() as conn:
            self._spanning = conn
            try:
                yield
            finally:
                self._spanning = None

    @contextmanager
    def _transaction(self, target: SinkTable | None = None) -> Iterator[psycopg.Connection]:
        """One transaction (a savepoint inside a change transaction); psycopg errors become
        SinkError naming the table and connection."""
        conn = self._spanning or self._connection()
        try:
            with conn.transaction():
                yield conn
        except psycopg.Error as e:
            where = f" writing {target.qualified}" if target else ""
            raise SinkError(f"postgres sink {self.location}{where} failed: {self._scrub(e)}") from e

    @staticmethod
    def _runner(conn: psycopg.Connection) -> SqlRunner:
        def run(statement: sql.Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
            cursor = conn.execute(statement, params or None)
            return cursor.fetchall() if cursor.description else []

        return run

    @staticmethod
    def _copy(
        conn: psycopg.Connection,
        relation: sql.Composable,
        columns: Sequence[str],
        batches: Iterable[pa.RecordBatch],
    ) -> None:
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(relation, idents(columns))
        with conn.cursor().copy(statement) as copy:
            for batch in batches:
                # Encode big batches in slices: bounded CSV memory, and the server parses meanwhile.
                for start in range(0, batch.num_rows, _COPY_CHUNK_ROWS):
                    copy.write(memoryview(encode_csv(batch.slice(start, _COPY_CHUNK_ROWS))))

    @staticmethod
    def _create_stage(
        conn: psycopg.Connection, name: str, target: SinkTable, columns: Sequence[Column]
    ) -> sql.Identifier:
        ddls = column_ddls(POSTGRES_DIALECT, target, columns)
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(sql.Identifier(name), sql.SQL(", ").join(ddls))
        )
        return sql.Identifier(name)

    # -- Sink protocol --------------------------------------------------------------------------

    def _hold_writers(self, conn: psycopg.Connection, target: SinkTable) -> None:
        """Readers go on; another load of the table waits for this one's commit."""
        self._runner(conn)(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(table_ident(target)))

    def _load_rows(
        self, conn: psycopg.Connection, target: SinkTable, schema: TableSchema, rows: CountingBatches, *, merge: bool
    ) -> None:
        """COPY every batch as it arrives: into the table, or into a stage that is then merged."""
        if merge:
            stage = self._create_stage(conn, "_nilus_stage", target, schema.columns)
            self._copy(conn, stage, schema.column_names, rows)
            self._runner(conn)(merge_statement(target, schema, stage))
        else:
            self._copy(conn, table_ident(target), schema.column_names, rows)

    def apply_changes(
        self,
        target: SinkTable,
        schema: TableSchema,
        changes: ChangeSet,
        checkpoint: Checkpoint | None,
        *,
        soft_delete: bool = False,
    ) -> WriteResult:
        """Apply the ChangeSet (creating/evolving the CDC table as needed) and the checkpoint at once."""
        column_ddls(POSTGRES_DIALECT, target, sink_columns(schema, True))
        with self._transaction(target) as conn:
            run = self._runner(conn)
            added = ensure_table(
                run, POSTGRES_DIALECT, target, schema, cdc=True, checkpoint_key=checkpoint.key if checkpoint else None
            )
            staged: list[sql.Identifier] = []

            def stage(name: str, table: pa.Table, columns: Sequence[Column]) -> sql.Composable:
                relation = self._create_stage(conn, name, target, columns)
                staged.append(relation)
                names = [c.name for c in columns]
                self._copy(conn, relation, names, table.select(names).to_batches(_COPY_CHUNK_ROWS))
                return relation

            result = apply_change_set(
                run, stage, target, schema, changes, soft_delete=soft_delete, row_id=POSTGRES_DIALECT.row_id
            )
            for relation in staged:  # now: the next call may be in the same (change) transaction
                conn.execute(sql.SQL("DROP TABLE {}").format(relation))
            if checkpoint is not None:
                save_checkpoint(run, POSTGRES_DIALECT, checkpoint)
        result.added_columns = added
        return result

    def read_checkpoint(self, key: str) -> str | None:
        with self._transaction() as conn:
            return load_checkpoint(self._runner(conn), POSTGRES_DIALECT, key)

    def fork(self) -> PostgresSink:
        """A sink on the same database for another thread (its own connection)."""
        return PostgresSink(self._dsn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
