"""Staying up through blips: the live run survives source, network, sink and state-store faults.

Each test runs one CDC run in a thread, its source (or sink, or state store) reached through a
loopback `FaultProxy`, injects a fault while the run streams, makes changes after the fault, and
asserts that the SAME run applies them within a bound, that its lag rose during the stall and fell
after, and that the sink equals the source row by row at the end.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pytest
from fault_proxy import FaultProxy
from table_compare import assert_same_rows, normalize, postgres_sink_rows, source_rows

from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcProgress, CdcRun, CdcTableConfig
from nilus_dagster.embedded.postgres import BIN_DIR, EmbeddedPostgres
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import Sink, SinkTable
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

COLUMNS = ["id", "v"]
RECOVER_S = 20.0  # changes made after a fault ends are in the sink within this bound
_RUNS: list[LiveRun] = []


@pytest.fixture(autouse=True)
def _stop_runs() -> Iterator[None]:
    """A failed test does not leave its run streaming."""
    yield
    while _RUNS:
        live = _RUNS.pop()
        live.stop.set()
        live.thread.join(timeout=30)


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


@pytest.fixture(params=["duckdb", "postgres"])
def sink_kind(request: pytest.FixtureRequest) -> str:
    return request.param


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
    _RUNS.append(live)
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
    ) or "".join(f"\n(ended: {live.error!r})" for live in _RUNS)
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


@pytest.fixture
def store(state_dsn: str) -> Iterator[StateStore]:
    with StateStore(state_dsn).open() as opened:
        yield opened


def test_run_survives_cut_replication_connections(
    source_db: str, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", int(source_db.rsplit(":", 1)[1].split("/")[0])).start() as proxy:
        live = start_run(proxy.dsn(source_db), sink, store, "cut")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        wait_until(lambda: store.last_heartbeat("acme", "cut").detail["phase"] == "streaming", 5,
                   "the heartbeat to say streaming")
        for round_ in range(2):  # two cuts: each is a new fault with the whole budget
            proxy.cut()
            write(source_db, 1000 + 100 * round_, 20)
            took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the cut")
            assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 2
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_run_survives_a_frozen_connection_and_lag_shows_the_stall(
    source_db: str, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", int(source_db.rsplit(":", 1)[1].split("/")[0])).start() as proxy:
        live = start_run(proxy.dsn(source_db), sink, store, "freeze", dead_after_s=3.0)
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        time.sleep(1.5)
        frozen_at = time.monotonic()
        proxy.freeze()
        write(source_db, 1000, 20)  # straight to the server: only the run's connections are frozen
        time.sleep(6)
        assert max(live.lag_since(frozen_at)) >= 3.0, "the lag did not rise while the connection was frozen"
        proxy.thaw()
        thawed_at = time.monotonic()
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the freeze")
        assert took < RECOVER_S
        wait_until(lambda: live.lag_since(thawed_at + took)[-1:] == [0.0], 15, "the lag to fall back to 0")
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A cluster of this test's own, which it may restart."""
    cluster = EmbeddedPostgres(tmp_path / "own-pg").start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def test_run_survives_a_source_restart(
    own_cluster: EmbeddedPostgres, store: StateStore, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    with psycopg.connect(own_cluster.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE src")
    source = own_cluster.dsn("src")
    make_table(source)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    live = start_run(source, sink, store, "restart")
    wait_until(lambda: streaming(live) and in_sink(read, source)(), 30, "the snapshot to stream")
    import subprocess

    subprocess.run([str(BIN_DIR / "pg_ctl"), "-D", str(own_cluster.pgdata), "-w", "-m", "fast", "-l",
                    str(own_cluster.pgdata / "server.log"), "restart"], check=True, capture_output=True,
                   **({"user": "pgserver"} if own_cluster._run_as else {}))
    write(source, 1000, 20)
    took = wait_until(in_sink(read, source), RECOVER_S, "changes after the restart")
    assert took < RECOVER_S
    assert live.thread.is_alive() and live.run.reconnects >= 1
    live.finish()
    assert_same_rows(source_rows(source, "public.t", COLUMNS, "id"), read())


def pg_port(dsn: str) -> int:
    return int(dsn.rsplit(":", 1)[1].split("/")[0])


def outage(proxy: FaultProxy) -> None:
    """The server behind the proxy goes away: open connections drop, new ones are refused."""
    proxy.refuse()
    proxy.cut()


def test_run_survives_a_postgres_sink_outage(source_db: str, store: StateStore, sink_pg: str) -> None:
    make_table(source_db)
    with FaultProxy("127.0.0.1", pg_port(sink_pg)).start() as proxy:
        sink = PostgresSink(proxy.dsn(sink_pg))
        read = lambda: postgres_sink_rows(sink_pg, "replica.t", COLUMNS, "id")  # noqa: E731 - not through the proxy
        live = start_run(source_db, sink, store, "sinkdown")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        outage(proxy)
        down_at = time.monotonic()
        write(source_db, 1000, 20)
        time.sleep(4)
        assert max(live.lag_since(down_at)) >= 2.0, "the lag did not rise while the sink was down"
        assert live.thread.is_alive() and read() != source_rows(source_db, "public.t", COLUMNS, "id")
        proxy.refuse(False)
        took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the sink came back")
        assert took < RECOVER_S
        assert live.thread.is_alive() and live.run.reconnects >= 1
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_data_keeps_flowing_while_the_state_store_is_down(
    source_db: str, state_dsn: str, sink_kind: str, duckdb_path: Path, sink_pg: str
) -> None:
    make_table(source_db)
    sink, read = open_test_sink(sink_kind, duckdb_path, sink_pg)
    with FaultProxy("127.0.0.1", pg_port(state_dsn)).start() as proxy, StateStore(proxy.dsn(state_dsn)).open() as store:
        live = start_run(source_db, sink, store, "storedown")
        wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
        outage(proxy)
        down_at = datetime.now(UTC)
        write(source_db, 1000, 20)
        took = wait_until(in_sink(read, source_db), 10, "changes while the state store is down")
        assert took < 10
        write(source_db, 2000, 20)
        wait_until(in_sink(read, source_db), 10, "more changes while the state store is down")
        with StateStore(state_dsn).open() as direct:
            beat = direct.last_heartbeat("acme", "storedown")
            assert beat is not None and beat.beat_at < down_at + timedelta(seconds=1)  # none got through meanwhile
            proxy.refuse(False)
            back_at = datetime.now(UTC)
            wait_until(lambda: direct.last_heartbeat("acme", "storedown").beat_at > back_at, 40,
                       "heartbeats after the state store came back")
        assert live.thread.is_alive() and live.run.reconnects == 0
        live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_a_fault_longer_than_retry_for_fails_the_run_and_a_lost_slot_fails_it_at_once(
    source_db: str, store: StateStore, duckdb_path: Path
) -> None:
    make_table(source_db)
    with FaultProxy("127.0.0.1", pg_port(source_db)).start() as proxy:
        sink = DuckDBSink(duckdb_path)  # any sink: the source is what fails
        live = start_run(proxy.dsn(source_db), sink, store, "budget", retry_for_s=3.0)
        wait_until(lambda: streaming(live), 30, "the run to stream")
        outage(proxy)
        began = time.monotonic()
        live.thread.join(timeout=20)
        assert not live.thread.is_alive() and time.monotonic() - began < 15
        assert "could not recover within retry_for (3s)" in str(live.error)

        proxy.refuse(False)
        second = start_run(proxy.dsn(source_db), sink, store, "lostslot")
        wait_until(lambda: streaming(second), 30, "the second run to stream")
        outage(proxy)
        with psycopg.connect(source_db, autocommit=True) as conn:  # not through the proxy
            slot = second.run.slot
            wait_until(lambda: conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,)) is not None, 10,
                       "the slot to be dropped")
        proxy.refuse(False)
        began = time.monotonic()
        second.thread.join(timeout=10)
        assert not second.thread.is_alive() and time.monotonic() - began < 5, "a lost slot is not retried"
        assert "does not exist" in str(second.error) or "dropped" in str(second.error)


