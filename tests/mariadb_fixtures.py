"""MariaDB fixtures: one throwaway server per test session, a fresh database per test.

Register as a plugin (`pytest_plugins = ["mariadb_fixtures"]`). `mariadb_server` is the running
`MariaDBServer` (binlog ROW/FULL, GTID, its own port and socket); `mysql_source_db` is the DSN
(`mysql://root:...@127.0.0.1:PORT/src_xxx`) of an empty database, dropped after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pymysql
import pytest
from mariadb_server import ROOT_PASSWORD, MariaDBServer


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    server = MariaDBServer(tmp_path_factory.mktemp("mariadb")).start()
    try:
        yield server
    finally:
        server.destroy()


def mariadb_admin(server: MariaDBServer, database: str | None = None) -> pymysql.Connection:
    """A root connection (autocommit) to the test server."""
    return pymysql.connect(
        host="127.0.0.1", port=server.port, user="root", password=ROOT_PASSWORD,
        database=database, autocommit=True, charset="utf8mb4",
    )


@pytest.fixture
def mysql_source_db(mariadb_server: MariaDBServer) -> Iterator[str]:
    """DSN of a fresh, empty database on the test server (root login)."""
    name = f"src_{uuid.uuid4().hex[:10]}"
    with mariadb_admin(mariadb_server) as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    yield mariadb_server.dsn(name)
    with mariadb_admin(mariadb_server) as conn, conn.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
