"""Counters of a CDC stream: events, transactions, the applied LSN, changes per table, the recent rate."""

from __future__ import annotations

import time
from collections import Counter, deque
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

    def count(self, changes: dict[str, Counter[str]]) -> None:
        """Add the per-table counts of changes just made durable."""
        for table, kinds in changes.items():
            self.table_changes.setdefault(table, Counter()).update(kinds)
