"""The CDC row-count parity check: source rows against sink rows at one matched point of the stream.

Real PostgreSQL source, DuckDB sink, real Dagster instance; writers run while rounds count, and
no round may report a mismatch that is not there.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import duckdb
import psycopg
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from test_cdc_crash import create_items

from nilus_dagster.cdc.pipeline import CdcProgress, CdcRun
from nilus_dagster.components.cdc_config import cdc_config
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore

ITEMS = dg.AssetKey(["acme", "crashy", "public", "items"])


def _parity_checks(result: dg.ExecuteInProcessResult) -> list[dg.AssetCheckEvaluation]:
    return [e for e in result.get_asset_check_evaluations() if e.check_name == "row_count_parity"]


def test_row_count_parity_passes_when_caught_up_and_fails_with_the_numbers_when_the_sink_lost_a_row(
    pipeline_env: str, duckdb_sink: SinkTarget
) -> None:
    create_items(pipeline_env, 20)
    defs = cdc_project(duckdb_sink, cdc_pipeline("crashy", ["public.items"], checks={"severity": "error"}))
    instance = dg.DagsterInstance.get()
    first = run_until_caught_up(defs, "acme__crashy", instance)
    assert first.success, failure_message(first)
    [passed] = _parity_checks(first)
    assert passed.passed and passed.asset_key == ITEMS
    assert passed.metadata["source_rows"].value == passed.metadata["sink_rows"].value == 20

    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("INSERT INTO public.items VALUES (21, 0, 'a', now()), (22, 0, 'b', now())")
        conn.execute("DELETE FROM public.items WHERE id = 1")
    with duckdb.connect(duckdb_sink.location) as sink:  # the sink loses a row behind the stream's back
        sink.execute("DELETE FROM replica.items WHERE id = 5")
    second = run_until_caught_up(defs, "acme__crashy", instance)
    assert second.success, failure_message(second)
    [failed] = _parity_checks(second)
    assert not failed.passed and failed.severity == dg.AssetCheckSeverity.ERROR
    numbers = {k: failed.metadata[k].value for k in ("source_rows", "sink_rows", "difference")}
    assert numbers == {"source_rows": 21, "sink_rows": 20, "difference": -1}


def _spec(sink: SinkTarget) -> PipelinesSpec:
    pipeline = cdc_pipeline("crashy", ["public.items"], cdc={"batch_max_ms": 50}, checks={"row_count_interval": "1s"})
    raw = {"connections": {"src": {"type": "postgres", "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
           "pipelines": [pipeline]}
    return validate_spec(PipelinesSpec, raw, "test")


def _write_until(dsn: str, stop: threading.Event, written: list[int]) -> None:
    """Transactions that stay open a moment (so rounds see them in progress): insert, update, delete."""
    next_id = 1000
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            with conn.transaction():
                conn.execute("INSERT INTO public.items SELECT g, 0, 'w', now() FROM generate_series(%s::int, %s::int) g",
                             (next_id, next_id + 2))
                time.sleep(0.02)
                conn.execute("UPDATE public.items SET counter = counter + 1 WHERE id = %s", (next_id,))
                conn.execute("DELETE FROM public.items WHERE id = %s", (next_id - 2,))
            next_id += 3
            written.append(next_id)


def test_rounds_under_concurrent_writes_never_report_a_false_mismatch(
    pipeline_env: str, state_dsn: str, duckdb_sink: SinkTarget
) -> None:
    create_items(pipeline_env, 50)
    spec = _spec(duckdb_sink)
    pipeline = spec.pipelines[0]
    config = cdc_config(spec, pipeline)
    assert config.row_count_interval_s == 1.0
    sink = open_sink(pipeline.sink.connection, spec.connections[pipeline.sink.connection], dataset="replica")
    results: dict[int, dict] = {}
    stop_run, stop_writes = threading.Event(), threading.Event()

    def record(progress: CdcProgress) -> None:
        if progress.row_parity_round and progress.row_parity_round not in results:
            results[progress.row_parity_round] = dict(progress.row_parity["public.items"])
        if len(results) >= 6 and len(written) > 20:
            stop_run.set()

    written: list[int] = []
    writer = threading.Thread(target=_write_until, args=(pipeline_env, stop_writes, written))
    try:
        with StateStore(state_dsn).open() as store:
            run = CdcRun(config, sink, store, "parity", should_stop=stop_run.is_set, on_progress=record)
            failures: list[BaseException] = []

            def work() -> None:
                try:
                    run.run()
                except BaseException as error:  # noqa: BLE001 - asserted below
                    failures.append(error)
                    stop_run.set()

            runner = threading.Thread(target=work)
            runner.start()
            writer.start()
            runner.join(timeout=120)
            assert not runner.is_alive(), f"only {len(results)} rounds in 120 s"
            assert not failures, failures
    finally:
        stop_writes.set()
        stop_run.set()
        if writer.ident:
            writer.join(timeout=30)
        sink.close()
    assert len(results) >= 6
    mismatches = [r for r in results.values() if r["source_rows"] != r["sink_rows"]]
    assert not mismatches, mismatches
    # the rounds counted while transactions were open: the sink had moved on from the source's snapshot
    assert any(r["sink_rows_now"] != r["sink_rows"] for r in results.values())
    assert max(r["source_rows"] for r in results.values()) > 50  # the writes were counted
