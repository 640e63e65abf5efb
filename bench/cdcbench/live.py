"""A CDC run in a child process that reports as it goes (the backlog and soak benches).

The child (`python -m cdcbench.live SOURCE STATE DUCKDB [caught_up]`, run from bench/) streams
`public.big_tx` into DuckDB and prints one JSON line per progress report (at most one a second):
seconds since its start, the phase, lag, events applied, the slot's unconfirmed WAL and its own
peak RSS; a last line `{"done": ...}` when it ends (caught up, or stopped by SIGTERM). The parent
reads the lines as they come (`LiveChild.lines`).
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def child(source_dsn: str, state_dsn: str, duckdb_path: str, caught_up: bool) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from large_transaction import config  # the same table and pipeline key

    from nilus_dagster.cdc.pipeline import CdcProgress, run_cdc_pipeline
    from nilus_dagster.sinks.duckdb import DuckDBSink
    from nilus_dagster.state.store import StateStore

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started, last = time.monotonic(), 0.0

    def report(progress: CdcProgress) -> None:
        nonlocal last
        if time.monotonic() - last < 1.0:
            return
        last = time.monotonic()
        line = {"t": round(last - started, 1), "phase": progress.phase, "lag_s": progress.lag_seconds,
                "events": progress.events_total, "unconfirmed_wal": progress.unconfirmed_wal_bytes,
                "retained_wal": progress.retained_wal_bytes, "rss_mb": peak_rss_mb()}
        print(json.dumps(line), flush=True)

    with StateStore(state_dsn).open() as store:
        result = run_cdc_pipeline(config(source_dsn, 50_000), DuckDBSink(duckdb_path), store,
                                  run_id=f"bench-{time.time()}", should_stop=stop.is_set, on_progress=report,
                                  stop_at_caught_up=caught_up)
    done = {"seconds": round(time.monotonic() - started, 1), "events": result.stats.events_total,
            "peak_rss_mb": peak_rss_mb(), "peak_buffered_changes": result.stats.peak_buffered_changes}
    print(json.dumps({"done": done}), flush=True)


@dataclass
class LiveChild:
    process: subprocess.Popen[str]

    @classmethod
    def start(cls, source_dsn: str, state_dsn: str, duckdb_path: Path, *, caught_up: bool) -> LiveChild:
        args = [sys.executable, "-m", "cdcbench.live", source_dsn, state_dsn, str(duckdb_path)]
        process = subprocess.Popen([*args, *(["caught_up"] if caught_up else [])], cwd=BENCH_DIR,  # noqa: S603
                                   stdout=subprocess.PIPE, text=True)
        return cls(process)

    def lines(self) -> Iterator[dict[str, Any]]:
        """Every report until the child ends; raises if it failed."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                yield json.loads(line)
        if self.process.wait() != 0:
            raise RuntimeError(f"the CDC run failed (exit {self.process.returncode})")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], sys.argv[3], caught_up=sys.argv[4:] == ["caught_up"])
