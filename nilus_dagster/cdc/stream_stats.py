"""Counters of a CDC stream: events, transactions, the applied LSN, changes per table, the recent rate,
and the recent transactions per table by xid (for the row-count parity check, cdc/row_parity.py)."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

RATE_WINDOW_S = 30.0  # events_per_s is a recent rate over this window


@dataclass
class StreamStats:
    events_total: int = 0
    transactions: int = 0
    batches: int = 0
    applied_lsn: int = 0  # end LSN of the last transaction made durable
    chunked_transactions: int = 0  # transactions of more than batch_max_rows changes, applied in chunks
    peak_buffered_changes: int = 0  # the most changes of one transaction held in memory at once
    last_commit_time: datetime | None = None
    started: float = field(default_factory=time.monotonic)
    # per source table (schema.table): changes made durable by kind, "I", "U", "D", "T" (truncate)
    table_changes: dict[str, Counter[str]] = field(default_factory=dict)
    _samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    # per table: the transactions that changed it, as (xid, rows added - rows removed, truncated)
    transactions_by_table: dict[str, TableTransactions] = field(default_factory=dict, repr=False)

    @property
    def events_per_s(self) -> float:
        """The rate over about the last RATE_WINDOW_S seconds (the whole run while it is younger)."""
        now = time.monotonic()
        samples = self._samples
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, self.events_total))
        while len(samples) > 1 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        since, events = samples[0] if now - samples[0][0] >= 1.0 else (self.started, 0)
        return (self.events_total - events) / max(now - since, 1e-9)

    def note_transaction(self, xid: int, kinds: dict[str, Counter[str]]) -> None:
        """Remember a committed transaction's xid and net row-count effect on each table it changed."""
        for table, counts in kinds.items():
            tracked = self.transactions_by_table.get(table)
            if tracked is None:
                tracked = self.transactions_by_table[table] = TableTransactions()
            tracked.add(xid, counts["I"] - counts["D"], counts["T"] > 0)

    def count(self, changes: dict[str, Counter[str]]) -> None:
        """Add the per-table counts of changes just made durable."""
        for table, kinds in changes.items():
            self.table_changes.setdefault(table, Counter()).update(kinds)


TRACKED_TRANSACTIONS_MAX = 100_000  # per table; older ones are forgotten (a parity round then skips)


@dataclass
class TableTransactions:
    """The transactions that changed one table, newest last, bounded; `forgotten_xid` is the newest
    xid dropped for the bound (None: nothing dropped)."""

    entries: deque[tuple[int, int, bool]] = field(default_factory=deque)
    forgotten_xid: int | None = None

    def add(self, xid: int, delta: int, truncated: bool) -> None:
        self.entries.append((xid, delta, truncated))
        if len(self.entries) > TRACKED_TRANSACTIONS_MAX:
            self.forgotten_xid = self.entries.popleft()[0]

    def forget_seen(self, sees: Callable[[int], bool]) -> None:
        """Drop the transactions a snapshot sees: every later snapshot sees them too."""
        self.entries = deque(entry for entry in self.entries if not sees(entry[0]))
