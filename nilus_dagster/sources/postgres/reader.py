"""Stream a PostgreSQL table as Arrow record batches with `COPY ... TO STDOUT (FORMAT csv)`.

The server writes CSV, Arrow's C++ CSV parser converts it with explicit column types; Python only
moves whole rows into blocks. COPY sends one message per row, so blocks always end on a row boundary
and a row of any size parses (Arrow's streaming CSV reader rejects rows larger than its block).
Columns Arrow's CSV parser cannot read into their type (bytea, interval, arrays, decimals wider than
38 digits) are read as text and decoded by `text_codec`.

The reader never commits or rolls back: it can run inside a caller's REPEATABLE READ transaction
with `SET TRANSACTION SNAPSHOT`. The output settings it needs (UTC, ISO dates...) are set for the
transaction (or the session, in autocommit mode) only while it reads, then put back. Abandoning the
iterator mid-table cancels the COPY, which aborts an enclosing transaction. Like any COPY, the read
holds the connection until the iterator is exhausted or closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.csv as pa_csv
from psycopg import sql
from psycopg.abc import PQGen
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.pq.abc import PGconn
from psycopg.waiting import Wait

from nilus_dagster.schema.arrow import arrow_schema, arrow_type
from nilus_dagster.schema.table import Column, TableSchema
from nilus_dagster.sources.postgres.catalog import SourceError
from nilus_dagster.sources.postgres.text_codec import (
    ValueDecodeError,
    json_text_array_to_arrow,
    text_to_arrow,
)

DEFAULT_BATCH_ROWS = 100_000
# CSV bytes per parsed block (and so per batch, at most): large enough for Arrow to be efficient.
BLOCK_BYTES = 4 << 20
# Arrow parses a block in pieces of this size on its thread pool; each piece must hold a whole row.
_PARSE_PIECE_BYTES = 1 << 20

# Output formats the CSV and text decoding rely on, whatever the role or database defaults are.
OUTPUT_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "bytea_output": "hex",
    "extra_float_digits": "1",
}


@dataclass
class ReadStats:
    """What a read moved: rows and batches yielded, bytes of COPY data received from the server."""

    rows: int = 0
    bytes: int = 0
    batches: int = 0


_Decode = Callable[..., pa.Array]


@dataclass(frozen=True)
class _ColumnPlan:
    """How one column travels: its SELECT expression, the CSV type Arrow parses, a text decoder."""

    column: Column
    expression: sql.Composable
    csv_type: pa.DataType
    decode: _Decode | None = None


def _plan(column: Column) -> _ColumnPlan:
    name = sql.Identifier(column.name)
    kind = column.type.kind
    if kind == "list":
        # Element text forms in a JSON array: Arrow's JSON reader splits it, text_codec decodes them.
        expression = sql.SQL("array_to_json({}::text[])").format(name)
        return _ColumnPlan(column, expression, pa.string(), json_text_array_to_arrow)
    target = arrow_type(column.type)
    if kind in ("bytes", "interval") or isinstance(target, pa.Decimal256Type):
        return _ColumnPlan(column, name, pa.string(), text_to_arrow)
    return _ColumnPlan(column, name, target)


def _copy_query(
    schema: TableSchema, plans: Sequence[_ColumnPlan], where: str | None, ctid_range: tuple[int, int] | None
) -> sql.Composed:
    """`COPY (SELECT ... FROM table WHERE ...) TO STDOUT (FORMAT csv)` for the planned columns."""
    conditions: list[sql.Composable] = []
    if where:
        conditions.append(sql.SQL("({})").format(sql.SQL(where)))  # type: ignore[arg-type]
    if ctid_range is not None:
        first_block, end_block = ctid_range
        conditions.append(
            sql.SQL("ctid >= {}::tid AND ctid < {}::tid").format(
                sql.Literal(f"({int(first_block)},0)"), sql.Literal(f"({int(end_block)},0)")
            )
        )
    where_clause = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    return sql.SQL("COPY (SELECT {columns} FROM {table}{where}) TO STDOUT (FORMAT csv)").format(
        columns=sql.SQL(", ").join(plan.expression for plan in plans),
        table=sql.Identifier(schema.table.schema, schema.table.name),
        where=where_clause,
    )


def read_table(
    conn: psycopg.Connection[Any],
    schema: TableSchema,
    *,
    where: str | None = None,
    params: Sequence[Any] = (),
    ctid_range: tuple[int, int] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    stats: ReadStats | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield the table's rows (optionally filtered) as batches of exactly `arrow_schema(schema)`.

    `where` is a SQL condition with `%s` placeholders bound from `params` (e.g. an incremental
    cursor `"updated_at" > %s`); `ctid_range=(a, b)` reads blocks a..b-1 only. Batches hold at most
    `batch_rows` rows; an empty result yields one empty batch. `stats`, if given, is updated as
    batches are yielded.
    """
    if not schema.columns:
        raise SourceError(f"table {schema.table} has no columns to read")
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    stats = stats if stats is not None else ReadStats()
    plans = [_plan(column) for column in schema.columns]
    target = arrow_schema(schema)
    query = _copy_query(schema, plans, where, ctid_range)
    yielded = False
    # Arrow parses block k on a worker thread while this one receives block k+1 from the server.
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="nilus-copy-parse") as parser,
        _output_settings(conn),
        conn.cursor() as cursor,
        cursor.copy(query, params or None),
    ):
        parsing: Future[pa.RecordBatch] | None = None
        for block, longest_row in _row_blocks(conn, batch_rows, stats):
            next_parse = parser.submit(_parse_block, block, longest_row, plans, target, schema)
            if parsing is not None:
                yield _counted(parsing.result(), stats)
                yielded = True
            parsing = next_parse
        if parsing is not None:
            yield _counted(parsing.result(), stats)
            yielded = True
    if not yielded:
        stats.batches += 1
        yield pa.RecordBatch.from_pylist([], schema=target)


