"""Binlog CDC refuses, saying how to fix it, what it cannot stream exactly: server settings,
missing privileges, a clashing server id, DDL on a streamed table, zero dates, purged binlogs and
a different server; the reset job recovers the pipeline."""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mariadb_server import MariaDBServer
from mysql_cdc_harness import assert_replica_matches, engine_config, execute, mysql_connect, run_engine

from nilus_dagster.cdc.operations import reset_pipeline
from nilus_dagster.cdc.pipeline import CdcPipelineFailed
from nilus_dagster.cdc.setup import CdcSetupError
from nilus_dagster.state.store import StateStore

COLUMNS = ["id", "label", "born"]


@pytest.fixture
def source(mysql_source_db: str) -> str:
    execute(
        mysql_source_db,
        "SET GLOBAL binlog_row_metadata = 'FULL'",
        "CREATE TABLE people (id INT PRIMARY KEY, label VARCHAR(20), born DATE)",
        "INSERT INTO people SELECT seq, CONCAT('p', seq), '2000-01-01' + INTERVAL seq DAY FROM seq_1_to_50",
    )
    return mysql_source_db


def _state(state_dsn: str, pipeline: str = "binlog"):  # noqa: ANN202
    with StateStore(state_dsn).open() as store:
        return store.get_pipeline_state("acme", pipeline)


@pytest.mark.parametrize(
    ("variable", "bad", "good"),
    [("binlog_format", "MIXED", "ROW"), ("binlog_row_image", "MINIMAL", "FULL"),
     ("binlog_row_metadata", "MINIMAL", "FULL")],
)
def test_server_settings_are_checked(source: str, duckdb_path: Path, state_dsn: str, variable: str, bad: str,
                                     good: str) -> None:
    execute(source, f"SET GLOBAL {variable} = '{bad}'")
    try:
        with pytest.raises(CdcSetupError, match=f"{variable} is {bad}.*SET GLOBAL {variable} = '{good}'"):
            run_engine(engine_config(source, ["people"]), duckdb_path, state_dsn)
    finally:
        execute(source, f"SET GLOBAL {variable} = '{good}'")
    assert not duckdb_path.exists() or _state(state_dsn) is None  # refused before anything moved


def test_replication_privileges_are_checked_and_suffice(source: str, duckdb_path: Path, state_dsn: str) -> None:
    database = urlsplit(source).path.lstrip("/")
    user = f"cdc_{database[-6:]}"
    execute(source, f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'",
            f"GRANT SELECT ON `{database}`.* TO '{user}'@'127.0.0.1'")
    parts = urlsplit(source)
    limited = f"mysql://{user}:pw@{parts.hostname}:{parts.port}/{database}"
    try:
        with pytest.raises(CdcSetupError, match="lacks REPLICATION SLAVE, REPLICATION CLIENT: GRANT REPLICATION"):
            run_engine(engine_config(limited, ["people"]), duckdb_path, state_dsn)
        execute(source, f"GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'127.0.0.1'")
        run_engine(engine_config(limited, ["people"]), duckdb_path, state_dsn)
        execute(source, "UPDATE people SET label = 'by the limited user' WHERE id = 3")
        run_engine(engine_config(limited, ["people"]), duckdb_path, state_dsn)
        assert_replica_matches(source, duckdb_path, "people", COLUMNS, "id")
    finally:
        execute(source, f"DROP USER '{user}'@'127.0.0.1'")


