"""Binlog CDC from MariaDB (a throwaway server, tests/mariadb_server.py) into DuckDB: the snapshot,
then streamed inserts, updates, key changes, deletes and truncates, compared row by row."""

from __future__ import annotations

from pathlib import Path

import pytest
from mysql_cdc_harness import assert_replica_matches, engine_config, execute, run_engine

ITEM_COLUMNS = ["id", "counter", "label", "amount", "updated_at", "seen_at"]
KINDS = {"seen_at": "timestamptz"}


@pytest.fixture
def source(mysql_source_db: str) -> str:
    execute(
        mysql_source_db,
        "SET GLOBAL binlog_row_metadata = 'FULL'",
        "CREATE TABLE items (id BIGINT PRIMARY KEY, counter INT NOT NULL, label VARCHAR(40), amount DECIMAL(20,4), "
        "updated_at DATETIME(6), seen_at TIMESTAMP(6) NULL)",
        "CREATE TABLE tags (k VARCHAR(20) NOT NULL, n INT NOT NULL, note TEXT, PRIMARY KEY (k, n))",
        "INSERT INTO items SELECT seq, 0, CONCAT('item ', seq), seq / 7, '2024-01-01 00:00:00' + INTERVAL seq HOUR, "
        "'2024-06-01 12:00:00.250000' + INTERVAL seq MINUTE FROM seq_1_to_300",
        "INSERT INTO tags SELECT CONCAT('t', seq % 5), seq, 'x' FROM seq_1_to_40",
    )
    return mysql_source_db


def assert_all_match(dsn: str, duckdb_path: Path) -> None:
    assert_replica_matches(dsn, duckdb_path, "items", ITEM_COLUMNS, "id", KINDS)
    assert_replica_matches(dsn, duckdb_path, "tags", ["k", "n", "note"], "k, n")


def workload(dsn: str) -> None:
    statements = []
    for i in range(10):
        statements += [
            "BEGIN",
            f"INSERT INTO items SELECT 1000 + {i} * 10 + seq, 1, 'new', 1.5, NOW(6), NOW(6) FROM seq_0_to_9",
            f"UPDATE items SET counter = counter + 1, label = 'upd' WHERE id % 20 = {i}",
            f"DELETE FROM items WHERE id = {100 + i}",
            "COMMIT",
        ]
    statements += [
        "UPDATE items SET id = id + 100000 WHERE id BETWEEN 1 AND 5",  # key changes
        "BEGIN",  # a key moves onto a key deleted in the same transaction
        "DELETE FROM items WHERE id = 200",
        "UPDATE items SET id = 200 WHERE id = 201",
        "COMMIT",
        "BEGIN",  # insert, update and delete of one row in one transaction
        "INSERT INTO items VALUES (9999, 1, 'a', NULL, NULL, NULL)",
        "UPDATE items SET label = 'b' WHERE id = 9999",
        "INSERT INTO items VALUES (9998, 1, 'gone', NULL, NULL, NULL)",
        "DELETE FROM items WHERE id = 9998",
        "COMMIT",
        "UPDATE tags SET n = n + 1000 WHERE k = 't1'",  # composite key changes
        "TRUNCATE TABLE tags",
        "INSERT INTO tags VALUES ('after', 1, 'after truncate'), ('after', 2, NULL)",
        "CREATE TABLE unrelated (id INT PRIMARY KEY)",  # DDL elsewhere is passed over
        "INSERT INTO unrelated VALUES (1)",
        "UPDATE items SET amount = NULL, seen_at = NULL WHERE id = 7",
    ]
    execute(dsn, *statements)


def test_snapshot_then_stream_is_exact(source: str, duckdb_path: Path, state_dsn: str) -> None:
    config = engine_config(source, ["items", "tags"])
    first = run_engine(config, duckdb_path, state_dsn)
    assert first.snapshot_rows == 340
    assert_all_match(source, duckdb_path)

    workload(source)
    second = run_engine(config, duckdb_path, state_dsn)
    assert second.snapshot_rows == 0
    assert second.stats.events_total > 100
    assert second.stats.table_changes[f"{config.tables[1].table}"]["T"] == 1
    assert_all_match(source, duckdb_path)

    third = run_engine(config, duckdb_path, state_dsn)  # nothing new: nothing changes
    assert third.stats.events_total == 0
    assert_all_match(source, duckdb_path)