def _counted(batch: pa.RecordBatch, stats: ReadStats) -> pa.RecordBatch:
    stats.rows += batch.num_rows
    stats.batches += 1
    return batch


def _row_blocks(
    conn: psycopg.Connection[Any], max_rows: int, stats: ReadStats
) -> Iterator[tuple[bytes, int]]:
    """The running COPY's rows joined into CSV blocks of about BLOCK_BYTES and at most `max_rows`
    rows; with each block, its longest row."""
    finished = False
    while not finished:
        pieces: list[bytes] = []
        rows = size = longest = 0
        while not finished and size < BLOCK_BYTES and rows < max_rows:
            piece = conn.wait(_received_rows(conn.pgconn, max_rows - rows, conn.info.encoding))
            pieces.append(piece.data)
            rows += piece.rows
            size += len(piece.data)
            longest = max(longest, piece.longest_row)
            finished = piece.finished
        if rows:
            stats.bytes += size
            yield b"".join(pieces), longest


@dataclass(frozen=True)
class _ReceivedRows:
    data: bytes
    rows: int
    longest_row: int
    finished: bool


def _received_rows(pgconn: PGconn, limit: int, encoding: str) -> PQGen[_ReceivedRows]:
    """Up to `limit` COPY rows (one message each) joined, waiting for the socket only when none is
    buffered; `finished` once the COPY ended (its final result consumed, errors raised).

    psycopg's `Copy.read()` costs a generator round trip per row; this takes every row libpq has
    buffered per wake-up and joins them at once, while they are hot in cache. Ending the COPY here
    leaves the `Copy` block nothing to do on exit; on an error mid-stream it cancels the COPY.
    """
    rows: list[Any] = []
    finished = False
    while len(rows) < limit:
        size, data = pgconn.get_copy_data(1)
        if size > 0:
            rows.append(data)
        elif size == 0:
            if rows:
                break
            while not (yield Wait.R):
                pass
            pgconn.consume_input()
        elif size == -1:
            yield from _copy_result(pgconn, encoding)
            finished = True
            break
        else:
            raise psycopg.OperationalError(pgconn.get_error_message(encoding))
    return _ReceivedRows(b"".join(rows), len(rows), max(map(len, rows), default=0), finished)


