"""The throwaway MariaDB server the MySQL tests use: its own port, a ROW binlog with GTIDs."""

from __future__ import annotations

import pymysql
from mariadb_fixtures import mariadb_admin
from mariadb_server import MariaDBServer

from nilus_dagster.sources.mysql.connection import parse_dsn


def test_server_is_a_binlog_primary_of_its_own(mariadb_server: MariaDBServer, mysql_source_db: str) -> None:
    assert mariadb_server.port != 3306
    with mariadb_admin(mariadb_server) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT @@log_bin, @@binlog_format, @@binlog_row_image, @@server_id, @@gtid_domain_id, "
                       "@@socket, @@port")
        log_bin, row_format, image, server_id, _, socket, port = cursor.fetchone()
        assert (log_bin, row_format, image) == (1, "ROW", "FULL")
        assert server_id == mariadb_server.server_id and server_id > 1
        assert socket == str(mariadb_server.socket_path) and port == mariadb_server.port
    database = parse_dsn("t", mysql_source_db).database
    with mariadb_admin(mariadb_server, database) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id int primary key)")
        cursor.execute("INSERT INTO t VALUES (1)")
        cursor.execute("SELECT @@gtid_binlog_pos")
        domain, server, sequence = cursor.fetchone()[0].split("-")
        assert (int(domain), int(server)) == (mariadb_server.gtid_domain_id, mariadb_server.server_id)
        assert int(sequence) >= 2


def test_each_test_gets_an_empty_database(mysql_source_db: str, mariadb_server: MariaDBServer) -> None:
    target = parse_dsn("t", mysql_source_db)
    with pymysql.connect(host=target.host, port=target.port, user=target.user, password=target.password,
                         database=target.database) as conn, conn.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        assert cursor.fetchall() == ()
