"""DuckDB bulk loads (`sinks/duckdb_keys.py`): an empty keyed table loads without its key and gets
it back, duplicates refuse the load, a whole-row merge gives the rows an upsert gives."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from sink_cases import SIMPLE, TARGET, batches_of, col

from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks import SinkError, WriteStrategy
from nilus_dagster.sinks.duckdb import DuckDBSink


def key_and_rows(path: Path) -> tuple[list[str], list[tuple[object, ...]]]:
    with duckdb.connect(str(path), read_only=True) as conn:
        key = conn.execute(
            "SELECT constraint_column_names FROM duckdb_constraints() WHERE table_name = ? "
            "AND constraint_type = 'PRIMARY KEY'", [TARGET.name],
        ).fetchall()  # fmt: skip
        rows = conn.execute(f"SELECT * FROM {TARGET.qualified} ORDER BY 1").fetchall()
    return (list(key[0][0]) if key else []), rows


ROWS = [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}, {"id": 3, "name": None, "qty": 3}]


def test_replace_and_merge_keep_the_key_and_the_rows(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, ROWS), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1), (2, "b", 2), (3, None, 3)])
    changed = [{"id": 2, "name": "B", "qty": 20}, {"id": 4, "name": "d", "qty": 4}]
    result = sink.write(TARGET, SIMPLE, batches_of(SIMPLE, changed), WriteStrategy.MERGE)
    assert result.inserted == 1 and result.table_rows == 4
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1), (2, "B", 20), (3, None, 3), (4, "d", 4)])
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, ROWS[:1]), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1)])


def test_duplicate_keys_refuse_a_load_into_an_empty_table(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, ROWS), WriteStrategy.REPLACE)
    twice = [ROWS[0], {**ROWS[0], "name": "again"}]
    with pytest.raises(SinkError, match="duplicate"):
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, twice), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1), (2, "b", 2), (3, None, 3)])  # rolled back


def test_merge_keeps_columns_the_source_lost(duckdb_path: Path) -> None:
    """A table with a column the schema lacks is merged by upsert: that column keeps its values."""
    wider = TableSchema(SIMPLE.table, (*SIMPLE.columns, col("extra", "text")), SIMPLE.primary_key)
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, wider, batches_of(wider, [{**ROWS[0], "extra": "kept"}]), WriteStrategy.REPLACE)
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{**ROWS[0], "qty": 9}]), WriteStrategy.MERGE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 9, "kept")])


def test_defer_and_restore_the_key(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    sink.prepare_table(TARGET, SIMPLE)
    assert sink.defer_primary_key(TARGET) == ["id"]
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, ROWS), WriteStrategy.APPEND)
    assert key_and_rows(duckdb_path)[0] == []
    sink.restore_primary_key(TARGET, ["id"])
    sink.restore_primary_key(TARGET, ["id"])  # once built, nothing to do
    assert key_and_rows(duckdb_path)[0] == ["id"]
    assert sink.defer_primary_key(TARGET) == []  # a table with rows keeps its key
