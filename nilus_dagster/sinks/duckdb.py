"""DuckDB sink: Arrow batches straight into a DuckDB file, one transaction per call.

DuckDB lets one process at a time open a file for writing. The sink therefore opens the file only
for the length of one transaction (connect → work → close) and, when another process holds the
lock, waits and retries with backoff for up to `lock_timeout_s`: two runs writing one file both
succeed, one after the other, transaction by transaction.

A bounded bulk phase (the initial snapshot) may instead run inside `with sink.bulk_session():`,
which keeps one connection (and the file) for the whole phase and releases it at the end: calls
inside it are still one transaction each, but skip reopening the file and re-checking tables the
session already created or checked. Those facts are cached only for the session, while no other
process can write the file.

`with sink.change_transaction():` (a source transaction applied in chunks) holds one connection
and ONE transaction for the whole block: every call inside joins it, the block's end commits.

A CDC stream runs inside `with sink.stream_session():`: the connection its thread opens is kept
between transactions while batches come back to back (opening the file costs ~0.3 s) and closed by
`release_idle()` once the stream has nothing to apply, after `_HOLD_MAX_S` held (so another process
waiting for the file gets a turn), and at the block's end. Each call is still its own transaction.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from psycopg import sql

from nilus_dagster.schema import Column, TableSchema, arrow_schema
from nilus_dagster.sinks import duckdb_keys
from nilus_dagster.sinks.base import (
    ChangeSet,
    Checkpoint,
    SinkError,
    SinkTable,
    WriteResult,
)
from nilus_dagster.sinks.sql_changes import (
    apply_change_set,
    insert_statement,
    merge_statement,
)
from nilus_dagster.sinks.sql_dialect import (
    SqlDialect,
    SqlRunner,
    TypeRejected,
    column_ddls,
    ensure_table,
    load_checkpoint,
    save_checkpoint,
    sink_columns,
    upsert_checkpoint,
)
from nilus_dagster.sinks.sql_sink import SqlSink
from nilus_dagster.sinks.streaming import CountingBatches

MAX_DECIMAL_PRECISION = 38
_LOCK_WARN_S = 5.0  # a wait for another process's lock is logged every this often
_HOLD_MAX_S = 5.0  # a stream session lets go of the file after holding it this long
_log = logging.getLogger(__name__)


def _decimal(precision: int | None, scale: int | None) -> str:
    if precision is None:
        return "DECIMAL(38, 9)"
    if precision > MAX_DECIMAL_PRECISION:
        raise TypeRejected(f"DuckDB DECIMAL holds at most {MAX_DECIMAL_PRECISION} digits")
    return f"DECIMAL({precision}, {scale})"


DUCKDB_DIALECT = SqlDialect(
    sink_name="duckdb",
    simple_types={
        "bool": "BOOLEAN",
        "int16": "SMALLINT",
        "int32": "INTEGER",
        "int64": "BIGINT",
        "float32": "REAL",
        "float64": "DOUBLE",
        "text": "VARCHAR",
        "json": "JSON",
        "uuid": "UUID",
        "bytes": "BLOB",
        "date": "DATE",
        "time": "TIME",
        "timestamp": "TIMESTAMP",
        "timestamptz": "TIMESTAMPTZ",
        "interval": "INTERVAL",
    },
    decimal_type=_decimal,
    list_type=lambda element_ddl, _element: f"{element_ddl}[]",
    param=sql.SQL("?"),
    default_schema="main",
    row_id="rowid",
)

_BATCHES_VIEW = "_nilus_batches"


@dataclass
class _Session:
    """One connection held for a bulk session, and what its committed transactions established."""

    conn: duckdb.DuckDBPyConnection
    thread: int
    ensured: set[tuple[Any, ...]] = field(default_factory=set)  # tables ensured with these columns
    checkpoint_table: bool = False  # the checkpoint table exists
    pending: set[tuple[Any, ...]] = field(default_factory=set)  # ... by the open transaction
    pending_checkpoint_table: bool = False
    spanning: bool = False  # a change_transaction is open: calls join its transaction
    lingering: bool = False  # kept by a stream session: facts are not cached (other threads may write)
    nested: int = 0  # bulk sessions open inside it: not to be released under them
    opened: float = field(default_factory=time.monotonic)

    def committed(self) -> None:
        self.ensured |= self.pending
        self.checkpoint_table = self.checkpoint_table or self.pending_checkpoint_table
        self.forget()

    def forget(self) -> None:
        self.pending.clear()
        self.pending_checkpoint_table = False


def _is_lock_conflict(error: duckdb.Error) -> bool:
    return "lock" in str(error).lower()


class DuckDBSink(SqlSink):
    """Writes into the DuckDB database file at `path` (created with its folder if missing)."""

    name = "duckdb"
    holds_numeric_specials = False  # DECIMAL(p,s): NaN and ±Infinity are refused per value
    dialect = DUCKDB_DIALECT

    def __init__(self, path: str | Path, *, lock_timeout_s: float = 300) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self.lock_waits = 0  # times a transaction had to wait for another process's lock (an outage count)
        self._session: _Session | None = None
        self._session_lock = threading.Lock()
        self._streaming_thread: int | None = None  # the thread of an open stream_session

    def __repr__(self) -> str:
        return f"DuckDBSink({str(self.path)!r})"

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """Open the file, waiting (with jittered exponential backoff) while another process writes."""
        started = time.monotonic()
        deadline, warn_at = started + self.lock_timeout_s, started + _LOCK_WARN_S
        delay = 0.02
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = duckdb.connect(str(self.path))
            except OSError as e:
                raise SinkError(f"duckdb sink cannot create the folder of {self.path}: {e}") from e
            except duckdb.IOException as e:
                if not _is_lock_conflict(e):
                    raise SinkError(f"duckdb sink cannot open {self.path}: {e}") from e
                if delay == 0.02:
                    self.lock_waits += 1
                if time.monotonic() >= warn_at:
                    warn_at += _LOCK_WARN_S
                    _log.warning("duckdb sink: %s is held by another process; waiting (%.0fs so far, at most "
                                 "%gs)", self.path, time.monotonic() - started, self.lock_timeout_s)
                if time.monotonic() + delay > deadline:
                    raise SinkError(
                        f"duckdb sink: {self.path} stayed locked by another process for "
                        f"{self.lock_timeout_s:g}s; raise lock_timeout_s or stop the other writer ({e})"
                    ) from e
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)
                continue
            conn.execute("SET TimeZone = 'UTC'")
            return conn

    @contextmanager
    def bulk_session(self) -> Iterator[None]:
        """Keep the file open (one connection) until the block ends, for a bounded bulk phase.

        Every call in the block is still its own transaction; other processes wait for the file
        until the block ends. A nested block shares the outer session. Calls from other threads
        use their own connections, as outside a session.
        """
        current = self._session
        if current is not None:
            if current.thread != threading.get_ident():
                raise SinkError(f"duckdb sink {self.path}: a bulk session is already open in another thread")
            current.nested += 1
            try:
                yield
            finally:
                current.nested -= 1
            return
        session = _Session(self._connect(), threading.get_ident())
        self._session = session
        try:
            yield
        finally:
            self._session = None
            session.conn.close()

    @contextmanager
    def change_transaction(self) -> Iterator[None]:
        """One transaction for every call in the block (see the module docstring)."""
        with self.bulk_session():
            session = self._current_session()
            assert session is not None
            if session.spanning:
                raise SinkError(f"duckdb sink {self.path}: a change transaction is already open")
            with self._transaction():
                session.spanning = True
                try:
                    yield
                finally:
                    session.spanning = False

    @contextmanager
    def stream_session(self) -> Iterator[None]:
        """Keep this thread's connection between calls until `release_idle()` or the block's end."""
        if self._streaming_thread is not None:
            yield  # nested: the outer block releases
            return
        self._streaming_thread = threading.get_ident()
        try:
            yield
        finally:
            self._streaming_thread = None
            self.release_idle()

    def release_idle(self) -> None:
        """Close the connection a stream session keeps (not while a transaction or a bulk session
        inside it is open): other processes may open the file."""
        session = self._current_session()
        if session is not None and session.lingering and not session.spanning and not session.nested:
            self._session = None
            session.conn.close()

    def _current_session(self) -> _Session | None:
        session = self._session
        if session is not None and session.thread == threading.get_ident():
            return session
        return None

    def _kept_session(self) -> _Session | None:
        """This thread's session, opened now to be kept when a stream session runs in this thread."""
        session = self._current_session()
        if session is None and self._session is None and self._streaming_thread == threading.get_ident():
            session = self._session = _Session(self._connect(), threading.get_ident(), lingering=True)
        return session

    @contextmanager
    def _transaction(self, target: SinkTable | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """One connection and one transaction; DuckDB errors become SinkError naming the table."""
        session = self._kept_session()
        if session is not None and session.spanning:
            try:
                yield session.conn  # joins the change transaction, which commits or rolls back
            except duckdb.Error as e:
                raise self._sink_error(e, target) from e
            return
        conn = session.conn if session is not None else self._connect()
        try:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield conn
                conn.execute("COMMIT")
                if session is not None:
                    session.committed()
                    if session.lingering and time.monotonic() - session.opened >= _HOLD_MAX_S:
                        self.release_idle()  # another process may be waiting for the file
            except BaseException:
                conn.execute("ROLLBACK")
                if session is not None:
                    session.forget()  # what the rolled-back transaction created is gone
                    self.release_idle()  # (a kept connection: the next call starts on a fresh one)
                raise
        except duckdb.Error as e:
            raise self._sink_error(e, target) from e
        finally:
            if session is None:
                conn.close()

    def _sink_error(self, error: duckdb.Error, target: SinkTable | None) -> SinkError:
        where = f" writing {target.qualified}" if target else ""
        return SinkError(f"duckdb sink {self.path}{where} failed: {error}")

    def _ensure_table(
        self,
        conn: duckdb.DuckDBPyConnection,
        target: SinkTable,
        schema: TableSchema,
        *,
        cdc: bool,
        checkpoint_key: str | None = None,
    ) -> list[str]:
        """`ensure_table`, skipped when this session already ensured the same table and columns."""
        session = self._current_session()
        session = session if session is not None and not session.lingering else None
        fact = (target, tuple((c.name, c.type) for c in schema.columns), schema.primary_key, cdc)
        if session is not None and fact in session.ensured:
            return []
        added = ensure_table(
            self._runner(conn), DUCKDB_DIALECT, target, schema, cdc=cdc, checkpoint_key=checkpoint_key
        )
        if session is not None:
            session.pending.add(fact)
        return added

    def _save_checkpoint(self, conn: duckdb.DuckDBPyConnection, checkpoint: Checkpoint) -> None:
        session = self._current_session()
        session = session if session is not None and not session.lingering else None
        if session is not None and session.checkpoint_table:
            upsert_checkpoint(self._runner(conn), DUCKDB_DIALECT, checkpoint)
            return
        save_checkpoint(self._runner(conn), DUCKDB_DIALECT, checkpoint)
        if session is not None:
            session.pending_checkpoint_table = True

    @staticmethod
    def _runner(conn: duckdb.DuckDBPyConnection, staged: dict[str, pa.Table] | None = None) -> SqlRunner:
        """Runs statements; `staged` Arrow tables are readable by their names in them.

        Those are found by DuckDB's replacement scan (the names are the globals of the frame that
        calls `execute`), not `register`ed: a registered view, even unregistered, keeps its Arrow
        table alive until the transaction ends (duckdb-python #469), which inside a change
        transaction would hold every chunk in memory.
        """

        def run(statement: sql.Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
            query = statement.as_string()
            if staged:
                namespace = {**staged, "_conn": conn, "_query": query, "_params": list(params)}
                result = eval("_conn.execute(_query, _params)", namespace)  # noqa: S307 (a fixed expression)
            else:
                result = conn.execute(query, list(params))
            return result.fetchall() if result.description else []

        return run

    # -- Sink protocol --------------------------------------------------------------------------

    def _hold_writers(self, conn: duckdb.DuckDBPyConnection, target: SinkTable) -> None:
        """Nothing to do: the transaction holds the file, DuckDB's one writer."""

    def _load_rows(
        self,
        conn: duckdb.DuckDBPyConnection,
        target: SinkTable,
        schema: TableSchema,
        rows: CountingBatches,
        *,
        merge: bool,
    ) -> None:
        """One INSERT ... SELECT (or upsert) over an Arrow stream of the batches.

        Into an empty keyed table (a replace, a first load) the rows go in without the key, which
        is built once at the end (`duckdb_keys`); a merge into it is then a plain insert, and a
        merge of whole rows with lists deletes the staged keys and inserts (`duckdb_keys.replace_rows`).
        """
        run = self._runner(conn)
        key = duckdb_keys.drop_key_if_empty(conn, target) if schema.primary_key else []
        conn.register(_BATCHES_VIEW, pa.RecordBatchReader.from_batches(arrow_schema(schema), rows))
        source = sql.Identifier(_BATCHES_VIEW)
        if merge and not key:
            if duckdb_keys.merges_by_replacing(conn, target, schema):
                duckdb_keys.replace_rows(conn, target, schema, source)
            else:
                run(merge_statement(target, schema, source))
        else:
            run(insert_statement(target, schema.column_names, source))
        conn.unregister(_BATCHES_VIEW)
        duckdb_keys.add_key(conn, target, key)

    # Snapshot partitions are written in groups of at most this many partitions and about this
    # many rows per transaction (each partition's checkpoint in its group's transaction): a
    # commit, and DuckDB's checkpoint of its file, per group rather than per partition.
    snapshot_group_partitions = 8
    snapshot_group_rows = 2_000_000

    def defer_primary_key(self, target: SinkTable) -> list[str]:
        """Set aside the key of an empty table for a bulk load (see `duckdb_keys`); returns it."""
        with self._transaction(target) as conn:
            return duckdb_keys.drop_key_if_empty(conn, target)

    def restore_primary_key(self, target: SinkTable, key: Sequence[str]) -> None:
        """Build the key set aside by `defer_primary_key` (nothing when the table has one)."""
        with self._transaction(target) as conn:
            duckdb_keys.add_key(conn, target, key)

    @contextmanager
    def grouped_writes(self) -> Iterator[None]:
        """Every call in the block commits together (a group of snapshot partitions)."""
        with self.change_transaction():
            yield

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
        column_ddls(DUCKDB_DIALECT, target, sink_columns(schema, True))
        with self._transaction(target) as conn:
            added = self._ensure_table(
                conn, target, schema, cdc=True, checkpoint_key=checkpoint.key if checkpoint else None
            )
            staged: dict[str, pa.Table] = {}

            def stage(name: str, table: pa.Table, columns: Sequence[Column]) -> sql.Composable:
                staged[name] = table.select([c.name for c in columns])
                return sql.Identifier(name)

            run = self._runner(conn, staged)
            result = apply_change_set(
                run, stage, target, schema, changes, soft_delete=soft_delete, row_id=DUCKDB_DIALECT.row_id
            )
            if checkpoint is not None:
                self._save_checkpoint(conn, checkpoint)
        result.added_columns = added
        return result

    def read_checkpoint(self, key: str) -> str | None:
        if self._current_session() is None and not self.path.exists():
            return None
        with self._transaction() as conn:
            return load_checkpoint(self._runner(conn), DUCKDB_DIALECT, key)

    def fork(self) -> DuckDBSink:
        """A sink on the same file for another thread (its own connections and bulk session);
        DuckDB runs the two threads' transactions side by side in this process."""
        return DuckDBSink(self.path, lock_timeout_s=self.lock_timeout_s)

    def close(self) -> None:
        """Nothing to release: the file is open only during a transaction or a session."""
