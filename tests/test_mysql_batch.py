"""Batch pipelines from MySQL/MariaDB: Dagster job → the test's own MariaDB → DuckDB / PostgreSQL sink.

Every test compares the sink with the source row by row. The server's default time zone is +05:30
(see mariadb_server): TIMESTAMPs land right only because the reader pins its session to UTC.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job
from mysql_compare import as_float32, bit_bool, bit_decimal, bit_int, mysql_execute, mysql_rows, utc
from table_compare import assert_same_rows, duckdb_rows, postgres_sink_rows

EVERYTHING_DDL = """
CREATE TABLE everything (
    id bigint unsigned PRIMARY KEY,
    i8 tinyint, u8 tinyint unsigned, i16 smallint, u16 smallint unsigned, i24 mediumint, i32 int,
    u32 int unsigned, i64 bigint, f4 float, f8 double, n decimal(38, 10), ch char(3), vc varchar(50),
    tx text, j json, b1 bit(1), b9 bit(9), b64 bit(64), e enum('small', 'large', 'it''s'),
    s set('a', 'b', 'c'), bn binary(4), vb varbinary(10), bl blob, d date, dt6 datetime(6),
    ts6 timestamp(6) NULL, tm time(6), yr year, u uuid
)
"""
EVERYTHING_ROWS = """
INSERT INTO everything VALUES
 (18446744073709551615, -128, 255, -32768, 65535, -8388608, -2147483648, 4294967295,
  -9223372036854775808, 16777217, 3.141592653589793, 1234567890123456789012345678.0123456789, 'abc',
  'héllo wörld 😀🎉', 'multi\\nline\\ttext', '{"a": [1, 2, {"b": null}], "emoji": "🚀"}', b'1',
  b'100000001', b'1111111111111111111111111111111111111111111111111111111111111111', 'it''s', 'a,c',
  'ab\\0\\0', 0x00ff10, 0xdeadbeef, '9999-12-31', '2024-02-29 23:59:59.999999',
  '2038-01-19 03:14:07.999999', '838:59:59.000000', 2155, '123e4567-e89b-12d3-a456-426614174000'),
 (9223372036854775808, 127, 0, 32767, 0, 8388607, 2147483647, 0, 9223372036854775807, -1.5e38, -1e300,
  -9999999999999999999999999999.9999999999, '', '', '', '[]', b'0', b'0', b'0', 'small', '', '', '', '',
  '1000-01-01', '1000-01-01 00:00:00', '1970-01-01 00:00:01', '-838:59:59.000000', 1901,
  '00000000-0000-0000-0000-000000000000'),
 (1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '-00:00:00.000001', NULL, NULL)
"""
COLUMNS = ["id", "i8", "u8", "i16", "u16", "i24", "i32", "u32", "i64", "f4", "f8", "n", "ch", "vc", "tx", "j",
           "b1", "b9", "b64", "e", "s", "bn", "vb", "bl", "d", "dt6", "ts6", "tm", "yr", "u"]
EXPECT = {"id": Decimal, "b1": bit_bool, "b9": bit_int, "b64": bit_decimal, "f4": as_float32, "ts6": utc}


@pytest.fixture
def mysql_env(mysql_source_db: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Pipelines read SOURCE_DSN (the test's MariaDB database) and keep state in NILUS_STATE_DSN."""
    monkeypatch.setenv("SOURCE_DSN", mysql_source_db)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    return mysql_source_db


