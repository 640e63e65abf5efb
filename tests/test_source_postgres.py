"""The PostgreSQL source against a real cluster: catalog, COPY reader, text codec."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from nilus_dagster.schema import ColumnType, TableName, arrow_schema
from nilus_dagster.sources.postgres import (
    ReadStats,
    SourceError,
    TableNotFound,
    ValueDecodeError,
    json_text_array_to_arrow,
    parse_array_literal,
    read_table,
    read_table_schema,
    replica_identity,
    table_size,
    text_to_arrow,
)

ALL_TYPES = TableName("public", "all_types")

ALL_TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN money2 AS numeric(10, 2);
CREATE TABLE all_types (
    id int NOT NULL,
    i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n38 numeric(38, 9), n_free numeric, n_domain money2,
    t text, vc varchar(20), ch char(3), b bool,
    d date, tm time, ts timestamp, tstz timestamptz, iv interval,
    js json, jsb jsonb, u uuid, raw bytea,
    ints int[], texts text[], m mood, moods mood[], stamps timestamptz[],
    PRIMARY KEY (id)
);
"""

ALL_TYPES_ROWS = [
    # Every column NULL but the key.
    "(1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    # Typical values; timestamptz written in a +05:30 zone.
    "(2, 1, 2, 3, 1.5, 2.25, 12345678901234567890123456789.123456789, 1.5, 12.34,"
    " 'hello', 'varchar', 'ab', true, '2024-02-29', '10:11:12.131415', '2024-01-02 03:04:05.678901',"
    " '2024-06-01 12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.5',"
    " '{\"a\": [1, 2]}', '{\"b\": null, \"a\": 1}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',"
    " '\\x00ff10'::bytea,"
    " '{1,NULL,3}', '{\"a b\",\"c,d\",\"e\\\"f\",NULL,\"NULL\",\"\",\"x\\\\y\",\"{}\"}', 'happy',"
    " '{sad,NULL}', '{\"2024-01-01 00:00:00-08\",NULL}')",
    # Extremes and empties; timestamptz written in a -08 zone.
    "(3, -32768, -2147483648, -9223372036854775808, 'NaN', '-Infinity',"
    " -99999999999999999999999999999.999999999, -123456789.000000001, -0.01,"
    " '', '', '', false, '0001-01-01', '00:00:00', '1970-01-01 00:00:00',"
    " '2024-03-10 02:30:00.5-08', '-1 days +02:03:00', '[]', '{}',"
    " '00000000-0000-0000-0000-000000000000', ''::bytea, '{}', '{}', 'sad', '{}', '{}')",
    # More: many-digit numerics, multi-line text, quotes, tz=UTC, large ints.
    "(4, 32767, 2147483647, 9223372036854775807, 'Infinity', 1e-300,"
    " 0.000000001, 99999999999999999999.999999999, 99999999.99,"
    " E'line1\\nline2, \"quoted\"', 'ünïcödé ✓', 'xyz', true, '9999-12-31', '23:59:59.999999',"
    " '9999-12-31 23:59:59.999999', '1999-12-31 23:59:59.999999+14', '-1 year -2 mons +3 days -04:05:06',"
    " 'null', '\"just a string\"', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '\\x000102fffe'::bytea,"
    " '{-1,0,2147483647}', '{NULL}', 'ok', '{happy,ok}', '{\"2024-01-01 00:00:00+00\"}')",
]


@pytest.fixture
def conn(source_db: str) -> Any:
    with psycopg.connect(source_db, autocommit=True) as connection:
        yield connection