def test_exported_lag_grows_once_the_heartbeat_is_stale() -> None:
    from nilus_dagster.api.metrics import cdc_lag

    assert cdc_lag({"phase": "streaming", "lag_seconds": 1.5}, beat_age_s=2.0) == 1.5
    assert cdc_lag({"phase": "streaming", "lag_seconds": 1.5}, beat_age_s=120.0) == 121.5  # the run died
    assert cdc_lag({"phase": "stopped", "lag_seconds": 0.0}, beat_age_s=40.0) == 40.0  # no run is alive


def test_run_survives_a_duckdb_file_locked_by_another_process(
    source_db: str, store: StateStore, duckdb_path: Path
) -> None:
    """The sink waits for the lock; the run's first report after it shows the lag of the stall."""
    import subprocess

    make_table(source_db)
    live = start_run(source_db, DuckDBSink(duckdb_path), store, "locked")
    read = lambda: duckdb_rows_in_process(duckdb_path)  # noqa: E731
    wait_until(lambda: streaming(live) and in_sink(read, source_db)(), 30, "the snapshot to stream")
    holder = subprocess.Popen(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", f"import duckdb, sys, time; c = duckdb.connect({str(duckdb_path)!r}); "
         "print('locked', flush=True); time.sleep(6)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    locked_at = time.monotonic()
    write(source_db, 1000, 20)
    holder.wait(timeout=30)
    took = wait_until(in_sink(read, source_db), RECOVER_S, "changes after the lock was released")
    assert took < RECOVER_S
    assert max(live.lag_since(locked_at)) >= 4.0, "the stall did not show in the lag"
    wait_until(lambda: live.lag_since(locked_at)[-1] == 0.0, 15, "the lag to fall back to 0")
    assert live.thread.is_alive()
    live.finish()
    assert_same_rows(source_rows(source_db, "public.t", COLUMNS, "id"), read())


def test_which_errors_a_run_outlives() -> None:
    from nilus_dagster.cdc.retry import RetryBudget, is_transient, parse_duration
    from nilus_dagster.cdc.slots import ServerClosed, SlotLost, SystemMismatch
    from nilus_dagster.sinks.base import SinkError

    def chained(outer: Exception, cause: Exception) -> Exception:
        try:
            raise outer from cause
        except Exception as error:  # noqa: BLE001
            return error

    assert is_transient(ServerClosed("lost"))
    assert is_transient(chained(SinkError("write failed"), psycopg.OperationalError("server closed")))
    assert not is_transient(chained(SinkError("write failed"), psycopg.errors.NumericValueOutOfRange("too big")))
    assert not is_transient(SlotLost("gone")) and not is_transient(SystemMismatch("other cluster"))
    assert not is_transient(chained(SlotLost("dropped"), psycopg.OperationalError("server closed")))
    assert [parse_duration(d) for d in ("10m", "30s", "1.5h", "500ms", 7)] == [600, 30, 5400, 0.5, 7]
    now = [0.0]
    budget = RetryBudget(5.0, clock=lambda: now[0])
    delays = []
    while (delay := budget.next_delay()) is not None:
        delays.append(delay)
        now[0] += delay
    assert 0.1 <= delays[0] <= 0.2 and all(d <= 10.0 for d in delays) and sum(delays) == pytest.approx(5.0)


def test_retry_for_in_the_spec() -> None:
    from cdc_project import cdc_pipeline

    from nilus_dagster.components.cdc_assets import cdc_config
    from nilus_dagster.spec.errors import PipelineSpecError, validate_spec
    from nilus_dagster.spec.project import PipelinesSpec

    def spec(**cdc: Any) -> dict[str, Any]:
        return {"connections": {"src": {"type": "postgres", "host": "h", "database": "db", "user": "u"},
                                "sink": {"type": "duckdb", "path": "/tmp/x.duckdb"}},
                "pipelines": [cdc_pipeline("p", ["public.t"], cdc=cdc)]}

    loaded = validate_spec(PipelinesSpec, spec(retry_for="30s"), "defs.yaml")
    assert cdc_config(loaded, loaded.pipelines[0]).retry_for_s == 30.0
    default = validate_spec(PipelinesSpec, spec(), "defs.yaml")
    assert cdc_config(default, default.pipelines[0]).retry_for_s == 600.0
    with pytest.raises(PipelineSpecError, match="not a duration"):
        validate_spec(PipelinesSpec, spec(retry_for="soon"), "defs.yaml")