def _database(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def sink_rows(sink: SinkTarget, table: str, columns: list[str], order_by: str = "id") -> list[tuple]:
    reader = duckdb_rows if sink.kind == "duckdb" else postgres_sink_rows
    return reader(sink.location, table, columns, order_by)


def _run(sink: SinkTarget, instance: dg.DagsterInstance, *pipelines: dict) -> dg.ExecuteInProcessResult:
    defs = project(sink, *pipelines, source_type="mysql")
    return run_job(defs, f"acme__{pipelines[0]['name']}", instance)


def test_every_type_lands_exactly(mysql_env: str, sql_sink: SinkTarget, instance: dg.DagsterInstance) -> None:
    mysql_execute(mysql_env, EVERYTHING_DDL, EVERYTHING_ROWS)
    result = _run(sql_sink, instance, pipeline("types", [f"{_database(mysql_env)}.everything"]))
    assert result.success, failure_message(result)
    expected = mysql_rows(mysql_env, "everything", COLUMNS, "id", EXPECT, floats=("f4",))
    f4 = COLUMNS.index("f4")  # PostgreSQL prints a real's shortest text, psycopg reads it as a double
    landed = [(*row[:f4], None if row[f4] is None else as_float32(row[f4]), *row[f4 + 1:])
              for row in sink_rows(sql_sink, "analytics.everything", COLUMNS)]
    assert_same_rows(expected, landed)
    first = dict(zip(COLUMNS, landed[2], strict=True))  # id 2^64-1
    assert first["id"] == Decimal("18446744073709551615")
    assert first["ts6"] == dt.datetime(2038, 1, 19, 3, 14, 7, 999999, tzinfo=dt.UTC)  # UTC, not +05:30
    assert first["dt6"] == dt.datetime(2024, 2, 29, 23, 59, 59, 999999)  # DATETIME stays a wall clock
    assert first["tm"] == dt.timedelta(hours=838, minutes=59, seconds=59)
    assert first["vc"] == "héllo wörld 😀🎉"
    assert first["f4"] == 16777216.0  # the float32 stored, not the 6-digit text MariaDB prints (16777200)
    materialization = result.asset_materializations_for_node(f"acme__types__{_database(mysql_env)}__everything")[0]
    assert materialization.metadata["rows"].value == 3


def test_assets_show_the_mysql_source(mysql_env: str, duckdb_sink: SinkTarget) -> None:
    defs = project(duckdb_sink, pipeline("shop", ["shop.orders"]), source_type="mysql")
    key = dg.AssetKey(["acme", "shop", "shop", "orders"])
    spec = defs.resolve_assets_def(key).specs_by_key[key]
    assert set(spec.kinds) == {"mysql", "duckdb"}
    source = defs.resolve_asset_graph().get(dg.AssetKey(["acme", "sources", "src", "shop", "orders"]))
    assert "in the MySQL connection src" in (source.description or "")


def test_incremental_merge_loads_only_new_rows(
    mysql_env: str, sql_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    mysql_execute(
        mysql_env,
        "CREATE TABLE orders (id bigint unsigned PRIMARY KEY, amount decimal(12, 2), updated_at datetime(6) NOT NULL)",
        "INSERT INTO orders VALUES (1, 10.50, '2024-01-01 00:00:00'), (18446744073709551614, 20.00, "
        "'2024-01-01 00:00:00.000001')",
    )
    table = {"name": f"{_database(mysql_env)}.orders", "cursor": "updated_at"}
    columns = ["id", "amount", "updated_at"]
    first = _run(sql_sink, instance, pipeline("orders", [table]))
    assert first.success, failure_message(first)
    mysql_execute(
        mysql_env,
        "UPDATE orders SET amount = 11.00, updated_at = '2024-01-02 00:00:00' WHERE id = 1",
        "INSERT INTO orders VALUES (18446744073709551615, 30.00, '2024-01-03 00:00:00')",
    )
    second = _run(sql_sink, instance, pipeline("orders", [table]))
    assert second.success, failure_message(second)
    node = f"acme__orders__{_database(mysql_env)}__orders"
    metadata = second.asset_materializations_for_node(node)[0].metadata
    assert metadata["rows"].value == 2  # the updated row and the new one, not the unchanged one
    assert metadata["previous_high_water_mark"].value == "2024-01-01 00:00:00.000001"
    assert metadata["high_water_mark"].value == "2024-01-03 00:00:00.000000"
    assert_same_rows(mysql_rows(mysql_env, "orders", columns, "id", {"id": Decimal}),
                     sink_rows(sql_sink, "analytics.orders", columns))
    third = _run(sql_sink, instance, pipeline("orders", [table]))
    assert third.asset_materializations_for_node(node)[0].metadata["rows"].value == 0


def test_append_by_unsigned_id_cursor_and_replace(
    mysql_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    mysql_execute(
        mysql_env,
        "CREATE TABLE events (id bigint unsigned PRIMARY KEY, kind enum('a', 'b'))",
        "INSERT INTO events VALUES (9223372036854775807, 'a'), (9223372036854775808, 'b')",
    )
    events = {"name": f"{_database(mysql_env)}.events", "cursor": "id"}
    assert _run(duckdb_sink, instance, pipeline("events", [events], strategy="append")).success
    mysql_execute(mysql_env, "INSERT INTO events VALUES (18446744073709551615, 'a')")
    assert _run(duckdb_sink, instance, pipeline("events", [events], strategy="append")).success
    assert_same_rows(mysql_rows(mysql_env, "events", ["id", "kind"], "id", {"id": Decimal}),
                     sink_rows(duckdb_sink, "analytics.events", ["id", "kind"]))
    # replace: a full reload each run, the sink table ends equal to the source
    mysql_execute(mysql_env, "DELETE FROM events WHERE kind = 'b'")
    replace = pipeline("snapshot", [f"{_database(mysql_env)}.events"], strategy="replace")
    for _ in range(2):
        assert _run(duckdb_sink, instance, replace).success
    assert_same_rows(mysql_rows(mysql_env, "events", ["id", "kind"], "id", {"id": Decimal}),
                     sink_rows(duckdb_sink, "analytics.events", ["id", "kind"]))


def test_decimal_65_30_is_exact_in_postgres_and_refused_by_duckdb_naming_the_column(
    mysql_env: str, sink_pg: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batch_project import sink_target

    mysql_execute(
        mysql_env,
        "CREATE TABLE wide (id int PRIMARY KEY, huge decimal(65, 30))",
        "INSERT INTO wide VALUES (1, '99999999999999999999999999999999999.999999999999999999999999999999'), "
        "(2, '-0.000000000000000000000000000001'), (3, NULL)",
    )
    tables = [f"{_database(mysql_env)}.wide"]
    refused = _run(duckdb_sink, instance, pipeline("wide", tables))
    assert not refused.success
    assert "column 'huge'" in failure_message(refused) and "decimal(65,30)" in failure_message(refused)
    assert not Path(duckdb_sink.location).exists()  # refused before the sink was even opened
    postgres = sink_target("postgres", duckdb_sink.location, sink_pg, monkeypatch)  # type: ignore[arg-type]
    result = _run(postgres, instance, pipeline("wide", tables))
    assert result.success, failure_message(result)
    assert_same_rows(mysql_rows(mysql_env, "wide", ["id", "huge"], "id"),
                     sink_rows(postgres, "analytics.wide", ["id", "huge"]))


def test_zero_dates_are_refused_naming_the_column_and_the_fix(
    mysql_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    mysql_execute(
        mysql_env,
        "SET SESSION sql_mode = ''",
        "CREATE TABLE legacy (id int PRIMARY KEY, born datetime)",
        "INSERT INTO legacy VALUES (1, '2024-01-01 00:00:00'), (2, '0000-00-00 00:00:00')",
    )
    result = _run(duckdb_sink, instance, pipeline("legacy", [f"{_database(mysql_env)}.legacy"]))
    assert not result.success
    message = failure_message(result)
    assert "legacy.born (datetime) holds the zero or partial date '0000-00-00 00:00:00'" in message
    assert "SET `born` = NULL" in message
    assert sink_rows(duckdb_sink, "analytics.legacy", ["id"]) == []  # nothing half-written


def test_setup_errors_say_the_fix(
    mysql_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = _database(mysql_env)
    mysql_execute(mysql_env, "CREATE TABLE nokey (a int, b text)")
    missing = _run(duckdb_sink, instance, pipeline("missing", [f"{database}.nowhere"]))
    assert f"table {database}.nowhere does not exist" in failure_message(missing)
    assert f"GRANT SELECT ON `{database}`.*" in failure_message(missing)
    nokey = _run(duckdb_sink, instance, pipeline("nokey", [f"{database}.nokey"]))
    assert "has no primary key, so strategy merge cannot match rows: declare primary_key" in failure_message(nokey)
    monkeypatch.setenv("SOURCE_DSN", mysql_env.replace(":nilus-test@", ":wrong-secret@"))
    denied = failure_message(_run(duckdb_sink, instance, pipeline("denied", [f"{database}.nokey"])))
    assert "connection 'src': cannot connect to MySQL: (1045)" in denied
    assert "check the user and the password" in denied and "wrong-secret" not in denied


def test_new_source_column_is_added_and_a_widened_type_follows(
    mysql_env: str, duckdb_sink: SinkTarget, instance: dg.DagsterInstance
) -> None:
    database = _database(mysql_env)
    mysql_execute(mysql_env, "CREATE TABLE people (id int PRIMARY KEY, name varchar(20), score smallint)",
                  "INSERT INTO people VALUES (1, 'ann', 7)")
    assert _run(duckdb_sink, instance, pipeline("people", [f"{database}.people"])).success
    mysql_execute(mysql_env, "ALTER TABLE people ADD COLUMN email varchar(50), MODIFY score int",
                  "INSERT INTO people VALUES (2, 'bob', 100000, 'bob@example.com')")
    result = _run(duckdb_sink, instance, pipeline("people", [f"{database}.people"]))
    assert result.success, failure_message(result)
    metadata = result.asset_materializations_for_node(f"acme__people__{database}__people")[0].metadata
    assert metadata["schema_change"].value == "+email text, ~score int16 -> int32"
    columns = ["id", "name", "score", "email"]
    assert_same_rows(mysql_rows(mysql_env, "people", columns, "id"), sink_rows(duckdb_sink, "analytics.people", columns))
