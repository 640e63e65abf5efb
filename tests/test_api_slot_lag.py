"""Lag while no run is alive: the metrics server reads each CDC pipeline's slot on the source, so
`nilus_cdc_slot_unconfirmed_wal_bytes` rises with changes made after the run stopped (and the lag
keeps growing with the heartbeat's age)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from blips_harness import duckdb_rows_in_process, in_sink, make_table, start_run, streaming, wait_until
from fastapi.testclient import TestClient
from test_api_server import _sample
from test_cdc_blips import _stop_runs, store  # noqa: F401 - fixtures: stop left-over runs, a state store

from nilus_dagster.api.metrics import build_registry, create_metrics_app
from nilus_dagster.api.services import Services
from nilus_dagster.api.settings import Settings
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.state.store import StateStore

DEFS = """
type: nilus_dagster.components.NilusPipelines
attributes:
  connections:
    src: {type: postgres, dsn_env: SOURCE_DSN}
    sink: {type: duckdb, path: unused.duckdb}
  pipelines:
    - {name: lagged, tenant: acme, type: cdc, source: {connection: src, tables: [public.t]},
       sink: {connection: sink, dataset: replica}}
"""


def test_slot_lag_rises_while_no_run_is_alive(
    source_db: str, state_dsn: str, store: StateStore, duckdb_path: Path, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_table(source_db)
    live = start_run(source_db, DuckDBSink(duckdb_path), store, "lagged")
    wait_until(lambda: streaming(live) and in_sink(lambda: duckdb_rows_in_process(duckdb_path), source_db)(), 30,
               "the run to stream")
    live.finish()  # no run is alive from here on

    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "defs.yaml").write_text(DEFS)
    monkeypatch.setenv("SOURCE_DSN", source_db)
    home = tmp_path / "api_home"
    home.mkdir()
    services = Services.build(Settings(dagster_home=home, state_dsn=state_dsn, defs_dir=defs, metrics_cache_seconds=0))
    registry, _ = build_registry(services)
    try:
        with TestClient(create_metrics_app(services, registry)) as metrics:

            def scrape() -> tuple[float | None, float | None]:
                text = metrics.get("/metrics").text
                return (_sample(text, "nilus_cdc_slot_unconfirmed_wal_bytes", tenant="acme", pipeline="lagged"),
                        _sample(text, "nilus_cdc_lag_seconds", tenant="acme", pipeline="lagged"))

            before, lag_before = scrape()
            assert before is not None and lag_before is not None
            with psycopg.connect(source_db, autocommit=True) as conn:
                conn.execute("INSERT INTO public.t SELECT g, repeat('x', 200) FROM generate_series(1000, 3000) g")
            time.sleep(0.5)
            after, lag_after = scrape()
            assert after is not None and after >= before + 400_000, (before, after)  # ~2000 rows of 200+ bytes
            assert lag_after is not None and lag_after > lag_before
    finally:
        services.close()
