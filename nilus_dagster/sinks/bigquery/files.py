"""Arrow data as BigQuery loads see it: one table per write, Parquet files on disk, change rows."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nilus_dagster.schema import TableSchema, arrow_schema
from nilus_dagster.sinks.base import LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN, ChangeSet, old_key_column

# `_nilus_op` of a staged row carrying TOASTed values across a key change (ChangeSet.moved).
MOVED_OP = "M"


@dataclass(frozen=True)
class LoadFile:
    path: Path
    rows: int
    bytes: int
    digest: str


@contextlib.contextmanager
def parquet_file(data: pa.Table) -> Iterator[LoadFile]:
    """Write `data` to a temporary Parquet file (loads stream it from disk, not memory)."""
    with tempfile.TemporaryDirectory(prefix="nilus-bq-") as directory:
        path = Path(directory) / "load.parquet"
        pq.write_table(data, path)
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        yield LoadFile(path, data.num_rows, path.stat().st_size, digest.hexdigest())


def batches_table(batches: Iterable[pa.RecordBatch], schema: TableSchema) -> pa.Table:
    """The batches as one table laid out as `schema`, columns matched by name. Nullability is not
    compared: a NOT NULL source column may arrive in a nullable field (e.g. CDC snapshot rows)."""
    layout = pa.schema([f.with_nullable(True) for f in arrow_schema(schema)])
    return pa.Table.from_batches(
        [pa.RecordBatch.from_arrays(batch.select(layout.names).columns, schema=layout) for batch in batches],
        schema=layout,
    )


def change_rows(changes: ChangeSet, schema: TableSchema) -> pa.Table:
    """Upserts, deletes and moved rows as one table: the columns, `_nilus_lsn`, `_nilus_op`,
    `_nilus_unchanged`, and with moved rows (op 'M') the old key as `_nilus_old_<key>`."""
    fields = [
        *arrow_schema(schema),
        pa.field(LSN_COLUMN, pa.int64()),
        pa.field(OP_COLUMN, pa.string()),
        pa.field(UNCHANGED_COLUMN, pa.list_(pa.string())),
    ]
    moved = changes.moved if changes.moved is not None and changes.moved.num_rows else None
    if moved is not None:
        keys = {f.name: f for f in arrow_schema(schema)}
        fields += [pa.field(old_key_column(k), keys[k].type) for k in schema.primary_key]
    layout = pa.schema(fields)
    parts = [changes.upserts, _with_op(changes.deletes, "D")]
    if moved is not None:
        parts.append(_with_op(moved, MOVED_OP))
    return pa.concat_tables([conform(part, layout) for part in parts])


def _with_op(data: pa.Table, op: str) -> pa.Table:
    return data.append_column(OP_COLUMN, pa.array([op] * data.num_rows, pa.string()))


def conform(data: pa.Table, layout: pa.Schema) -> pa.Table:
    """`data` with exactly `layout`'s columns: missing ones NULL."""
    return pa.Table.from_arrays(
        [
            data.column(f.name).cast(f.type) if f.name in data.column_names else pa.nulls(data.num_rows, f.type)
            for f in layout
        ],
        schema=layout,
    )
