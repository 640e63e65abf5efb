"""Helpers for the blip tests: a CDC run in a thread, its progress kept, and fault helpers."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import psycopg
from fault_proxy import FaultProxy
from table_compare import normalize, postgres_sink_rows, source_rows

from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcProgress, CdcRun, CdcTableConfig
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkTable
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

COLUMNS = ["id", "v"]


RECOVER_S = 20.0  # changes made after a fault ends are in the sink within this bound


RUNS: list[LiveRun] = []


@dataclass
class LiveRun:
    """One CdcRun in a thread; every progress report it makes is kept."""

    run: CdcRun
    progress: list[tuple[float, CdcProgress]] = field(default_factory=list)
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._main, daemon=True, name=f"run-{self.run.run_id}")

    def _main(self) -> None:
        try:
            self.run.run()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error
            traceback.print_exc()

    def lag_since(self, start: float) -> list[float]:
        return [p.lag_seconds for at, p in self.progress if at >= start and p.phase == "streaming"]

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the run did not stop"
        assert self.error is None, f"the run failed: {self.error!r}"


def record(live: list[LiveRun]) -> Callable[[CdcProgress], None]:
    def on_progress(progress: CdcProgress) -> None:
        live[0].progress.append((time.monotonic(), CdcProgress(**progress.as_detail())))

    return on_progress


def open_test_sink(kind: str, duckdb_path: Path, sink_dsn: str) -> tuple[Sink, Callable[[], list[tuple]]]:
    if kind == "duckdb":
        return DuckDBSink(duckdb_path), lambda: duckdb_rows_in_process(duckdb_path)
    return PostgresSink(sink_dsn), lambda: postgres_sink_rows(sink_dsn, "replica.t", COLUMNS, "id")


def duckdb_rows_in_process(path: Path) -> list[tuple]:
    """The sink's rows, read while the run (in this process) writes: DuckDB lets one process open
    a file only with one configuration, so this reads as the sink opens it (not read-only)."""
    with duckdb.connect(str(path)) as conn:
        return [tuple(normalize(v) for v in row) for row in conn.execute("SELECT id, v FROM replica.t ORDER BY id").fetchall()]


def make_table(dsn: str, rows: int = 50) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO public.t SELECT g, 'row ' || g FROM generate_series(1, %s) g", (rows,))


def start_run(source_dsn: str, sink: Sink, store: StateStore, name: str, **run_options: Any) -> LiveRun:
    config = CdcPipelineConfig(
        key=PipelineKey("acme", name, f"nilus:v1:{name}:acme"),
        source_connection="src",
        source_dsn=source_dsn,
        tables=(CdcTableConfig(TableName("public", "t"), SinkTable("replica", "t")),),
        batch_max_ms=100,
        retry_for_s=run_options.pop("retry_for_s", 60.0),
    )
    holder: list[LiveRun] = []
    stop = threading.Event()
    run = CdcRun(config, sink, store, f"run-{name}", should_stop=stop.is_set, on_progress=record(holder),
                 heartbeat_interval_s=0.5, **run_options)
    live = LiveRun(run, stop=stop)
    holder.append(live)
    RUNS.append(live)
    live.thread.start()
    return live


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # noqa: BLE001, S110 - the sink may be busy or unreachable for a moment
            pass
        time.sleep(0.1)
    stacks = "".join(
        f"\n-- {t.name}\n" + "".join(traceback.format_stack(sys._current_frames()[t.ident]))  # noqa: SLF001
        for t in threading.enumerate() if t.name.startswith("run-") and t.ident in sys._current_frames()  # noqa: SLF001
    ) or "".join(f"\n(ended: {live.error!r})" for live in RUNS)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; the run is at:{stacks}")


def write(dsn: str, first: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.t SELECT g, 'after ' || g FROM generate_series(%s::int, %s::int) g",
                      (first, first + count - 1))
        conn.execute("UPDATE public.t SET v = v || ' updated' WHERE id % 7 = 0")
        conn.execute("DELETE FROM public.t WHERE id % 11 = 0")


def in_sink(read: Callable[[], list[tuple]], source_dsn: str) -> Callable[[], bool]:
    return lambda: read() == source_rows(source_dsn, "public.t", COLUMNS, "id")


def streaming(live: LiveRun) -> bool:
    return any(p.phase == "streaming" for _, p in live.progress)


def pg_port(dsn: str) -> int:
    return int(dsn.rsplit(":", 1)[1].split("/")[0])


def outage(proxy: FaultProxy) -> None:
    """The server behind the proxy goes away: open connections drop, new ones are refused."""
    proxy.refuse()
    proxy.cut()
