"""Partitions attached to a streamed partitioned table after its snapshot.

With publish_via_partition_root, changes made in an attached partition after ATTACH arrive under
the parent, but the rows it already held when attached are never streamed. At run start and
periodically while streaming, `merge_new_leaves` reads each leaf the sink does not know yet and
merges its rows by key, together with the updated known-leaves list (one sink transaction).

Why that is exact: let C be the table's durable stream checkpoint, read before the leaf's snapshot
is taken. Every transaction that committed before C is visible in that snapshot; every one at or
after C is (re)applied by the stream after the merge, and keyed changes converge on their last
value whatever rows they meet. The merged rows carry `_nilus_lsn = C`, so the sinks' LSN guard
lets exactly those later changes through. A table without a key has no such convergence (a
replayed insert would duplicate a row): a new non-empty leaf there is refused. A detached
partition's rows are no longer the parent's, but no change says so: refused as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.cdc.applier import StreamTable
from nilus_dagster.cdc.lsn import parse_lsn
from nilus_dagster.cdc.partitioned import KnownLeaves, known_leaves_checkpoint, read_known_leaves
from nilus_dagster.cdc.setup import CdcSetupError, CdcTable, check_leaf
from nilus_dagster.cdc.snapshot import cdc_schema, with_snapshot_metadata
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkTable, WriteStrategy
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.sources.postgres.partitions import partition_leaves
from nilus_dagster.sources.postgres.reader import read_table

RESET = "run the job <tenant>__<pipeline>__reset to re-snapshot the pipeline"


class PartitionChangeRefused(CdcSetupError):
    """A partition change the sink cannot follow exactly (the message says what to do)."""


def merge_new_leaves(
    *,
    source_connection: str,
    source_dsn: str,
    sink: Sink,
    checkpoint_prefix: str,
    table: CdcTable,
    target: SinkTable,
    stream_checkpoint_key: str,
) -> list[TableName]:
    """Merge the rows of leaves attached since the sink's known-leaves list; returns them."""
    known = read_known_leaves(sink, checkpoint_prefix, table.name)
    applied = sink.read_checkpoint(stream_checkpoint_key)
    checkpoint_lsn = parse_lsn(applied) if applied else 0  # read before the snapshot below is taken
    merged: list[TableName] = []
    with connect_source(source_connection, source_dsn, autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        leaves = partition_leaves(conn, table.name)
        if known is None:  # streamed without a snapshot: what is attached now is the starting point
            known = KnownLeaves("stream", tuple(leaf.name for leaf in leaves))
            sink.write(target, cdc_schema(table.schema), [], WriteStrategy.APPEND,
                       known_leaves_checkpoint(checkpoint_prefix, table.name, known))
        current = {leaf.name for leaf in leaves}
        detached = [name for name in known.leaves if name not in current]
        if detached:
            raise PartitionChangeRefused(
                f"partition(s) {', '.join(map(str, detached))} left {table.name} (detached or dropped): their rows "
                f"are no longer {table.name}'s at the source, but no change in the stream removes them from the "
                f"sink; {RESET}"
            )
        for leaf in (leaf for leaf in leaves if leaf.name not in known.leaves):
            check_leaf(table.name, table.schema, leaf)
            if not table.schema.primary_key and _has_rows(conn, leaf.name):
                raise PartitionChangeRefused(
                    f"partition {leaf.name} was attached to {table.name} with rows in it; {table.name} has no key, "
                    "so merging them while changes replay could duplicate rows; add a primary key to "
                    f"{table.name} or {RESET}"
                )
            synced_at = datetime.now(UTC)
            batches = (
                with_snapshot_metadata(batch, checkpoint_lsn, synced_at)
                for batch in read_table(conn, replace(table.schema, table=leaf.name))
            )
            known = known.with_leaf(leaf.name)
            strategy = WriteStrategy.MERGE if table.schema.primary_key else WriteStrategy.APPEND
            sink.write(target, cdc_schema(table.schema), batches, strategy,
                       known_leaves_checkpoint(checkpoint_prefix, table.name, known))
            merged.append(leaf.name)
        conn.execute("COMMIT")
    return merged


def _has_rows(conn: psycopg.Connection[Any], table: TableName) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table.schema, table.name))
    row = conn.execute(query).fetchone()
    return bool(row and row[0])


@dataclass
class LeafWatcher:
    """Runs `merge_new_leaves` for every partitioned table: `check()` now, `poll()` when due."""

    source_connection: str
    source_dsn: str
    sink: Sink
    checkpoint_prefix: str
    tables: list[StreamTable]  # the partitioned ones; their `schema` follows the stream's schema changes
    interval_s: float = 10.0
    _last: float = field(default=0.0, init=False)

    def check(self) -> list[TableName]:
        self._last = time.monotonic()
        merged = []
        for table in self.tables:
            if table.held:  # waiting for a schema approval: merged once it streams again
                continue
            merged += merge_new_leaves(
                source_connection=self.source_connection,
                source_dsn=self.source_dsn,
                sink=self.sink,
                checkpoint_prefix=self.checkpoint_prefix,
                table=replace(table.source, schema=table.schema),
                target=table.target,
                stream_checkpoint_key=table.checkpoint_key,
            )
        return merged

    def poll(self) -> list[TableName]:
        if not self.tables or time.monotonic() - self._last < self.interval_s:
            return []
        return self.check()
