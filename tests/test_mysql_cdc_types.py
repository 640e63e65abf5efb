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
    "lat": "VARCHAR(10) CHARACTER SET latin1",
}
KINDS = {"ts": "timestamptz", "b1": "bit1", "b10": "bit", "b64": "bit"}
ROWS = [
    "(1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295, -9223372036854775808, "
    "18446744073709551615, 1234567890123456789012345678.0123456789, -99999999.99, 1.5, -2.5e300, "
    "'9999-12-31 23:59:59.999999', '1000-01-01 00:00:00', '2038-01-19 03:14:07.999999', '1000-01-01', "
    "'838:59:59.000000', 2155, 'ab', 'héllo 😀', REPEAT('long ', 2000), 'c', 'x,z', '{\"a\": [1, 2.5, \"x\"]}', "
    "x'00ff', x'', x'0102', b'1', b'1010101010', b'1111111111111111111111111111111111111111111111111111111111111111',"
    " 'café')",
    "(2, 127, 0, 32767, 0, 8388607, 0, 2147483647, 0, 9223372036854775807, 0, -0.0000000001, 0, -0.25, 0, "
    "'1970-01-01 00:00:00', '2024-02-29 12:00:00', '1970-01-01 00:00:01', '2024-02-29', '-838:59:59.000000', "
    "1901, '', '', '', 'a', '', '[]', x'01', x'00', x'', b'0', b'0', b'0', '')",
    "(3" + ", NULL" * len(COLUMNS) + ")",
    "(4, 0, 1, 0, 1, 0, 1, 0, 1, 0, 9223372036854775808, 1, 1, 0, 1, '2024-06-01 00:00:00.5', "
    "'2024-06-01 00:00:00', '2024-06-01 00:00:00.5', '2024-06-01', '-00:00:00.5', 0, 'x  ', ' y ', 'z', 'b', "
    "'y', '{\"k\": null}', x'61626300', x'ff', x'ff', b'1', b'1', b'1000000000000000000000000000000000000000000000000000000000000000', 'ñ')",
]


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
