"""Staying up through blips: which errors a run may outlive, and the budget it has to outlive them.

A streaming run that loses its source, sink or state store does not die at once: it backs off
(bounded, jittered) and starts the stream again from the durable position (each table's sink
checkpoint; the slot replays the rest), for as long as the fault lasts less than `retry_for`.
Only errors that a reconnect cannot cure (a lost slot, another cluster, a refused schema or value)
end the run at once.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psycopg

from nilus_dagster.cdc.applier import SchemaChangeRefused
from nilus_dagster.cdc.run_config import CdcPipelineFailed
from nilus_dagster.cdc.slots import ServerClosed, SlotInUse, SlotLost, SystemMismatch
from nilus_dagster.sinks.base import SinkUnavailable, UnsupportedColumnType
from nilus_dagster.sources.postgres.connection import SourceUnreachable
from nilus_dagster.state.base import StateStoreError

DEFAULT_RETRY_FOR_S = 600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

# Never cured by reconnecting: the run fails at once.
_PERMANENT: tuple[type[BaseException], ...] = (
    CdcPipelineFailed,
    SchemaChangeRefused,
    SlotLost,
    SystemMismatch,
    UnsupportedColumnType,
    psycopg.DataError,
    psycopg.IntegrityError,
    psycopg.ProgrammingError,
    psycopg.NotSupportedError,
)
_TRANSIENT: tuple[type[BaseException], ...] = (
    ServerClosed,
    SlotInUse,  # after a fault: the server has not yet noticed that our previous walsender is gone
    SinkUnavailable,
    SourceUnreachable,
    StateStoreError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    ConnectionError,
    TimeoutError,
)


class FaultOutlastedBudget(Exception):
    """A transient fault lasted longer than `retry_for`: the run ends (the pipeline is not failed;
    the keep-alive sensor starts the next run after its backoff)."""


def parse_duration(text: str | float | int) -> float:
    """Seconds from `600`, `"30s"`, `"10m"`, `"1.5h"`, `"500ms"`."""
    if isinstance(text, int | float):
        return float(text)
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not a duration: use e.g. 30s, 10m or 1h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def is_transient(error: BaseException) -> bool:
    """True when reconnecting may cure `error`: a dropped or refused connection (source, sink,
    state store), a server restarting, a locked DuckDB file, a BigQuery rate limit or 5xx. An error
    whose chain holds a permanent cause (a value the sink refuses, a lost slot) never is."""
    chain = list(_causes(error))
    if any(isinstance(e, _PERMANENT) for e in chain):
        return False
    return any(_transient_one(e) for e in chain)


def _transient_one(error: BaseException) -> bool:
    if isinstance(error, _TRANSIENT):
        return True
    module = type(error).__module__
    if module.startswith("duckdb") and type(error).__name__ == "IOException":
        return True  # e.g. the file is locked by another process for a while
    if module.startswith("google"):
        from nilus_dagster.sinks.bigquery.errors import is_transient as bigquery_transient

        return bigquery_transient(error)
    return False


@dataclass
class RetryBudget:
    """Jittered exponential backoff within a time budget. A fault starts the clock; `recovered()`
    (data flowing again) stops it, so separate blips each get the whole budget."""

    retry_for_s: float = DEFAULT_RETRY_FOR_S
    first_delay_s: float = 0.2
    max_delay_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    _fault_since: float | None = field(default=None, init=False)
    _attempt: int = field(default=0, init=False)

    @property
    def in_fault(self) -> bool:
        return self._fault_since is not None

    def recovered(self) -> None:
        self._fault_since, self._attempt = None, 0

    def next_delay(self) -> float | None:
        """The wait before the next attempt, or None when the budget is spent."""
        now = self.clock()
        if self._fault_since is None:
            self._fault_since = now
        left = self._fault_since + self.retry_for_s - now
        if left <= 0:
            return None
        cap = min(self.max_delay_s, self.first_delay_s * 2**self._attempt)
        self._attempt += 1
        return min(left, random.uniform(cap / 2, cap))

    def fault_seconds(self) -> float:
        return 0.0 if self._fault_since is None else self.clock() - self._fault_since

    def wait(self, should_stop: Callable[[], bool]) -> bool:
        """Back off before the next attempt; False when the budget is spent. Returns early (True)
        when asked to stop, so a stop request never waits out a backoff."""
        delay = self.next_delay()
        if delay is None:
            return False
        end = self.clock() + delay
        while not should_stop() and (left := end - self.clock()) > 0:
            self.sleep(min(left, 0.1))
        return True
