"""Partitioned source tables: which leaf partitions the sink holds, and snapshot plans per leaf.

A partitioned table has no rows of its own; each leaf partition has its own CTID space. A snapshot
plans CTID ranges per leaf and reads each range `FROM leaf`. A planned range keeps its leaf in its
high bits (`encode_range`): bits 32+ are the leaf's index in the table's known-leaves list.

The known-leaves list lives in the sink (a checkpoint per table), so it commits with the rows it
describes: the leaves a snapshot generation read, plus each leaf merged in since (see
`cdc.attach`). Leaves are read with MVCC catalog queries inside the snapshot that reads their rows,
so a partition attached just after the slot's snapshot is not mistaken for one it saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Checkpoint, Sink
from nilus_dagster.sources.postgres.catalog import table_size
from nilus_dagster.sources.postgres.partitions import Leaf, partition_leaves

_LEAF_SHIFT = 32
_BLOCK_MASK = (1 << _LEAF_SHIFT) - 1  # block numbers (and the open end 0xFFFFFFFF) fit in 32 bits


@dataclass(frozen=True)
class KnownLeaves:
    """The leaves whose rows the sink holds, for the snapshot generation that read them."""

    generation: str
    leaves: tuple[TableName, ...]

    def with_leaf(self, leaf: TableName) -> KnownLeaves:
        """Appended, never re-sorted: a planned range names its leaf by index in this list."""
        return self if leaf in self.leaves else KnownLeaves(self.generation, (*self.leaves, leaf))

    def to_value(self) -> str:
        return json.dumps({"generation": self.generation, "leaves": [leaf.qualified for leaf in self.leaves]})

    @classmethod
    def from_value(cls, value: str) -> KnownLeaves:
        data = json.loads(value)
        return cls(data["generation"], tuple(TableName.parse(name) for name in data["leaves"]))


def leaves_checkpoint_key(checkpoint_prefix: str, table: TableName) -> str:
    return f"{checkpoint_prefix}/partitions/{table.qualified}"


def read_known_leaves(sink: Sink, checkpoint_prefix: str, table: TableName) -> KnownLeaves | None:
    value = sink.read_checkpoint(leaves_checkpoint_key(checkpoint_prefix, table))
    return KnownLeaves.from_value(value) if value else None


def known_leaves_checkpoint(checkpoint_prefix: str, table: TableName, known: KnownLeaves) -> Checkpoint:
    return Checkpoint(leaves_checkpoint_key(checkpoint_prefix, table), known.to_value())


def leaves_in_snapshot(dsn_conn: psycopg.Connection[Any], table: TableName, snapshot_name: str | None) -> list[Leaf]:
    """The table's leaves as the exported snapshot `snapshot_name` sees them (now when None)."""
    if snapshot_name is None:
        return partition_leaves(dsn_conn, table)
    dsn_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        dsn_conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
        return partition_leaves(dsn_conn, table)
    finally:
        dsn_conn.execute("COMMIT")


def encode_range(leaf_index: int, start: int, end: int) -> tuple[int, int]:
    base = leaf_index << _LEAF_SHIFT
    return base | start, base | end


def decode_range(start: int, end: int) -> tuple[int, tuple[int, int]]:
    """(leaf index, (first block, end block)) of a range made by `encode_range`."""
    return start >> _LEAF_SHIFT, (start & _BLOCK_MASK, end & _BLOCK_MASK)


def plan_leaf_ranges(
    conn: psycopg.Connection[Any], leaves: Sequence[TableName], plan_partitions: Callable[[int], list[tuple[int, int]]]
) -> tuple[list[tuple[int, int]], int]:
    """Encoded CTID ranges over every leaf (`plan_partitions(pages)` per leaf) and the row estimate."""
    ranges: list[tuple[int, int]] = []
    rows = 0
    for index, leaf in enumerate(leaves):
        size = table_size(conn, leaf)
        rows += size.rows_estimate
        ranges.extend(encode_range(index, start, end) for start, end in plan_partitions(size.pages))
    return ranges, rows