def test_server_id_clash_is_refused(source: str, duckdb_path: Path, state_dsn: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with mysql_connect(source) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT @@server_id")
        own = int(cursor.fetchone()[0])
    monkeypatch.setattr("nilus_dagster.cdc.mysql.pipeline.replica_server_id", lambda tenant, pipeline: own)
    with pytest.raises(CdcSetupError, match=f"server_id is {own}, the id this pipeline's binlog connection uses"):
        run_engine(engine_config(source, ["people"]), duckdb_path, state_dsn)


def test_ddl_on_a_streamed_table_fails_clearly_and_reset_recovers(source: str, duckdb_path: Path,
                                                                  state_dsn: str) -> None:
    config = engine_config(source, ["people"])
    run_engine(config, duckdb_path, state_dsn)
    execute(source, "INSERT INTO people VALUES (100, 'before', NULL)",
            "ALTER TABLE people ADD COLUMN extra INT", "INSERT INTO people VALUES (101, 'after', NULL, 7)")
    with pytest.raises(CdcPipelineFailed, match="statement on .*people cannot be streamed.*ALTER TABLE people"):
        run_engine(config, duckdb_path, state_dsn)
    state = _state(state_dsn)
    assert state is not None and state.state == "failed"
    with pytest.raises(CdcPipelineFailed, match="is failed .*reset it"):
        run_engine(config, duckdb_path, state_dsn)
    with StateStore(state_dsn).open() as store:
        reset_pipeline(config, store)
    assert run_engine(config, duckdb_path, state_dsn).snapshot_rows == 52
    assert_replica_matches(source, duckdb_path, "people", [*COLUMNS, "extra"], "id")


def test_zero_date_is_refused_naming_the_column(source: str, duckdb_path: Path, state_dsn: str) -> None:
    config = engine_config(source, ["people"])
    run_engine(config, duckdb_path, state_dsn)
    execute(source, "SET SESSION sql_mode = ''", "INSERT INTO people VALUES (200, 'zero', '0000-00-00')")
    with pytest.raises(CdcPipelineFailed, match=r"people\.born \(date\) received a zero or partial date"):
        run_engine(config, duckdb_path, state_dsn)


def purge_all_but_newest(dsn: str) -> None:
    """Purge every binlog file but a new one (the server keeps a file until its binlog checkpoint,
    InnoDB's crash recovery point, has moved past it: retried briefly)."""
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute("FLUSH BINARY LOGS")
        cursor.execute("SHOW MASTER STATUS")
        newest = cursor.fetchone()[0]
        for _ in range(50):
            cursor.execute(f"PURGE BINARY LOGS TO '{newest}'")
            cursor.execute("SHOW BINARY LOGS")
            if [row[0] for row in cursor.fetchall()] == [newest]:
                return
            time.sleep(0.1)
    raise AssertionError("the server kept its older binlog files")


def test_purged_binlog_fails_clearly_and_reset_recovers(source: str, duckdb_path: Path, state_dsn: str) -> None:
    config = engine_config(source, ["people"])
    run_engine(config, duckdb_path, state_dsn)
    execute(source, "UPDATE people SET label = 'lost?' WHERE id < 10")
    purge_all_but_newest(source)
    with pytest.raises(CdcPipelineFailed, match="no longer has that binlog file \\(purged"):
        run_engine(config, duckdb_path, state_dsn)
    with StateStore(state_dsn).open() as store:
        reset_pipeline(config, store)
    assert run_engine(config, duckdb_path, state_dsn).snapshot_rows == 50
    assert_replica_matches(source, duckdb_path, "people", COLUMNS, "id")


def test_a_different_server_fails_clearly(source: str, duckdb_path: Path, state_dsn: str, tmp_path: Path) -> None:
    config = engine_config(source, ["people"])
    run_engine(config, duckdb_path, state_dsn)
    other = MariaDBServer(tmp_path / "other").start()
    try:
        database = urlsplit(source).path.lstrip("/")
        execute(other.dsn(), f"CREATE DATABASE `{database}`", "SET GLOBAL binlog_row_metadata = 'FULL'")
        execute(other.dsn(database), "CREATE TABLE people (id INT PRIMARY KEY, label VARCHAR(20), born DATE)")
        moved = engine_config(other.dsn(database), ["people"])
        with pytest.raises(CdcPipelineFailed, match="but the pipeline streamed from server"):
            run_engine(moved, duckdb_path, state_dsn)
    finally:
        other.destroy()
