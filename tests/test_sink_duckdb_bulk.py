"""DuckDB bulk loads (`sinks/duckdb_keys.py`): an empty keyed table loads without its key and gets
it back, duplicates refuse the load, a whole-row merge gives the rows an upsert gives."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from sink_cases import SIMPLE, TARGET, batches_of, col

from nilus_dagster.schema import ColumnType, TableSchema
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


WITH_LIST = TableSchema(SIMPLE.table, (*SIMPLE.columns, col("tags", "list", element=ColumnType("text"))), ("id",))


@pytest.mark.parametrize("schema", [SIMPLE, WITH_LIST], ids=["upsert", "delete-insert"])
def test_replace_and_merge_keep_the_key_and_the_rows(duckdb_path: Path, schema: TableSchema) -> None:
    """A merge of a table with lists runs as delete + insert (`replace_rows`): the same rows."""
    tags = {"tags": ["x", None]} if schema is WITH_LIST else {}
    extra = (["x", None],) if tags else ()
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, schema, batches_of(schema, [{**row, **tags} for row in ROWS]), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1, *extra), (2, "b", 2, *extra), (3, None, 3, *extra)])
    changed = [{"id": 2, "name": "B", "qty": 20, **tags}, {"id": 4, "name": "d", "qty": 4, **tags}]
    result = sink.write(TARGET, schema, batches_of(schema, changed), WriteStrategy.MERGE)
    assert result.inserted == 1 and result.table_rows == 4
    expected = [(1, "a", 1, *extra), (2, "B", 20, *extra), (3, None, 3, *extra), (4, "d", 4, *extra)]
    assert key_and_rows(duckdb_path) == (["id"], expected)
    sink.write(TARGET, schema, batches_of(schema, [{**ROWS[0], **tags}]), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1, *extra)])


def test_duplicate_keys_refuse_a_load_into_an_empty_table(duckdb_path: Path) -> None:
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, SIMPLE, batches_of(SIMPLE, ROWS), WriteStrategy.REPLACE)
    twice = [ROWS[0], {**ROWS[0], "name": "again"}]
    with pytest.raises(SinkError, match="duplicate"):
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, twice), WriteStrategy.REPLACE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 1), (2, "b", 2), (3, None, 3)])  # rolled back


def test_merge_keeps_columns_the_source_lost(duckdb_path: Path) -> None:
    """A table with a column the schema lacks is merged by upsert: that column keeps its values."""
    wider = TableSchema(SIMPLE.table, (*WITH_LIST.columns, col("extra", "text")), SIMPLE.primary_key)
    sink = DuckDBSink(duckdb_path)
    sink.write(TARGET, wider, batches_of(wider, [{**ROWS[0], "tags": [], "extra": "kept"}]), WriteStrategy.REPLACE)
    sink.write(TARGET, WITH_LIST, batches_of(WITH_LIST, [{**ROWS[0], "qty": 9, "tags": ["t"]}]), WriteStrategy.MERGE)
    assert key_and_rows(duckdb_path) == (["id"], [(1, "a", 9, ["t"], "kept")])


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
