"""The change applier: decoded pgoutput messages → batches of whole transactions → the sink.

Each table has its own checkpoint in the sink (the end LSN of the last transaction applied to
it), committed in the same sink transaction as its changes: a transaction already applied to a
table is skipped for that table after a restart, so nothing is applied twice.

A transaction is buffered until its Commit, but never more than `batch_max_rows` of its changes:
past that bound the batch of earlier transactions is flushed and the transaction is folded chunk
by chunk; a net effect of a few times the bound stays in memory and becomes the next batch, a
bigger one is spilled to disk and applied at its Commit in one sink transaction (see
cdc/spanning.py), so memory stays bounded whatever the transaction's size. BigQuery, which has no
transaction across calls, takes those pieces into shadow tables (sinks/bigquery/spanning.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from nilus_dagster.cdc.buffered_rows import filling, remapping, rewrite_rows
from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.multiset_changes import MultisetChanges, TableChanges, new_table_changes
from nilus_dagster.cdc.pgoutput import (
    BUILTIN_TYPES,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    PgTypeInfo,
    Relation,
    RelationColumn,
    RowChange,
    Truncate,
    TupleData,
    Update,
    relation_schema,
)
from nilus_dagster.cdc.poison import PoisonHandler, change_set_of
from nilus_dagster.cdc.setup import CdcTable
from nilus_dagster.cdc.spanning import SpannedTableFailed, SpanningTransaction
from nilus_dagster.cdc.stream_stats import StreamStats
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.schema.evolution import SchemaDiff, diff_schemas
from nilus_dagster.sinks.base import ChangeSet, Checkpoint, ChunkedApplyUnsupported, Sink, SinkTable, carried_schema

if TYPE_CHECKING:
    from nilus_dagster.cdc.table_failures import TableIsolation

_KIND_NAMES = {b"I"[0]: "I", b"U"[0]: "U", b"D"[0]: "D"}


class SchemaChangeRefused(Exception):
    """A source schema change that the pipeline's `schema_changes` policy does not allow."""


@dataclass
class SchemaEvent:
    table: TableName
    diff: SchemaDiff
    schema: TableSchema
    lsn: int
    # set by an `evolve` decision: added column → the text value rows written before the change read
    fill: dict[str, str | None] = field(default_factory=dict)


@dataclass
class StreamTable:
    """A table being streamed: where it lands and how far it is applied."""

    source: CdcTable
    target: SinkTable
    checkpoint_key: str
    applied_lsn: int  # end LSN of the last transaction applied to it
    schema: TableSchema  # the schema in force (changes with Relation messages)
    held: bool = False  # paused by `schema_changes: pause` until approved, or being resynced
    # being resynced beside the stream (cdc/live_resync.py): the slot is acknowledged no further
    resync_limit: int | None = None
    failed: str | None = None  # held because its sink apply keeps failing: why (cdc/table_failures.py)


_TRUNCATE = b"T"[0]
_NO_RELATION = -1  # the relation id a buffered truncate is grouped under
_RELATION_ID = itemgetter(1)
_KIND = itemgetter(0)


def _special(data: TupleData | None) -> bool:
    return data is not None and any(v is UNCHANGED_TOAST or isinstance(v, bytes) for v in data)


def _row_change(message: Insert | Update | Delete) -> RowChange:
    """A decoded message object as the RowChange tuple `decode_row_change` gives."""
    if isinstance(message, Insert):
        return (b"I"[0], message.relation_id, message.new, None, False, _special(message.new))
    if isinstance(message, Update):
        special = _special(message.new) or _special(message.old)
        return (b"U"[0], message.relation_id, message.new, message.old, message.old_is_key_only, special)
    return (b"D"[0], message.relation_id, None, message.old, message.old_is_key_only, _special(message.old))


