"""Batch loads killed (SIGKILL) at every crash point, on every sink and strategy, then run again.

Each test: an ordinary load, source changes, a worker process that dies at the crash point, more
source changes (rows arriving before the next run), an ordinary load. The sink must then equal
the source row by row (nothing lost, nothing doubled), and a further run must change nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from batch_worker import parse_spec, run_loads
from table_compare import Row, assert_same_rows, bigquery_rows, duckdb_rows, postgres_sink_rows, source_rows

from nilus_dagster.state.store import StateStore

WORKER = Path(__file__).with_name("batch_worker.py")
COLUMNS = ["id", "kind", "updated_at"]
CURSORS = {"append": "id", "merge": "updated_at", "replace": None}


@dataclass
class CrashSink:
    """A sink connection for the pipeline and how to read its `events` table."""

    connection: dict[str, object]
    dataset: str
    rows: Callable[[], list[Row]]
    bigquery: bool = False


@pytest.fixture(params=["duckdb", "postgres", "bigquery"])
def crash_sink(
    request: pytest.FixtureRequest, duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CrashSink]:
    if request.param == "duckdb":
        yield CrashSink({"type": "duckdb", "path": str(duckdb_path)}, "analytics",
                        lambda: duckdb_rows(duckdb_path, "analytics.events", COLUMNS, "id"))
    elif request.param == "postgres":
        monkeypatch.setenv("SINK_DSN", sink_pg)
        yield CrashSink({"type": "postgres", "dsn_env": "SINK_DSN"}, "analytics",
                        lambda: postgres_sink_rows(sink_pg, "analytics.events", COLUMNS, "id"))
    else:
        emulator, client = request.getfixturevalue("bigquery_emulator"), request.getfixturevalue("bigquery_client")
        dataset = f"crash_{uuid.uuid4().hex[:10]}"
        ref = f"{emulator.project}.{dataset}.events"
        yield CrashSink({"type": "bigquery", "project": emulator.project, "api_endpoint": emulator.url}, dataset,
                        lambda: bigquery_rows(client, ref, COLUMNS, "id"), bigquery=True)
        client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)


def spec_json(sink: CrashSink, strategy: str) -> str:
    cursor = CURSORS[strategy]
    table = {"name": "public.events", **({"cursor": cursor} if cursor else {})}
    pipeline = {"name": "events", "tenant": "acme", "source": {"connection": "src", "tables": [table]},
                "sink": {"connection": "sink", "dataset": sink.dataset, "strategy": strategy}}
    return json.dumps({"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
                       "pipelines": [pipeline]})


def change_source(dsn: str, strategy: str, round_: int) -> None:
    """New rows for every strategy; updates for merge; updates and deletes for replace. Cursor values
    grow round by round, as a real `updated_at` does."""
    first, day = 100 * round_, f"'2024-01-01'::timestamptz + interval '1 day' * {round_}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO public.events SELECT g, 'new', {day} + g * interval '1 s' "
                     "FROM generate_series(%s::int, %s::int) g", (first, first + 19))
        if strategy != "append":
            conn.execute(f"UPDATE public.events SET kind = %s, updated_at = {day} + interval '12 hours' "
                         "WHERE id %% 5 = %s", (f"changed{round_}", round_))
        if strategy == "replace":
            conn.execute("DELETE FROM public.events WHERE id %% 7 = %s", (round_,))


def crash_points() -> list[tuple[str, str, str]]:
    cases = [(sink, strategy, point) for sink in ("duckdb", "postgres", "bigquery")
             for strategy in ("append", "merge", "replace")
             for point in ("before_write", "after_data", "after_checkpoint")]
    return [*cases, ("bigquery", "append", "after_commit_unacknowledged")]


@pytest.mark.parametrize(
    ("crash_sink", "strategy", "point"), crash_points(), indirect=["crash_sink"], ids=["-".join(c) for c in crash_points()]
)
def test_killed_load_then_ordinary_run_is_exact(
    pipeline_env: str, state_dsn: str, crash_sink: CrashSink, strategy: str, point: str
) -> None:
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.events (id int PRIMARY KEY, kind text, updated_at timestamptz NOT NULL)")
        conn.execute("INSERT INTO public.events SELECT g, 'seed', '2024-01-01'::timestamptz + g * interval '1 s' "
                     "FROM generate_series(1, 30) g")
    spec = spec_json(crash_sink, strategy)
    with StateStore(state_dsn).open() as store:
        run_loads(parse_spec(spec), "events", store)
        change_source(pipeline_env, strategy, 1)
        before = crash_sink.rows()
        worker = subprocess.run([sys.executable, str(WORKER), spec, "events", point], env=dict(os.environ),
                                capture_output=True, timeout=120)
        assert worker.returncode == -signal.SIGKILL, worker.stderr.decode()[-3000:]
        bigquery_data_job_done = point == "after_data" and crash_sink.bigquery and strategy != "append"
        if point in ("before_write", "after_data") and not bigquery_data_job_done:
            assert crash_sink.rows() == before  # nothing visible yet (SQL sinks roll the transaction back)
        change_source(pipeline_env, strategy, 2)  # rows arrive before the next run
        run_loads(parse_spec(spec), "events", store)
        expected = source_rows(pipeline_env, "public.events", COLUMNS, "id")
        assert_same_rows(expected, crash_sink.rows())
        run_loads(parse_spec(spec), "events", store)  # nothing new: nothing changes
        assert_same_rows(expected, crash_sink.rows())
