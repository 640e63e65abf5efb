"""PostgresSink against a real PostgreSQL 16 database: the shared sink contract plus COPY details."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.adapt import Loader
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from sink_cases import TARGET, SinkContract, SinkHarness, col

from nilus_dagster.schema import ColumnType
from nilus_dagster.sinks import SinkTable
from nilus_dagster.sinks.postgres import PostgresSink, describe_dsn

_ISO_INTERVAL = re.compile(
    r"P(?:(?P<y>-?\d+)Y)?(?:(?P<mo>-?\d+)M)?(?:(?P<d>-?\d+)D)?"
    r"(?:T(?:(?P<h>-?\d+)H)?(?:(?P<mi>-?\d+)M)?(?:(?P<s>-?[\d.]+)S)?)?$"
)


class ExactIntervalLoader(Loader):
    """interval (intervalstyle iso_8601) → (months, days, microseconds), unlike lossy timedelta."""

    def load(self, data: bytes) -> tuple[int, int, int]:
        match = _ISO_INTERVAL.match(bytes(data).decode())
        assert match, data
        part = {k: Decimal(v or 0) for k, v in match.groupdict().items()}
        micros = (part["h"] * 3600 + part["mi"] * 60 + part["s"]) * 1_000_000
        return int(part["y"] * 12 + part["mo"]), int(part["d"]), int(micros)


def fetch_postgres(dsn: str, target: SinkTable, order_by: str) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        conn.execute("SET intervalstyle = 'iso_8601'")
        conn.adapters.register_loader("interval", ExactIntervalLoader)
        set_json_loads(bytes.decode, conn)  # JSON text, parsed by `canonical` like DuckDB's
        query = f'SELECT * FROM "{target.dataset}"."{target.name}" ORDER BY "{order_by}"'
        return conn.execute(query).fetchall()


class TestPostgresSink(SinkContract):
    @pytest.fixture
    def harness(self, sink_pg: str) -> SinkHarness:
        return SinkHarness(
            make=lambda: PostgresSink(sink_pg),
            fetch=lambda target, order_by: fetch_postgres(sink_pg, target, order_by),
            unsupported=col("matrix", "list", element=ColumnType("list", element=ColumnType("int32"))),
            unreachable=lambda: PostgresSink("postgresql://nilus:s3cret@127.0.0.1:1/warehouse"),
        )

    def test_column_types_in_the_catalog(self, sink_pg: str) -> None:
        from sink_cases import ALL_TYPES

        PostgresSink(sink_pg).prepare_table(TARGET, ALL_TYPES, cdc=True)
        with psycopg.connect(sink_pg) as conn:
            types = dict(
                conn.execute(
                    "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                    "WHERE attrelid = 'analytics.orders'::regclass AND attnum > 0"
                ).fetchall()
            )
        assert types["amount"] == "numeric(38,9)"
        assert types["doc"] == "jsonb" and types["ref"] == "uuid" and types["blob"] == "bytea"
        assert types["utc_ts"] == "timestamp with time zone"
        assert types["amounts"] == "numeric(12,3)[]" and types["blobs"] == "bytea[]"
        assert types["_nilus_lsn"] == "bigint" and types["_nilus_deleted"] == "boolean"


def test_describe_dsn_hides_the_password() -> None:
    assert describe_dsn("postgresql://u:pw@db.example:5433/wh") == "u@db.example:5433/wh"
    assert describe_dsn("host=db user=u password=pw dbname=wh") == "u@db/wh"
