"""A deliberate stop of a long-lived CDC run is not a failure.

Ctrl-C (SIGINT), SIGTERM (a Kubernetes rollout) and "Terminate" in the Dagster UI (the run becomes
CANCELING, then its process gets SIGINT) all become a stop request: the run finishes the open
transaction, flushes what it received, records its offsets, and ends CANCELED. Only real faults
fail a run. A second signal interrupts at once (nothing is half-committed: the next run replays).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CANCEL_STATUSES = (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)


class DeliberateStop:
    """Watches for a stop request: a signal to this process, or the run marked CANCELING."""

    def __init__(self, instance: dg.DagsterInstance, run_id: str, log: Any, poll_interval_s: float = 2.0) -> None:
        self.instance = instance
        self.run_id = run_id
        self.log = log
        self.poll_interval_s = poll_interval_s
        self.reason: str | None = None
        self._last_poll = 0.0
        self._signals = 0

    def requested(self) -> bool:
        """True once a stop was asked for (the run's status is read at most every poll interval)."""
        if self.reason is None and time.monotonic() - self._last_poll >= self.poll_interval_s:
            self._last_poll = time.monotonic()
            run = self.instance.get_run_by_id(self.run_id)
            if run is not None and run.status in CANCEL_STATUSES:
                self.reason = "the run was terminated"
        return self.reason is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:  # a second signal (not the one that follows "Terminate"): stop now
            raise dg.DagsterExecutionInterruptedError(f"{signal.Signals(signum).name} received twice")
        self.reason = self.reason or f"{signal.Signals(signum).name} received"

    @contextmanager
    def signals(self) -> Iterator[None]:
        """While inside, SIGINT and SIGTERM request a stop instead of interrupting (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    @contextmanager
    def ending(self, error: type[Exception], summary: str) -> Iterator[None]:
        """`error` raised after a stop request is how the work inside says it stopped early."""
        try:
            yield
        except error:
            if self.reason is None:
                raise
            self.end_canceled(summary)

    def end_canceled(self, summary: str) -> None:
        """After a stop request: mark the run CANCELING (if the stop came from a signal) and end
        it by the interrupt Dagster records as a cancellation, not a failure."""
        if self.reason is None:
            return
        message = f"CDC run stopped on request ({self.reason}) after flushing what it received; {summary}"
        self.log.info(message)
        run = self.instance.get_run_by_id(self.run_id)
        if run is not None and run.status not in CANCEL_STATUSES:
            self.instance.report_run_canceling(run, message=message)
        raise dg.DagsterExecutionInterruptedError(message)
