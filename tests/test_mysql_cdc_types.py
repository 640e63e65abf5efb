"""Every MariaDB column type through binlog CDC, snapshot and stream alike, compared row by row
with the source (read by PyMySQL in UTC), extremes included."""

from __future__ import annotations

from pathlib import Path

import pytest
from mysql_cdc_harness import assert_replica_matches, engine_config, execute, run_engine

COLUMNS = {  # name → MariaDB type
    "ti": "TINYINT", "tu": "TINYINT UNSIGNED", "si": "SMALLINT", "su": "SMALLINT UNSIGNED",
    "mi": "MEDIUMINT", "mu": "MEDIUMINT UNSIGNED", "i": "INT", "iu": "INT UNSIGNED",
    "bi": "BIGINT", "bu": "BIGINT UNSIGNED", "d": "DECIMAL(38,10)", "dm": "DECIMAL(10,2)",
    "f": "FLOAT", "db": "DOUBLE", "dt": "DATETIME(6)", "dt0": "DATETIME", "ts": "TIMESTAMP(6) NULL",
    "dd": "DATE", "tm": "TIME(6)", "yr": "YEAR", "c": "CHAR(5)", "vc": "VARCHAR(50)", "tx": "TEXT",
    "e": "ENUM('a','b','c')", "st": "SET('x','y','z')", "j": "JSON", "bn": "BINARY(4)",
    "vb": "VARBINARY(10)", "bl": "BLOB", "b1": "BIT(1)", "b10": "BIT(10)", "b64": "BIT(64)",
    "lat": "VARCHAR(10) CHARACTER SET latin1", "tm1": "TIME(1)", "tm2": "TIME(2)", "tm3": "TIME(3)", "tm4": "TIME(4)",
    "tm5": "TIME(5)",
}
SHORT_TIMES = {  # the fraction sizes of TIME(1..5): 1, 1, 2, 2 and 3 bytes; negative ones stored reversed
    1: ", '-00:00:00.1', '-00:00:00.01', '-00:00:00.001', '-00:00:00.0001', '-00:00:00.00001'",
    2: ", '-838:59:58.9', '-12:00:00.99', '-00:00:01.999', '-00:00:00.9999', '-00:00:00.99999'",
    4: ", '00:00:00.1', '838:59:58.99', '23:59:59.999', '00:00:00.0001', '-01:02:03.45678'",
}
KINDS = {"ts": "timestamptz", "b1": "bit1", "b10": "bit", "b64": "bit"}
_ROWS = [
    "(1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295, -9223372036854775808, "
    "18446744073709551615, 1234567890123456789012345678.0123456789, -99999999.99, 1.5, -2.5e300, "
    "'9999-12-31 23:59:59.999999', '1000-01-01 00:00:00', '2038-01-19 03:14:07.999999', '1000-01-01', "
    "'838:59:59.000000', 2155, 'ab', 'héllo 😀', REPEAT('long ', 2000), 'c', 'x,z', '{\"a\": [1, 2.5, \"x\"]}', "
    "x'00ff', x'', x'0102', b'1', b'1010101010', b'1111111111111111111111111111111111111111111111111111111111111111',"
    " 'café')",
    "(2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0, -0.0000000001, 0, -0.25, 0, "
    "'1970-01-01 00:00:00', '2024-02-29 12:00:00', '1970-01-01 00:00:01', '2024-02-29', '-838:59:58.999999', "
    "1901, '', '', '', 'a', '', '[]', x'01', x'00', x'', b'0', b'0', b'0', '')",
    "(3" + ", NULL" * len(COLUMNS) + ")",
    "(4, 0, 1, 0, 1, 0, 1, 0, 1, 0, 9223372036854775808, 1, 1, 0, 1, '2024-06-01 00:00:00.5', "
    "'2024-06-01 00:00:00', '2024-06-01 00:00:00.5', '2024-06-01', '-12:34:56.000001', 0, 'x  ', ' y ', 'z', 'b', "
    "'y', '{\"k\": null}', x'61626300', x'ff', x'ff', b'1', b'1', b'1000000000000000000000000000000000000000000000000000000000000000', 'ñ')",
]
ROWS = [row[:-1] + SHORT_TIMES[number] + ")" if number in SHORT_TIMES else row for number, row in enumerate(_ROWS, 1)]


@pytest.fixture
def source(mysql_source_db: str) -> str:
    columns = ", ".join(f"`{name}` {kind}" for name, kind in COLUMNS.items())
    execute(
        mysql_source_db,
        "SET GLOBAL binlog_row_metadata = 'FULL'",
        f"CREATE TABLE everything (id INT PRIMARY KEY, {columns})",
        f"INSERT INTO everything VALUES {', '.join(ROWS)}",
    )
    return mysql_source_db


def test_every_type_snapshot_and_stream(source: str, duckdb_path: Path, state_dsn: str) -> None:
    columns = ["id", *COLUMNS]
    config = engine_config(source, ["everything"])
    assert run_engine(config, duckdb_path, state_dsn).snapshot_rows == len(ROWS)
    assert_replica_matches(source, duckdb_path, "everything", columns, "id", KINDS)

    names = ", ".join(f"`{c}`" for c in COLUMNS)
    execute(
        source,
        f"INSERT INTO everything (id, {names}) SELECT id + 100, {names} FROM everything",  # the stream's copies
        "UPDATE everything SET id = id + 1000, tx = CONCAT(tx, '!') WHERE id = 102",  # key change, whole row moved
        "DELETE FROM everything WHERE id = 103",
        "UPDATE everything SET vc = 'changed', st = 'z,x,y', b10 = b'11' WHERE id = 101",
    )
    result = run_engine(config, duckdb_path, state_dsn)
    assert result.stats.events_total == 7
    assert_replica_matches(source, duckdb_path, "everything", columns, "id", KINDS)


def test_the_batch_type_table_streams_exactly(mysql_source_db: str, duckdb_path: Path, state_dsn: str) -> None:
    """The batch tests' every-type table (tests/test_mysql_batch.py), its UUID column refused first."""
    from mysql_compare import mysql_rows
    from table_compare import assert_same_rows, duckdb_rows
    from test_mysql_batch import COLUMNS as BATCH_COLUMNS
    from test_mysql_batch import EVERYTHING_DDL, EVERYTHING_ROWS, EXPECT

    from nilus_dagster.cdc.setup import CdcSetupError

    execute(mysql_source_db, "SET GLOBAL binlog_row_metadata = 'FULL'", EVERYTHING_DDL, EVERYTHING_ROWS)
    config = engine_config(mysql_source_db, ["everything"])
    with pytest.raises(CdcSetupError, match=r"cannot decode u \(uuid\) exactly"):
        run_engine(config, duckdb_path, state_dsn)
    execute(mysql_source_db, "ALTER TABLE everything DROP COLUMN u")
    columns = [c for c in BATCH_COLUMNS if c != "u"]

    def assert_exact() -> None:
        assert_same_rows(
            mysql_rows(mysql_source_db, "everything", columns, "id", EXPECT, floats=("f4",)),
            duckdb_rows(duckdb_path, "replica.everything", columns, "id"),
        )

    assert run_engine(config, duckdb_path, state_dsn).snapshot_rows == 3
    assert_exact()
    names = ", ".join(f"`{c}`" for c in columns[1:])
    execute(mysql_source_db, f"INSERT INTO everything (id, {names}) SELECT id DIV 2 + 7, {names} FROM everything",
            "UPDATE everything SET tx = 'moved', id = 5 WHERE id = 7")
    assert run_engine(config, duckdb_path, state_dsn).stats.events_total == 4
    assert_exact()
