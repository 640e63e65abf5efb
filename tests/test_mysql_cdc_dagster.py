"""A MariaDB CDC pipeline declared in the documented YAML becomes Dagster assets, a job and a
keep-alive sensor; its runs snapshot and then stream, and the sink equals the source row by row."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml
from batch_project import failure_message
from cdc_project import run_until_caught_up
from mysql_cdc_harness import assert_replica_matches, database, execute

from nilus_dagster.components.definitions import build_definitions
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec

PROJECT = """
connections:
  shop: {type: mysql, dsn_env: SHOP_MYSQL_DSN}
  warehouse: {type: duckdb, path: "{path}"}
pipelines:
  - name: orders_live
    tenant: acme
    type: cdc
    source: {connection: shop, tables: ["{db}.orders"]}
    sink: {connection: warehouse, dataset: replica}
    schema_changes: fail
    cdc:
      snapshot: initial
      batch_max_ms: 100
"""
COLUMNS = ["id", "status", "amount", "placed_at"]


@pytest.fixture
def source(mysql_source_db: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    execute(
        mysql_source_db,
        "SET GLOBAL binlog_row_metadata = 'FULL'",
        "CREATE TABLE orders (id BIGINT UNSIGNED PRIMARY KEY, status ENUM('new','paid','sent') NOT NULL, "
        "amount DECIMAL(12,2), placed_at TIMESTAMP(3) NULL)",
        "INSERT INTO orders SELECT seq, 'new', seq * 1.25, '2024-01-01' + INTERVAL seq MINUTE FROM seq_1_to_100",
    )
    monkeypatch.setenv("SHOP_MYSQL_DSN", mysql_source_db)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    return mysql_source_db


def test_yaml_pipeline_becomes_assets_and_streams(source: str, duckdb_path: Path, instance: dg.DagsterInstance) -> None:
    text = PROJECT.replace("{path}", str(duckdb_path)).replace("{db}", database(source))
    defs = build_definitions(validate_spec(PipelinesSpec, yaml.safe_load(text), "defs.yaml"))
    job = defs.resolve_job_def("acme__orders_live")
    table_key = dg.AssetKey(["acme", "orders_live", database(source), "orders"])
    assert table_key in job.asset_layer.executable_asset_keys
    assert defs.resolve_sensor_def("acme__orders_live__keep_alive") is not None
    kinds = {"placed_at": "timestamptz"}

    first = run_until_caught_up(defs, "acme__orders_live", instance)
    assert first.success, failure_message(first)
    assert_replica_matches(source, duckdb_path, "orders", COLUMNS, "id", kinds)
    materialized = {e.asset_key for e in first.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert table_key in materialized

    execute(source, "UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id % 3 = 0",
            "DELETE FROM orders WHERE id > 90", "INSERT INTO orders VALUES (18446744073709551615, 'sent', NULL, NULL)")
    second = run_until_caught_up(defs, "acme__orders_live", instance)
    assert second.success, failure_message(second)
    assert_replica_matches(source, duckdb_path, "orders", COLUMNS, "id", kinds)
