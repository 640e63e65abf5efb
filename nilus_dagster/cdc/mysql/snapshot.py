"""The initial snapshot of a binlog CDC pipeline, with no gap to the stream.

One `START TRANSACTION WITH CONSISTENT SNAPSHOT` reads every table that has no checkpoint yet;
MariaDB's `binlog_snapshot_file`/`binlog_snapshot_position`, read in that transaction, is the binlog
position the snapshot is consistent with (taken under the same lock as the snapshot: never a
position read after it started). Each table is written with that position as its checkpoint in one
sink write (rows and checkpoint commit together), and the stream then applies to it only the
transactions that end after the position: nothing is missed, nothing applied twice. A crash
mid-snapshot keeps the tables already written; the next run snapshots the others (at a newer
position: each table's checkpoint is its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from nilus_dagster.cdc.mysql.applier import BinlogTable
from nilus_dagster.cdc.mysql.position import BinlogPosition
from nilus_dagster.cdc.mysql.server import snapshot_position
from nilus_dagster.cdc.snapshot import cdc_schema, with_snapshot_metadata
from nilus_dagster.sinks.base import Checkpoint, Sink, WriteStrategy
from nilus_dagster.sources.mysql.reader import read_table


def snapshot_tables(
    conn: Any,
    sink: Sink,
    tables: list[BinlogTable],
    *,
    on_table: Callable[[BinlogTable, int], Any] = lambda table, rows: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> tuple[BinlogPosition, int]:
    """Copy `tables` (their sink copies replaced) inside one consistent snapshot; returns the
    position and the rows written."""
    with conn.cursor() as cursor:
        cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
    try:
        position = snapshot_position(conn)
        rows = 0
        synced_at = datetime.now(UTC)
        for table in tables:
            if should_stop():
                break
            sink.prepare_table(table.target, table.schema, cdc=True)
            batches = _with_metadata(read_table(conn, table.schema), position.ordinal, synced_at)
            written = sink.write(
                table.target,
                cdc_schema(table.schema),
                batches,
                WriteStrategy.REPLACE,
                Checkpoint(table.checkpoint_key, position.text()),
            )
            table.applied = position
            rows += written.rows
            on_table(table, written.rows)
    finally:
        with conn.cursor() as cursor:
            cursor.execute("ROLLBACK")
    return position, rows


def _with_metadata(batches: Iterator[pa.RecordBatch], ordinal: int, synced_at: datetime) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield with_snapshot_metadata(batch, ordinal, synced_at)
