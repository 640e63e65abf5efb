"""Shared fixtures: one throwaway PostgreSQL cluster (wal_level=logical) per test session.

Each test that needs a database gets a fresh one (`source_db`), so tests never see each other's
tables, slots or publications.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from nilus_dagster.embedded.postgres import EmbeddedPostgres

pytest_plugins = ["api_fixtures", "bigquery_fixtures", "cdc_duckdb_fixtures", "mariadb_fixtures"]


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("pg")).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _create_database(cluster: EmbeddedPostgres, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return cluster.dsn(name)


@pytest.fixture
def source_db(pg_cluster: EmbeddedPostgres) -> Iterator[str]:
    """DSN of a fresh, empty database: the pipeline source. Its replication slots are dropped
    afterwards: the session cluster has a fixed number of them (and an idle slot holds WAL)."""
    dsn = _create_database(pg_cluster, "src")
    yield dsn
    _drop_slots(pg_cluster, dsn.rsplit("/", 1)[1])


def _drop_slots(cluster: EmbeddedPostgres, database: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for _ in range(50):  # a killed run's walsender may take a moment to let its slot go
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE database = %s AND active_pid IS NOT NULL", (database,))
            with contextlib.suppress(psycopg.errors.ObjectInUse):  # taken again meanwhile: next round
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                             "WHERE database = %s AND NOT active", (database,))
            if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s", (database,)).fetchone():
                return
            time.sleep(0.1)


@pytest.fixture
def sink_pg(pg_cluster: EmbeddedPostgres) -> str:
    """DSN of a fresh, empty database: a PostgreSQL sink."""
    return _create_database(pg_cluster, "sink")


@pytest.fixture
def state_dsn(pg_cluster: EmbeddedPostgres) -> str:
    """DSN of a fresh database for the state store."""
    return _create_database(pg_cluster, "state")


@pytest.fixture
def duckdb_path(tmp_path: Path) -> Path:
    return tmp_path / "warehouse.duckdb"


@pytest.fixture(autouse=True)
def _own_dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own DAGSTER_HOME so runs never leak between tests."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A real Dagster instance (its own temporary storage) for running jobs."""
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def pipeline_env(source_db: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Pipelines in tests read SOURCE_DSN and keep state in NILUS_STATE_DSN; returns the source DSN."""
    monkeypatch.setenv("SOURCE_DSN", source_db)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    return source_db


@pytest.fixture(params=["duckdb", "postgres"])
def sql_sink(request: pytest.FixtureRequest, duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Each test runs once per transactional sink."""
    from batch_project import sink_target

    return sink_target(request.param, duckdb_path, sink_pg, monkeypatch)


@pytest.fixture
def duckdb_sink(duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from batch_project import sink_target

    return sink_target("duckdb", duckdb_path, sink_pg, monkeypatch)
