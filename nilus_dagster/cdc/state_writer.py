"""Heartbeats and offset records off the critical path.

The offsets a run resumes from live in the sink (each table's checkpoint, committed with its
changes); what the state store gets while streaming (heartbeats, the slot position) is for
monitoring. `StateWriter` writes it from a thread of its own, newest value first: a state store
that is down or slow for a while never stops the data, and the writes resume once it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)


class StateWriter:
    """Keeps the newest value per key and writes it with `write(key, value)`, retrying failures
    every `retry_s`. `errors` counts failed writes; `failing_since` is set while writes fail."""

    def __init__(self, write: Callable[[str, Any], None], *, retry_s: float = 2.0) -> None:
        self._write = write
        self._retry_s = retry_s
        self._pending: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self.errors = 0
        self.failing_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="nilus-state-writer", daemon=True)
        self._thread.start()

    def put(self, key: str, value: Any) -> None:
        with self._cond:
            self._pending[key] = value
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until everything put so far is written; False if not."""
        end = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify()
            while self._pending or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Write what is pending (bounded by `timeout_s`), then stop the thread."""
        done = self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=1.0)
        return done

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                key, value = next(iter(self._pending.items()))
                del self._pending[key]
                self._busy = True
            ok = self._attempt(key, value)
            with self._cond:
                self._busy = False
                if not ok:
                    self._pending.setdefault(key, value)  # unless a newer value came meanwhile
                self._cond.notify_all()
                if not ok:
                    self._cond.wait(self._retry_s)

    def _attempt(self, key: str, value: Any) -> bool:
        try:
            self._write(key, value)
        except Exception as error:  # noqa: BLE001 - any store failure: keep the value and retry
            self.errors += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                _log.warning("state store write (%s) failed, retrying in the background: %s", key, error)
            return False
        self.failing_since = None
        return True


class BackgroundRead:
    """Calls `read()` every `interval_s` in a thread of its own; `value_since(t)` is the newest
    result read after monotonic time `t` (None if none yet, or the store failed since)."""

    def __init__(self, read: Callable[[], Any], interval_s: float) -> None:
        self._read, self._interval_s = read, interval_s
        self._value: tuple[float, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="nilus-state-reader", daemon=True)
        self._thread.start()

    def value_since(self, started: float) -> Any:
        latest = self._value
        return latest[1] if latest is not None and latest[0] > started else None

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            began = time.monotonic()
            try:
                self._value = (began, self._read())
            except Exception as error:  # noqa: BLE001 - the store is down: nothing new to tell
                _log.debug("state store read failed: %s", error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
