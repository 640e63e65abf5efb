"""`type: mysql` connections: what validates, what is refused (with the fix), the DSN built at run time."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from nilus_dagster.spec.connections import MissingSecret
from nilus_dagster.spec.errors import PipelineSpecError, validate_spec
from nilus_dagster.spec.project import PipelinesSpec

SPEC: dict[str, Any] = {
    "connections": {
        "shop": {"type": "mysql", "host": "db.internal", "user": "nilus", "password_env": "SHOP_PASSWORD"},
        "warehouse": {"type": "duckdb", "path": "w.duckdb"},
    },
    "pipelines": [
        {
            "name": "orders",
            "tenant": "acme",
            "source": {"connection": "shop", "tables": [{"name": "shop.orders", "cursor": "updated_at"}]},
            "sink": {"connection": "warehouse", "dataset": "shop", "strategy": "merge"},
        }
    ],
}


def _spec(connection: dict[str, Any], **pipeline: Any) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["connections"]["shop"] = connection
    data["pipelines"][0].update(pipeline)
    return data


def test_mysql_connection_builds_its_dsn_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = validate_spec(PipelinesSpec, SPEC, "defs.yaml")
    shop = spec.connections["shop"]
    monkeypatch.delenv("SHOP_PASSWORD", raising=False)
    with pytest.raises(MissingSecret, match="environment variable SHOP_PASSWORD is not set"):
        shop.dsn("shop")  # type: ignore[union-attr]
    monkeypatch.setenv("SHOP_PASSWORD", "p@ss/word")
    assert shop.dsn("shop") == "mysql://nilus:p%40ss%2Fword@db.internal:3306/"  # type: ignore[union-attr]


def test_mysql_dsn_env_and_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _spec({"type": "mysql", "dsn_env": "SHOP_DSN", "ssl_mode": "verify_identity", "ssl_ca": "/ca.pem"})
    shop = validate_spec(PipelinesSpec, data, "defs.yaml").connections["shop"]
    monkeypatch.setenv("SHOP_DSN", "mysql://u:p@h:3307/shop")
    assert shop.dsn("shop") == "mysql://u:p@h:3307/shop?ssl_mode=verify_identity&ssl_ca=%2Fca.pem"  # type: ignore[union-attr]
    monkeypatch.setenv("SHOP_DSN", "postgresql://u@h/db")
    with pytest.raises(MissingSecret, match="SHOP_DSN must hold a mysql://user:password@host:port/database DSN"):
        shop.dsn("shop")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("connection", "pipeline", "expected"),
    [
        ({"type": "mysql", "user": "u"}, {}, "a mysql connection needs dsn_env (an environment variable holding"),
        ({"type": "mysql", "dsn_env": "D", "host": "h"}, {}, "give either dsn_env or host/user/password_env/database"),
        ({"type": "mysql", "host": "h", "user": "u", "password": "x"}, {},
         "connections.shop.password: unknown field 'password' (allowed fields: database, dsn_env, host, password_env, port"),
        ({"type": "mysql", "host": "h", "user": "u", "port": 0}, {}, "connections.shop.port = 0"),
        ({"type": "mysql", "host": "h", "user": "u", "ssl_mode": "on"}, {},
         "Input should be 'disabled', 'preferred', 'required', 'verify_ca' or 'verify_identity'"),
        ({"type": "mysql", "host": "h", "user": "u", "ssl_mode": "verify_ca"}, {},
         "ssl_mode verify_ca needs ssl_ca (the CA certificate file to verify with)"),
        ({"type": "mysql", "dsn_env": "D"}, {"type": "cdc", "cdc": {"slot_name": "s"}},
         "cdc.slot_name: a mysql source streams its binlog; it has no slot_name"),
    ],
)
def test_mysql_connection_errors(connection: dict[str, Any], pipeline: dict[str, Any], expected: str) -> None:
    if pipeline.get("type") == "cdc":
        pipeline["source"] = {"connection": "shop", "tables": ["shop.orders"]}
    with pytest.raises(PipelineSpecError) as raised:
        validate_spec(PipelinesSpec, _spec(connection, **pipeline), "defs.yaml")
    assert expected in str(raised.value)


def test_mysql_is_no_sink() -> None:
    data = _spec({"type": "mysql", "dsn_env": "D"})
    data["pipelines"][0]["sink"]["connection"] = "shop"
    with pytest.raises(PipelineSpecError, match="connection 'shop' is mysql; this needs one of duckdb, postgres"):
        validate_spec(PipelinesSpec, data, "defs.yaml")