@dataclass
class ChangeApplier:
    """Consumes decoded messages and applies whole-transaction batches to the sink (a transaction
    of more than `batch_max_rows` changes: in chunks, inside one sink transaction)."""

    tables: dict[TableName, StreamTable]
    sink: Sink
    lookup_types: Callable[[list[int]], dict[int, PgTypeInfo]]
    on_schema_change: Callable[[SchemaEvent], str]  # returns "evolve", "pause" or raises
    batch_max_rows: int = 50_000
    batch_max_ms: int = 1_000
    soft_delete: bool = False
    stats: StreamStats = field(default_factory=StreamStats)
    on_flushed: Callable[[int], Any] | None = None  # told of flushes the applier makes by itself
    keepalive: Callable[[], Any] | None = None  # called while a long Commit applies (the server must hear from us)
    on_poison: PoisonHandler | None = None  # a row the sink cannot take (cdc/poison.py); None: raise
    isolation: TableIsolation | None = None  # one table's failing apply holds that table only

    def __post_init__(self) -> None:
        # relation id → the columns its tuples carry (as of the last Relation message), the table
        # and the column names
        self._relations: dict[int, tuple[tuple[RelationColumn, ...], StreamTable, tuple[str, ...]]] = {}
        self._types: dict[int, PgTypeInfo] = {}
        self._batch: dict[TableName, TableChanges | MultisetChanges] = {}
        self._batch_events = 0
        self._batch_started: float | None = None
        self._batch_end_lsn = 0  # end LSN of the last complete transaction in the batch
        self._in_transaction = False
        self._commit_lsn = 0  # commit LSN of the transaction being read
        self._xid = 0  # its xid
        # its changes, until Commit: RowChange tuples (see pgoutput.decode_row_change) and truncates
        self._transaction: list[RowChange | tuple[int, int, Truncate]] = []
        self._span: SpanningTransaction | None = None  # the open transaction, applied in chunks so far
        self._whole_only = False  # the sink cannot apply a transaction in chunks: buffer it whole
        # changes by table and kind: of the open transaction, and of the batch's whole transactions
        self._txn_kinds: dict[str, Counter[str]] = {}
        self._batch_kinds: dict[str, Counter[str]] = {}

    # -- message handling ------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._in_transaction

    @property
    def applying_in_chunks(self) -> bool:
        """The open transaction is being applied in chunks, inside an open sink transaction."""
        return self._span is not None

    @property
    def has_pending(self) -> bool:
        return self._batch_end_lsn > 0

    def handle(self, message: Message | RowChange) -> None:
        if type(message) is tuple:  # a row change from decode_row_change: the hot path
            self._transaction.append(message)
        elif isinstance(message, Begin):
            self._in_transaction = True
            self._commit_lsn = message.final_lsn
            self._xid = message.xid
            if self._batch_started is None:
                self._batch_started = time.monotonic()
        elif isinstance(message, Commit):
            self._commit(message)
        elif isinstance(message, Relation):
            self._relation(message)
        elif isinstance(message, Insert | Update | Delete):
            self._transaction.append(_row_change(message))
        elif isinstance(message, Truncate):
            self._transaction.append((_TRUNCATE, _NO_RELATION, message))

    def batch_ready(self) -> bool:
        """True at a transaction boundary once the batch is big or old enough."""
        if self._in_transaction or not self.has_pending or self._batch_started is None:
            return False
        age_ms = (time.monotonic() - self._batch_started) * 1000
        return self._batch_events >= self.batch_max_rows or age_ms >= self.batch_max_ms

    @property
    def transaction_too_big(self) -> bool:
        """The open transaction buffers `batch_max_rows` changes: time to `spill` them."""
        return self._in_transaction and len(self._transaction) >= self.batch_max_rows and not self._whole_only

    def spill(self) -> None:
        """Apply the open transaction's buffered changes now, inside a sink transaction held open
        until its Commit; the batch of earlier (whole) transactions is flushed first."""
        self._note_buffered()
        if self._span is None:
            self._flush_pending()
            try:
                self._span = SpanningTransaction.open(
                    self.sink, soft_delete=self.soft_delete, piece_rows=self.batch_max_rows, on_poison=self.on_poison
                )
            except ChunkedApplyUnsupported:
                self._whole_only = True
                return
        self._span.events += self._fold(self._span.pending)
        self._span.chunk_folded()

    def abandon(self) -> None:
        """The stream ends inside a spilled transaction: forget it (nothing of it reached the sink;
        the next run replays it from the slot)."""
        span, self._span = self._span, None
        self._txn_kinds = {}
        if span is not None:
            span.rollback()

    def _commit(self, commit: Commit) -> None:
        """Fold the finished transaction into the batch (the batch only ever holds whole ones), or
        finish applying it in chunks."""
        txn_kinds = self._txn_kinds  # the folds below fill it in
        self._note_buffered()
        if self._span is not None and self._span.spilled:
            self._commit_span(commit.end_lsn)
        else:
            if self._span is not None:  # folded in memory: its net effect is the batch (flushed before it)
                span, self._span = self._span, None
                self._batch, self._batch_events = span.pending, span.events
            self._batch_events += self._fold(self._batch)
            self._batch_end_lsn = commit.end_lsn
            for table, kinds in self._txn_kinds.items():
                self._batch_kinds.setdefault(table, Counter()).update(kinds)
            self._txn_kinds = {}
        self._in_transaction = False
        self._whole_only = False
        self.stats.transactions += 1
        self.stats.last_commit_time = commit.commit_time
        self.stats.note_transaction(self._xid, txn_kinds)

    def _commit_span(self, end_lsn: int) -> None:
        span = self._span
        assert span is not None
        span.events += self._fold(span.pending)  # (before letting go of it: chunks fold on top of it)
        self._span = None
        try:
            span.spill()
        except BaseException:
            span.rollback()
            raise
        try:
            span.commit(end_lsn, self.keepalive)  # one sink transaction: all of it or none of it
        except SpannedTableFailed as failure:
            if self.isolation is None:
                raise failure.error from failure.error.__cause__
            self.isolation.span_failed(self.tables[failure.table], failure.error)  # raises
        if self.isolation is not None:
            for name in span.touched:
                self.isolation.applied(name)
        self.stats.events_total += span.events
        self.stats.batches += 1
        self.stats.chunked_transactions += 1
        self.stats.applied_lsn = end_lsn
        self.stats.count(self._txn_kinds)
        self._txn_kinds = {}
        self._batch_started = None
        if self.on_flushed is not None:
            self.on_flushed(end_lsn)

    def _note_buffered(self) -> None:
        if len(self._transaction) > self.stats.peak_buffered_changes:
            self.stats.peak_buffered_changes = len(self._transaction)

    def _fold(self, into: dict[TableName, TableChanges | MultisetChanges]) -> int:
        """Fold the buffered changes of the open transaction into `into` (and forget them); returns
        how many were folded."""
        lsn, events = self._commit_lsn, 0
        # Runs of changes to one relation are folded at once, in WAL order.
        for relation_id, group in groupby(self._transaction, key=_RELATION_ID):
            if relation_id == _NO_RELATION:
                for _, _, truncate in group:
                    for truncated_id in truncate.relation_ids:  # type: ignore[union-attr]
                        changes = self._changes_for(truncated_id, into)
                        if changes is not None:
                            changes.truncated()
                            events += 1
                            self._tally(truncated_id).update("T")
                continue
            changes = self._changes_for(relation_id, into)
            if changes is None:
                continue
            rows = list(group)
            changes.add_rows(self._relations[relation_id][2], rows, lsn)  # type: ignore[arg-type]
            events += len(rows)
            self._tally(relation_id).update(map(_KIND_NAMES.__getitem__, map(_KIND, rows)))
        self._transaction.clear()
        return events

    def _tally(self, relation_id: int) -> Counter[str]:
        """The open transaction's change counts of the relation's table."""
        name = self._relations[relation_id][1].source.name.qualified
        kinds = self._txn_kinds.get(name)
        if kinds is None:
            kinds = self._txn_kinds[name] = Counter()
        return kinds

    def _relation(self, relation: Relation) -> None:
        name = TableName(relation.namespace or "pg_catalog", relation.name)
        table = self.tables.get(name)
        if table is None:
            return
        unknown = [c.type_oid for c in relation.columns if c.type_oid not in self._types]
        self._types.update(self.lookup_types(unknown))
        described = relation_schema(relation, {**BUILTIN_TYPES, **self._types})
        schema = carried_schema(self.sink, TableSchema(name, described.columns, table.source.schema.primary_key))
        diff = diff_schemas(table.schema, schema)
        names = tuple(c.name for c in relation.columns)
        known = self._relations.get(relation.relation_id)
        if known is not None and known[2] != names:
            rewrite_rows(self._transaction, relation.relation_id, remapping(known[2], names), old_key_only=False)
        if (
            diff.is_empty
            or table.resync_limit is not None
            or table.failed is not None
            or self._commit_lsn < table.applied_lsn
        ):
            # (a table being resynced, or a replayed transaction it skips: the resync's copy is newer;
            # a failed table judges the change when it is retried and the stream replays it)
            self._relations[relation.relation_id] = (relation.columns, table, names)
            return
        # Changes committed before the schema change land first, under the schema they had.
        self._flush_pending()
        event = SchemaEvent(name, diff, schema, self._commit_lsn)
        decision = self.on_schema_change(event)
        self._relations[relation.relation_id] = (relation.columns, table, names)
        if decision == "pause":
            table.held = True  # none of this transaction reaches it, also what was spilled before
            if self._span is not None:
                self._span.discard(name)
            return
        table.schema = schema
        if event.fill and known is not None:
            rewrite_rows(self._transaction, relation.relation_id, filling(names, event.fill))
        if self._span is not None:
            self._span.schema_changed(table, event.fill)

    def _changes_for(
        self, relation_id: int, into: dict[TableName, TableChanges | MultisetChanges]
    ) -> TableChanges | MultisetChanges | None:
        relation_table = self._relations.get(relation_id)
        if relation_table is None:
            return None
        table = relation_table[1]
        if table.held or self._commit_lsn < table.applied_lsn:
            return None  # held for approval, or already applied before a restart
        changes = into.get(table.source.name)
        if changes is None:
            span = self._span  # a big transaction's chunk folds on top of what it folded so far
            changes = span.changes_for(table) if span is not None else new_table_changes(table.schema)
            into[table.source.name] = changes
        elif changes.schema is not table.schema:
            changes.schema = table.schema  # evolved: rows map onto the new columns by name
        return changes

    def _flush_pending(self) -> None:
        """Apply the batch now (before a schema change or a transaction applied in chunks)."""
        if self.has_pending:
            end_lsn = self.flush()
            if self.on_flushed is not None:
                self.on_flushed(end_lsn)

    # -- applying --------------------------------------------------------------------------
    def flush(self) -> int:
        """Apply the batch (whole transactions only); returns the end LSN now durable (0: none)."""
        if not self.has_pending:
            return 0
        end_lsn = self._batch_end_lsn
        checkpoint_value = format_lsn(end_lsn)
        applies = [
            (table, self._table_apply(table, changes, Checkpoint(table.checkpoint_key, checkpoint_value)))
            for table, changes in ((self.tables[name], changes) for name, changes in self._batch.items())
            if changes.events or changes.truncate
        ]
        if self.isolation is None:
            for _, apply in applies:
                apply()
        for table in self.isolation.apply_all(applies, self.keepalive) if self.isolation else [t for t, _ in applies]:
            if not table.held:  # (held now: failed, or on_error: pause_table; its checkpoint kept)
                table.applied_lsn = end_lsn
        self.stats.events_total += self._batch_events
        self.stats.batches += 1
        self.stats.applied_lsn = end_lsn
        self.stats.count(self._batch_kinds)
        self._batch_kinds = {}
        self._batch.clear()
        self._batch_events = 0
        self._batch_started = time.monotonic() if self._in_transaction else None  # the open one joins the next
        self._batch_end_lsn = 0
        return end_lsn

    def _table_apply(
        self, table: StreamTable, changes: TableChanges | MultisetChanges, checkpoint: Checkpoint
    ) -> Callable[[], Any]:
        """Applies the table's changes; the change set (poison rows set aside, cdc/poison.py) is built on
        the first call and kept only for a retry."""
        built: list[ChangeSet | None] = []

        def apply() -> None:
            built[:] = built or [change_set_of(table, changes, self.on_poison)]  # poison rows set aside once
            if built[0] is None:
                return  # held (on_error: pause_table): its checkpoint stays, the slot waits for it
            self.sink.apply_changes(table.target, changes.schema, built[0], checkpoint, soft_delete=self.soft_delete)
            built.clear()

        return apply

    def durable_lsn(self, position: int) -> int:
        """The position the slot may be acknowledged to: never past a table held for approval or
        failed (their checkpoints), nor past the limit of one being resynced."""
        held = [t.applied_lsn if t.resync_limit is None else t.resync_limit for t in self.tables.values() if t.held]
        return min([position, *held])
