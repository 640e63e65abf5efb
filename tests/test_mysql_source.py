"""The MySQL source on its own: one consistent snapshot, batches of bounded size, the UTC session."""

from __future__ import annotations

import datetime as dt

from mysql_compare import mysql_execute

from nilus_dagster.schema.table import TableName
from nilus_dagster.sources.batch import CursorRange, open_batch_snapshot
from nilus_dagster.sources.mysql import connect_mysql, read_table, read_table_schema


def _database(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def test_everything_is_read_in_the_snapshot_taken_at_the_start(mysql_source_db: str) -> None:
    mysql_execute(mysql_source_db, "CREATE TABLE t (id int PRIMARY KEY, v varchar(10))",
                  "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    table = TableName(_database(mysql_source_db), "t")
    with open_batch_snapshot("mysql", "src", mysql_source_db) as source:
        schema = source.table_schema(table)
        mysql_execute(mysql_source_db, "INSERT INTO t VALUES (3, 'c')", "UPDATE t SET v = 'changed' WHERE id = 1")
        assert source.max_cursor(schema, "id", None) == "2"  # the later insert is not in the snapshot
        rows = [row for batch in source.read(schema, CursorRange("id", None, "2")) for row in batch.to_pylist()]
        assert rows == [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]
        assert source.max_cursor(schema, "id", "2") is None
    with open_batch_snapshot("mysql", "src", mysql_source_db) as source:
        assert source.max_cursor(schema, "id", "2") == "3"


def test_batches_are_bounded_and_the_session_is_utc(mysql_source_db: str) -> None:
    mysql_execute(mysql_source_db, "CREATE TABLE t (id int PRIMARY KEY, at timestamp NOT NULL)",
                  "INSERT INTO t VALUES (1, '2024-06-01 12:00:00'), (2, '2024-06-01 13:00:00'), "
                  "(3, '2024-06-01 14:00:00')")  # written in UTC (mysql_execute's session)
    conn = connect_mysql("src", mysql_source_db)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT @@session.time_zone, @@global.time_zone")
            assert cursor.fetchone() == ("+00:00", "+05:30")
        schema = read_table_schema(conn, TableName(_database(mysql_source_db), "t"))
        batches = list(read_table(conn, schema, batch_rows=2))
    finally:
        conn.close()
    assert [batch.num_rows for batch in batches] == [2, 1]
    assert batches[0].column("at")[0].as_py() == dt.datetime(2024, 6, 1, 12, tzinfo=dt.UTC)


def test_an_empty_table_yields_one_empty_batch(mysql_source_db: str) -> None:
    mysql_execute(mysql_source_db, "CREATE TABLE t (id int PRIMARY KEY)")
    conn = connect_mysql("src", mysql_source_db)
    try:
        schema = read_table_schema(conn, TableName(_database(mysql_source_db), "t"))
        assert [b.num_rows for b in read_table(conn, schema)] == [0]
    finally:
        conn.close()


def test_a_read_abandoned_mid_table_stops_quickly(mysql_source_db: str) -> None:
    mysql_execute(mysql_source_db, "CREATE TABLE t (id int PRIMARY KEY)",
                  f"INSERT INTO t SELECT seq FROM {_database(mysql_source_db)}.seq_1_to_5000")
    table = TableName(_database(mysql_source_db), "t")
    with open_batch_snapshot("mysql", "src", mysql_source_db) as source:
        batches = iter(read_table(source.conn, source.table_schema(table), batch_rows=100))  # type: ignore[attr-defined]
        assert next(batches).num_rows == 100
        batches.close()  # e.g. the sink failed: the worker stops, nothing hangs