def _copy_result(pgconn: PGconn, encoding: str) -> PQGen[None]:
    """Consume every result that follows the COPY data, then raise the server's error if any."""
    error: psycopg.Error | None = None
    while True:
        while pgconn.is_busy():
            while not (yield Wait.R):
                pass
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            break
        if result.status != ExecStatus.COMMAND_OK and error is None:
            error = psycopg.errors.error_from_result(result, encoding=encoding)
    if error is not None:
        raise error


def _csv_options(
    plans: Sequence[_ColumnPlan], block_size: int, csv_types: dict[str, pa.DataType] | None = None
) -> dict[str, Any]:
    names = [f"c{index}" for index in range(len(plans))]
    return {
        "read_options": pa_csv.ReadOptions(column_names=names, block_size=block_size),
        # COPY CSV writes NULL as an unquoted empty field and '' as "": only the former is null.
        "parse_options": pa_csv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False),
        "convert_options": pa_csv.ConvertOptions(
            column_types=csv_types or {name: plan.csv_type for name, plan in zip(names, plans, strict=True)},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    }


_CSV_COLUMN_ERROR = re.compile(r"In CSV column #(\d+): (.*)", re.DOTALL)


def _parse_block(
    block: bytes, max_row_bytes: int, plans: Sequence[_ColumnPlan], target: pa.Schema, schema: TableSchema
) -> pa.RecordBatch:
    block_size = max(_PARSE_PIECE_BYTES, 2 * max_row_bytes + 1)
    try:
        table = pa_csv.read_csv(pa.py_buffer(block), **_csv_options(plans, block_size))
    except pa.ArrowInvalid as error:
        raise _conversion_error(error, block, block_size, plans, schema) from None
    arrays: list[pa.Array] = []
    for plan, parsed in zip(plans, table.columns, strict=True):
        values = parsed.combine_chunks() if parsed.num_chunks != 1 else parsed.chunk(0)
        if plan.decode is not None:
            values = plan.decode(values, plan.column.type, column=_describe(schema, plan.column))
        arrays.append(values)
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def _conversion_error(
    error: pa.ArrowInvalid, block: bytes, block_size: int, plans: Sequence[_ColumnPlan], schema: TableSchema
) -> SourceError:
    """Name the column (and, when text_codec can tell, the value) a CSV conversion failed on."""
    match = _CSV_COLUMN_ERROR.search(str(error))
    if match is None:
        return SourceError(f"reading {schema.table}: {error}")
    index = int(match[1])
    plan = plans[index]
    as_text = {f"c{i}": pa.string() for i in range(len(plans))}
    text_table = pa_csv.read_csv(pa.py_buffer(block), **_csv_options(plans, block_size, as_text))
    column_text = text_table.column(index)
    try:
        text_to_arrow(column_text, plan.column.type, column=_describe(schema, plan.column))
    except ValueDecodeError as precise:
        return precise
    return ValueDecodeError(f"column {_describe(schema, plan.column)}: {match[2]}")


def _describe(schema: TableSchema, column: Column) -> str:
    return f"{schema.table}.{column.name} ({column.source_type or column.type.describe()})"


@contextmanager
def _output_settings(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Apply OUTPUT_SETTINGS for the read and put the previous values back afterwards.

    Inside a transaction (or without autocommit) they are transaction-local, like SET LOCAL, so an
    open snapshot transaction keeps working; in autocommit mode they are set on the session.
    """
    names = list(OUTPUT_SETTINGS)
    reads = sql.SQL(", ").join(sql.SQL("current_setting({})").format(name) for name in names)
    current_values = conn.execute(sql.SQL("SELECT ") + reads).fetchone()
    assert current_values is not None
    previous = {
        name: value
        for name, value in zip(names, current_values, strict=True)
        if value != OUTPUT_SETTINGS[name]
    }
    local = conn.info.transaction_status != TransactionStatus.IDLE
    _set_config(conn, {name: OUTPUT_SETTINGS[name] for name in previous}, local)
    try:
        yield
    finally:
        if previous and conn.info.transaction_status in (TransactionStatus.IDLE, TransactionStatus.INTRANS):
            _set_config(conn, previous, local)


def _set_config(conn: psycopg.Connection[Any], settings: dict[str, str], local: bool) -> None:
    if settings:
        calls = sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, {})").format(name, value, local) for name, value in settings.items()
        )
        conn.execute(sql.SQL("SELECT ") + calls)
