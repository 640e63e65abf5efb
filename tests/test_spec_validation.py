"""Pipeline YAML validation: good declarations load; each bad one names file, field and fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from nilus_dagster.spec.errors import PipelineSpecError, validate_spec
from nilus_dagster.spec.loading import load_declared_pipelines, load_spec_file
from nilus_dagster.spec.project import PipelinesSpec

REPO = Path(__file__).resolve().parents[1]

GOOD: dict[str, Any] = {
    "connections": {
        "shop": {"type": "postgres", "dsn_env": "SHOP_DSN"},
        "warehouse": {"type": "duckdb", "path": "w.duckdb"},
        "bq": {"type": "bigquery", "project": "p", "location": "EU", "credentials_env": "GOOGLE_KEY"},
    },
    "pipelines": [
        {
            "name": "orders",
            "tenant": "acme",
            "labels": {"team": "sales"},
            "source": {"connection": "shop", "tables": ["public.orders", {"name": "public.items", "cursor": "id"}]},
            "sink": {"connection": "warehouse", "dataset": "acme"},
            "schedule": "*/5 * * * *",
        }
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """GOOD with one field (dotted path, list indexes as numbers) set to `value`."""
    data = copy.deepcopy(GOOD)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def test_good_declaration_resolves_defaults() -> None:
    spec = validate_spec(PipelinesSpec, GOOD, "defs.yaml")
    pipeline = spec.pipelines[0]
    assert pipeline.effective_resource_id == "nilus:v1:orders:acme"
    assert pipeline.type == "batch"
    assert pipeline.sink.strategy == "merge"
    assert pipeline.schema_changes == "evolve"
    assert pipeline.on_error == "dlq"
    assert [t.name for t in pipeline.source.tables] == ["public.orders", "public.items"]
    assert pipeline.source.tables[1].cursor == "id"
    assert spec.state_store.dsn_env == "NILUS_STATE_DSN"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "pipelines.0.sink.connection",
            "nowhere",
            "pipelines[0] (orders).sink.connection: unknown connection 'nowhere' (declared connections: bq, shop, warehouse)",
        ),
        ("pipelines.0.source.connection", "warehouse", "connection 'warehouse' is duckdb; a batch pipeline's source needs one of postgres, mysql"),
        (
            "pipelines.0.schedule",
            "every hour",
            "pipelines[0].schedule = 'every hour': 'every hour' is not a cron expression",
        ),
        (
            "pipelines.0.source.tables",
            ["orders"],
            "pipelines[0].source.tables[0].name = 'orders': 'orders' is not a table name: write it as schema.table",
        ),
        ("pipelines.0.source.tables", ["public.orders;drop"], "is not a table name"),
        (
            "pipelines.0.sink.strategy",
            "upsert",
            "pipelines[0].sink.strategy = 'upsert': Input should be 'merge', 'append' or 'replace'",
        ),
        ("pipelines.0.schema_changes", "ignore", "Input should be 'evolve', 'pause' or 'fail'"),
        ("pipelines.0.on_error", "skip", "pipelines[0].on_error = 'skip': Input should be 'dlq', 'pause_table' or 'fail'"),
        ("pipelines.0.type", "stream", "pipelines[0].type = 'stream': Input should be 'batch' or 'cdc'"),
        ("pipelines.0.name", "1orders", "pipeline name '1orders' is not valid: use letters, digits and underscores"),
        ("pipelines.0.tenant", "ac me", "tenant 'ac me' is not valid"),
        ("pipelines.0.colour", "red", "pipelines[0].colour: unknown field 'colour' (allowed fields: cdc, checks, description"),
        ("connections.shop.password", "hunter2", "secrets are never written in YAML"),
        ("connections.shop.type", "oracle", "connections.shop"),
        ("connections.warehouse.path", ":memory:", "a DuckDB sink needs a file path"),
        ("pipelines.0.source.tables", [], "pipelines[0].source.tables: List should have at least 1 item"),
        ("pipelines.0.source.tables", [{"name": "public.orders", "primary_key": []}], "strategy merge needs a key"),
        ("pipelines.0.sink.table_options", {"clustering": ["id"]}, "only BigQuery sinks take table_options"),
        ("pipelines.0.checks", {"max_lag": "5 minutes"}, "'5 minutes' is not a duration: use a number and s, m or h"),
        ("pipelines.0.checks", {"severity": "fatal"}, "Input should be 'warn' or 'error'"),
        (
            "pipelines.0.schedule_timezone",
            "Mars/Olympus",
            "pipelines[0].schedule_timezone = 'Mars/Olympus': 'Mars/Olympus' is not a time zone: use an IANA name",
        ),
        ("connections.shop", {"type": "postgres", "host": "db", "database": "d", "sslmode": "requird"}, "sslmode"),
        ("pipelines.0.cdc", {"soft_delete": True}, "cdc only apply to cdc pipelines: remove them, or set type: cdc"),
        ("pipelines.0.checks", {"max_lag": "5m", "severity": "error"}, "checks.max_lag only apply to cdc pipelines"),
        ("connections.shop", {"type": "postgres", "host": "db", "database": "d", "port": 0}, "connections.shop.port"),
    ],
)
def test_bad_field_names_file_field_value_and_fix(path: str, value: Any, expected: str) -> None:
    with pytest.raises(PipelineSpecError) as raised:
        validate_spec(PipelinesSpec, _with(path, value), "pipelines/shop/defs.yaml")
    message = str(raised.value)
    assert message.startswith("Invalid nilus pipeline declaration in pipelines/shop/defs.yaml:")
    assert expected in message


def test_duplicate_pipeline_name_in_a_tenant() -> None:
    data = copy.deepcopy(GOOD)
    data["pipelines"].append(copy.deepcopy(data["pipelines"][0]))
    with pytest.raises(PipelineSpecError, match=r"pipeline name 'orders' is used twice in tenant 'acme'"):
        validate_spec(PipelinesSpec, data, "defs.yaml")
    data["pipelines"][1]["tenant"] = "globex"
    data["pipelines"][1]["sink"]["dataset"] = "globex"
    validate_spec(PipelinesSpec, data, "defs.yaml")  # same name, other tenant: fine


def test_mode_specific_rules() -> None:
    cdc_with_schedule = _with("pipelines.0.type", "cdc")
    with pytest.raises(PipelineSpecError, match="a cdc pipeline runs continuously: remove 'schedule'"):
        validate_spec(PipelinesSpec, cdc_with_schedule, "defs.yaml")
    replace_with_cursor = _with("pipelines.0.sink.strategy", "replace")
    with pytest.raises(PipelineSpecError, match="strategy replace reloads whole tables"):
        validate_spec(PipelinesSpec, replace_with_cursor, "defs.yaml")


def test_two_tables_into_one_sink_table_need_a_rename() -> None:
    data = _with("pipelines.0.source.tables", ["public.orders", "archive.orders"])
    with pytest.raises(PipelineSpecError, match="give one of them a sink_table"):
        validate_spec(PipelinesSpec, data, "defs.yaml")
    data = _with("pipelines.0.source.tables", ["public.orders", {"name": "archive.orders", "sink_table": "old_orders"}])
    validate_spec(PipelinesSpec, data, "defs.yaml")


def test_two_pipelines_into_one_sink_table_are_refused() -> None:
    data = copy.deepcopy(GOOD)
    other = {**copy.deepcopy(data["pipelines"][0]), "name": "orders_full", "schedule": None}
    other["source"] = {"connection": "shop", "tables": ["public.orders"]}
    data["pipelines"].append(other)
    with pytest.raises(PipelineSpecError, match=r"pipelines\[1\] \(orders_full\): public.orders would land in "
                       r"acme.orders of connection 'warehouse', which pipelines\[0\] \(orders\) \(public.orders\)"):
        validate_spec(PipelinesSpec, data, "defs.yaml")
    other["sink"] = {**other["sink"], "dataset": "acme_full"}
    validate_spec(PipelinesSpec, data, "defs.yaml")


def test_every_problem_is_listed_at_once() -> None:
    data = _with("pipelines.0.schedule", "nope")
    data["pipelines"][0]["sink"]["strategy"] = "upsert"
    with pytest.raises(PipelineSpecError) as raised:
        validate_spec(PipelinesSpec, data, "defs.yaml")
    assert len(raised.value.problems) == 2


def test_example_project_declarations_load() -> None:
    declared = load_declared_pipelines(REPO / "pipelines")
    assert {(d.pipeline.tenant, d.pipeline.name) for d in declared} >= {("acme", "orders"), ("globex", "events")}


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "defs.yaml"
    path.write_text("type: nilus_dagster.components.NilusPipelines\nattributes: [unclosed\n")
    with pytest.raises(PipelineSpecError, match=f"{path}:\n  - not valid YAML"):
        load_spec_file(path)


def test_secret_dsn_is_read_at_run_time_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from nilus_dagster.spec.connections import MissingSecret

    spec = validate_spec(PipelinesSpec, GOOD, "defs.yaml")
    source = spec.connections["shop"]
    monkeypatch.delenv("SHOP_DSN", raising=False)
    with pytest.raises(MissingSecret, match="connection 'shop': environment variable SHOP_DSN is not set"):
        source.dsn("shop")  # type: ignore[union-attr]
    monkeypatch.setenv("SHOP_DSN", "postgresql://u@h/db")
    assert source.dsn("shop") == "postgresql://u@h/db"  # type: ignore[union-attr]


def test_yaml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "defs.yaml"
    path.write_text(yaml.safe_dump({"type": "nilus_dagster.components.NilusPipelines", "attributes": GOOD}))
    (spec,) = load_spec_file(path)
    assert spec.pipelines[0].name == "orders"
