"""A sink wrapper that adds up the wall time spent in each sink call: the split between the sink
(DuckDB) and everything before it (receive, decode, batch) without a profiler's overhead."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

TIMED = ("apply_changes", "write", "prepare_table", "read_checkpoint")


class TimedSink:
    """Delegates to `inner`; `seconds[name]` and `calls[name]` per timed method."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in TIMED:
            return attribute
        return self._timed(name, attribute)

    def _timed(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return call

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {self.calls[name]}x {seconds:.2f}s" for name, seconds in self.seconds.items())