@pytest.fixture
def all_types(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute(ALL_TYPES_DDL)
    conn.execute("INSERT INTO all_types VALUES " + ", ".join(ALL_TYPES_ROWS))
    return conn


def read_all(conn: psycopg.Connection, table: TableName, **kwargs: Any) -> pa.Table:
    schema = read_table_schema(conn, table)
    batches = list(read_table(conn, schema, **kwargs))
    for batch in batches:
        assert batch.schema == arrow_schema(schema)
    return pa.Table.from_batches(batches, schema=arrow_schema(schema))


# --- catalog -------------------------------------------------------------------------------------


def test_schema_maps_every_type(all_types: psycopg.Connection) -> None:
    schema = read_table_schema(all_types, ALL_TYPES)
    kinds = {c.name: c.type.describe() for c in schema.columns}
    assert kinds == {
        "id": "int32", "i2": "int16", "i4": "int32", "i8": "int64", "f4": "float32", "f8": "float64",
        "n38": "decimal(38,9)", "n_free": "decimal(None,None)", "n_domain": "decimal(10,2)",
        "t": "text", "vc": "text", "ch": "text", "b": "bool",
        "d": "date", "tm": "time", "ts": "timestamp", "tstz": "timestamptz", "iv": "interval",
        "js": "json", "jsb": "json", "u": "uuid", "raw": "bytes",
        "ints": "list<int32>", "texts": "list<text>", "m": "text", "moods": "list<text>",
        "stamps": "list<timestamptz>",
    }
    assert schema.column_names == list(kinds)  # attnum order
    assert schema.primary_key == ("id",)
    assert not schema.column("id").nullable and schema.column("t").nullable
    assert schema.column("n38").source_type == "numeric(38,9)"
    assert schema.column("vc").source_type == "character varying(20)"
    assert schema.column("m").source_type == "mood"


def test_schema_skips_dropped_columns_and_orders_composite_key(conn: psycopg.Connection) -> None:
    conn.execute("CREATE SCHEMA s")
    conn.execute("CREATE TABLE s.t (a int, gone int, b text NOT NULL, c date, PRIMARY KEY (c, a))")
    conn.execute("ALTER TABLE s.t DROP COLUMN gone")
    schema = read_table_schema(conn, TableName("s", "t"))
    assert schema.column_names == ["a", "b", "c"]
    assert schema.primary_key == ("c", "a")
    assert [c.nullable for c in schema.columns] == [False, False, False]


def test_missing_table_names_table_and_database(conn: psycopg.Connection) -> None:
    database = conn.info.dbname
    with pytest.raises(TableNotFound) as raised:
        read_table_schema(conn, TableName("public", "nope"))
    assert isinstance(raised.value, SourceError)
    assert "public.nope" in str(raised.value) and database in str(raised.value)
    with pytest.raises(TableNotFound):
        table_size(conn, TableName("public", "nope"))


def test_replica_identity(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE r (id int PRIMARY KEY)")
    assert replica_identity(conn, TableName("public", "r")) == "d"
    conn.execute("ALTER TABLE r REPLICA IDENTITY FULL")
    assert replica_identity(conn, TableName("public", "r")) == "f"


# --- reader: values ------------------------------------------------------------------------------


def _same(actual: Any, expected: Any, kind: str) -> bool:
    """Whether our Arrow value is psycopg's own Python value for the column."""
    if kind == "json" and actual is not None:  # psycopg parses json (JSON null too); we keep the text
        return json.loads(actual) == expected
    if expected is None or actual is None:
        return actual is expected
    if kind == "uuid":
        return actual == str(expected)
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    return actual == expected


def test_every_value_matches_psycopg(all_types: psycopg.Connection) -> None:
    schema = read_table_schema(all_types, ALL_TYPES)
    table = read_all(all_types, ALL_TYPES).sort_by("id")
    ours = table.to_pylist()
    # psycopg has no loader for mood[]: ask for text[] instead, which it does load.
    select = ", ".join(f"{name}::text[]" if name == "moods" else name for name in schema.column_names)
    theirs = all_types.execute(f"SELECT {select} FROM all_types ORDER BY id").fetchall()
    assert len(ours) == len(theirs) == len(ALL_TYPES_ROWS)
    for our_row, their_row in zip(ours, theirs, strict=True):
        for column, their_value in zip(schema.columns, their_row, strict=True):
            if column.type.kind == "interval":
                continue  # psycopg turns months into 30-day timedeltas; checked exactly below
            actual = our_row[column.name]
            assert _same(actual, their_value, column.type.kind), (our_row["id"], column.name, actual)


def test_values_that_need_care(all_types: psycopg.Connection) -> None:
    rows = {row["id"]: row for row in read_all(all_types, ALL_TYPES).to_pylist()}
    assert rows[2]["tstz"] == datetime(2024, 6, 1, 6, 30, tzinfo=UTC)
    assert rows[3]["tstz"] == datetime(2024, 3, 10, 10, 30, 0, 500000, tzinfo=UTC)
    assert rows[4]["tstz"] == datetime(1999, 12, 31, 9, 59, 59, 999999, tzinfo=UTC)
    assert rows[2]["stamps"] == [datetime(2024, 1, 1, 8, tzinfo=UTC), None]
    assert rows[2]["n38"] == Decimal("12345678901234567890123456789.123456789")
    assert rows[3]["n38"] == Decimal("-99999999999999999999999999999.999999999")
    assert rows[4]["n38"] == Decimal("0.000000001")
    assert rows[4]["n_free"] == Decimal("99999999999999999999.999999999")
    assert rows[2]["raw"] == b"\x00\xff\x10" and rows[3]["raw"] == b"" and rows[1]["raw"] is None
    assert rows[3]["t"] == "" and rows[1]["t"] is None  # '' is not NULL
    assert rows[4]["t"] == 'line1\nline2, "quoted"'
    assert rows[2]["texts"] == ["a b", "c,d", 'e"f', None, "NULL", "", "x\\y", "{}"]
    assert rows[3]["texts"] == [] and rows[4]["texts"] == [None] and rows[1]["texts"] is None
    assert rows[2]["ints"] == [1, None, 3]
    assert rows[2]["iv"] == pa.MonthDayNano([14, 3, (4 * 3600 + 5 * 60 + 6) * 10**9 + 500_000_000])
    assert rows[3]["iv"] == pa.MonthDayNano([0, -1, (2 * 3600 + 3 * 60) * 10**9])
    assert rows[4]["iv"] == pa.MonthDayNano([-14, 3, -(4 * 3600 + 5 * 60 + 6) * 10**9])
    assert rows[4]["js"] == "null" and rows[1]["js"] is None
    assert rows[2]["ch"] == "ab "


def test_single_column_nulls_are_not_skipped(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE one (v text)")
    conn.execute("INSERT INTO one VALUES (NULL), (''), ('x'), (NULL)")
    assert sorted(read_all(conn, TableName("public", "one")).column("v").to_pylist(), key=str) == [
        "", None, None, "x"
    ]


def _rows(table: pa.Table) -> str:
    return repr(table.sort_by("id").to_pylist())  # repr: NaN equals NaN


def test_reads_with_any_session_settings_and_restores_them(all_types: psycopg.Connection) -> None:
    expected = _rows(read_all(all_types, ALL_TYPES))
    odd = "SET TimeZone = 'America/New_York'; SET DateStyle = 'German'; SET bytea_output = 'escape';" \
          " SET IntervalStyle = 'sql_standard'; SET extra_float_digits = 0"
    all_types.execute(odd)
    assert _rows(read_all(all_types, ALL_TYPES)) == expected
    assert all_types.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
    assert all_types.execute("SHOW bytea_output").fetchone() == ("escape",)

    # Inside a snapshot transaction: settings are transaction-local and the transaction stays usable.
    with all_types.transaction():
        all_types.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert _rows(read_all(all_types, ALL_TYPES)) == expected
        assert all_types.execute("SHOW TimeZone").fetchone() == ("America/New_York",)
        assert all_types.execute("SELECT count(*) FROM all_types").fetchone() == (len(ALL_TYPES_ROWS),)


def test_snapshot_transaction_sees_snapshot_rows(source_db: str) -> None:
    with psycopg.connect(source_db, autocommit=True) as writer, psycopg.connect(source_db) as reader:
        writer.execute("CREATE TABLE snap (id int)")
        writer.execute("INSERT INTO snap SELECT generate_series(1, 10)")
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        schema = read_table_schema(reader, TableName("public", "snap"))  # takes the snapshot
        writer.execute("INSERT INTO snap SELECT generate_series(11, 20)")
        rows = sum(batch.num_rows for batch in read_table(reader, schema))
        assert rows == 10
        assert reader.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        reader.rollback()


# --- reader: shapes ------------------------------------------------------------------------------


def test_empty_table_yields_one_empty_batch(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE empty (id int PRIMARY KEY, tags text[], amount numeric(5,2))")
    schema = read_table_schema(conn, TableName("public", "empty"))
    stats = ReadStats()
    batches = list(read_table(conn, schema, stats=stats))
    assert len(batches) == 1 and batches[0].num_rows == 0
    assert batches[0].schema == arrow_schema(schema)
    assert stats.rows == 0


def test_large_table_streams_in_batches(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, name text, amount numeric(12,2))")
    conn.execute("INSERT INTO big SELECT g, 'name ' || g, g / 100.0 FROM generate_series(1, 100000) g")
    schema = read_table_schema(conn, TableName("public", "big"))
    stats = ReadStats()
    batches = list(read_table(conn, schema, batch_rows=30_000, stats=stats))
    assert len(batches) >= 4 and all(b.num_rows <= 30_000 for b in batches)
    table = pa.Table.from_batches(batches)
    assert table.num_rows == stats.rows == 100_000
    assert len(set(table.column("id").to_pylist())) == 100_000
    assert stats.bytes > 100_000 * 10 and stats.batches == len(batches)
    assert table.column("amount")[99_999].as_py() == Decimal("1000.00")


def test_rows_larger_than_a_block(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE wide (id int, doc text)")
    conn.execute("INSERT INTO wide VALUES (1, repeat('x', 9000000)), (2, 'small'), (3, repeat('y', 5000000))")
    table = read_all(conn, TableName("public", "wide")).sort_by("id")
    assert [len(v) for v in table.column("doc").to_pylist()] == [9_000_000, 5, 5_000_000]


def test_where_with_params(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE events (id int, updated_at timestamptz, kind text)")
    conn.execute("INSERT INTO events SELECT g, '2024-01-01'::timestamptz + g * interval '1 hour', "
                 "CASE WHEN g % 2 = 0 THEN 'even' ELSE 'odd' END FROM generate_series(1, 100) g")
    since = datetime(2024, 1, 3, tzinfo=UTC)  # after hour 48
    table = read_all(conn, TableName("public", "events"), where='"updated_at" > %s AND kind = %s',
                     params=(since, "even"))
    assert sorted(table.column("id").to_pylist()) == list(range(50, 101, 2))


def test_ctid_ranges_partition_the_table(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE parts (id int, pad text)")
    conn.execute("INSERT INTO parts SELECT g, repeat('p', 100) FROM generate_series(1, 20000) g")
    conn.execute("DELETE FROM parts WHERE id % 7 = 0")
    conn.execute("VACUUM ANALYZE parts")
    size = table_size(conn, TableName("public", "parts"))
    assert size.pages > 10
    assert 0.8 * 17143 < size.rows_estimate < 1.2 * 17143
    schema = read_table_schema(conn, TableName("public", "parts"))
    step = max(1, size.pages // 5)
    ids: list[int] = []
    for start in range(0, size.pages, step):
        for batch in read_table(conn, schema, ctid_range=(start, min(start + step, size.pages))):
            ids.extend(batch.column("id").to_pylist())
    assert len(ids) == len(set(ids)) == 20000 - 20000 // 7
    assert set(ids) == {i for i in range(1, 20001) if i % 7}


def test_table_size_of_a_never_analyzed_table(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE fresh (id int)")
    assert table_size(conn, TableName("public", "fresh")).pages == 0
    conn.execute("INSERT INTO fresh SELECT generate_series(1, 1000)")
    assert table_size(conn, TableName("public", "fresh")).pages >= 4


# --- reader: values that cannot be represented ---------------------------------------------------


def test_numeric_that_does_not_fit_names_the_column(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE amounts (id int, amount numeric)")
    conn.execute("INSERT INTO amounts VALUES (1, 1.5), (2, 1.1234567891)")  # 10 decimals > scale 9
    with pytest.raises(ValueDecodeError) as raised:
        read_all(conn, TableName("public", "amounts"))
    message = str(raised.value)
    assert "public.amounts.amount" in message and "1.1234567891" in message


def test_numeric_nan_and_too_many_digits_fail(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE nan_amounts (amount numeric)")
    conn.execute("INSERT INTO nan_amounts VALUES ('NaN')")
    with pytest.raises(ValueDecodeError, match="nan_amounts.amount.*NaN"):
        read_all(conn, TableName("public", "nan_amounts"))
    conn.execute("CREATE TABLE huge_amounts (amount numeric)")
    conn.execute("INSERT INTO huge_amounts VALUES (1e30)")
    with pytest.raises(ValueDecodeError, match="huge_amounts.amount"):
        read_all(conn, TableName("public", "huge_amounts"))


def test_wide_numeric_reads_as_decimal256(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE wide_numeric (amount numeric(50, 2))")
    big = "123456789012345678901234567890123456789012345678.12"
    conn.execute(f"INSERT INTO wide_numeric VALUES ({big}), (NULL)")
    column = read_all(conn, TableName("public", "wide_numeric")).column("amount")
    assert column.type == pa.decimal256(50, 2)
    assert column.to_pylist() == [Decimal(big), None]


@pytest.mark.parametrize(
    ("ddl", "value"),
    [("timestamptz", "'infinity'"), ("timestamp", "'-infinity'"), ("date", "'infinity'")],
)
def test_infinity_names_the_column(conn: psycopg.Connection, ddl: str, value: str) -> None:
    conn.execute(f"CREATE TABLE inf (id int, at {ddl})")
    conn.execute(f"INSERT INTO inf VALUES (1, now()), (2, {value})")
    with pytest.raises(ValueDecodeError, match=r"public\.inf\.at.*infinity"):
        read_all(conn, TableName("public", "inf"))


# --- text codec on PostgreSQL text output --------------------------------------------------------


def test_array_literals() -> None:
    assert parse_array_literal('{1,2,"a b",NULL}') == ["1", "2", "a b", None]
    assert parse_array_literal('{"a\\"b","c\\\\d","NULL",""}') == ['a"b', "c\\d", "NULL", ""]
    assert parse_array_literal("{}") == []
    assert parse_array_literal("[0:1]={7,8}") == ["7", "8"]
    assert parse_array_literal('{"x,y","{z}"}') == ["x,y", "{z}"]
    with pytest.raises(ValueDecodeError, match="multidimensional"):
        parse_array_literal("{{1,2},{3,4}}")


def test_text_arrays_to_lists() -> None:
    values = pa.array(['{1,NULL,3}', None, "{}"])
    assert text_to_arrow(values, ColumnType("list", element=ColumnType("int64"))).to_pylist() == [
        [1, None, 3], None, []
    ]
    values = pa.array(['{"a b","c,d","e\\"f",NULL}'])
    assert text_to_arrow(values, ColumnType("list", element=ColumnType("text"))).to_pylist() == [
        ["a b", "c,d", 'e"f', None]
    ]
    values = pa.array(['{t,f,NULL}'])
    assert text_to_arrow(values, ColumnType("list", element=ColumnType("bool"))).to_pylist() == [
        [True, False, None]
    ]


def test_json_arrays_to_lists() -> None:
    values = pa.array(['["1",null]', None, "[]", '["a,\\"b"]'])
    assert json_text_array_to_arrow(values, ColumnType("list", element=ColumnType("text"))).to_pylist() == [
        ["1", None], None, [], ['a,"b']
    ]
    decimals = ColumnType("list", element=ColumnType("decimal", 5, 2))
    numbers = json_text_array_to_arrow(pa.array(['["1.50"]']), decimals)
    assert numbers.to_pylist() == [[Decimal("1.50")]]


def test_bytea_hex_and_escape() -> None:
    values = pa.array(["\\x00ff0a", "\\x", None])
    assert text_to_arrow(values, ColumnType("bytes")).to_pylist() == [b"\x00\xff\n", b"", None]
    assert text_to_arrow(pa.array(["a\\000b\\\\"]), ColumnType("bytes")).to_pylist() == [b"a\x00b\\"]
    with pytest.raises(ValueDecodeError, match="col_b"):
        text_to_arrow(pa.array(["\\xzz"]), ColumnType("bytes"), column="col_b")


def test_timestamptz_offsets() -> None:
    values = pa.array([
        "2024-01-01 10:00:00.123+00", "2024-01-01 10:00:00+05:30", "2024-01-01 10:00:00-08", None,
    ])
    assert text_to_arrow(values, ColumnType("timestamptz")).to_pylist() == [
        datetime(2024, 1, 1, 10, 0, 0, 123000, tzinfo=UTC),
        datetime(2024, 1, 1, 4, 30, tzinfo=UTC),
        datetime(2024, 1, 1, 18, 0, tzinfo=UTC),
        None,
    ]
    lmt = text_to_arrow(pa.array(["1850-01-01 00:00:00+05:53:28"]), ColumnType("timestamptz"))
    local_mean_time = timezone(timedelta(hours=5, minutes=53, seconds=28))
    assert lmt.to_pylist() == [datetime(1850, 1, 1, tzinfo=local_mean_time)]
    assert lmt.type == pa.timestamp("us", tz="UTC")
    with pytest.raises(ValueDecodeError, match="created_at.*infinity"):
        text_to_arrow(pa.array(["infinity"]), ColumnType("timestamptz"), column="created_at")


def test_scalars() -> None:
    assert text_to_arrow(pa.array(["t", "f", None, "true"]), ColumnType("bool")).to_pylist() == [
        True, False, None, True
    ]
    with pytest.raises(ValueDecodeError, match="yes"):
        text_to_arrow(pa.array(["yes"]), ColumnType("bool"))
    assert text_to_arrow(pa.array(["10:00:00.5", None]), ColumnType("time")).to_pylist() == [
        time(10, 0, 0, 500000), None
    ]
    assert text_to_arrow(pa.array(["2024-02-29"]), ColumnType("date")).to_pylist() == [date(2024, 2, 29)]
    assert text_to_arrow(pa.array(["NaN", "-Infinity", "1.5"]), ColumnType("float64")).to_pylist()[1:] == [
        -math.inf, 1.5
    ]
    assert text_to_arrow(pa.array(["-1 days +02:03:00", "00:00:00"]), ColumnType("interval")).to_pylist() == [
        pa.MonthDayNano([0, -1, 7380 * 10**9]), pa.MonthDayNano([0, 0, 0])
    ]


def test_decimal_overflow_names_column_and_value() -> None:
    with pytest.raises(ValueDecodeError, match=r"price.*123\.456.*decimal\(5,2\)"):
        text_to_arrow(pa.array(["1.00", "123.456"]), ColumnType("decimal", 5, 2), column="price")
    with pytest.raises(ValueDecodeError, match="1234.00"):
        text_to_arrow(pa.array(["1234.00"]), ColumnType("decimal", 5, 2), column="price")


def test_server_error_mid_copy_is_raised_and_connection_stays_usable(conn: psycopg.Connection) -> None:
    conn.execute("CREATE TABLE ticks (id int)")
    conn.execute("INSERT INTO ticks SELECT generate_series(1, 50000)")
    schema = read_table_schema(conn, TableName("public", "ticks"))
    with pytest.raises(psycopg.errors.DivisionByZero):
        for _ in read_table(conn, schema, where="1 / (id - 40000) <> 7", batch_rows=1000):
            pass
    assert conn.execute("SELECT count(*) FROM ticks").fetchone() == (50000,)


def test_abandoned_read_leaves_the_connection_usable(conn: psycopg.Connection) -> None:
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    conn.execute("CREATE TABLE many (id int)")
    conn.execute("INSERT INTO many SELECT generate_series(1, 200000)")
    batches = read_table(conn, read_table_schema(conn, TableName("public", "many")), batch_rows=1000)
    assert next(batches).num_rows == 1000
    batches.close()
    assert conn.execute("SELECT count(*) FROM many").fetchone() == (200000,)
    assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
