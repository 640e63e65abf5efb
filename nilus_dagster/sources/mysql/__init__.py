"""The MySQL/MariaDB source: catalog lookups and a streaming reader producing Arrow batches."""

from nilus_dagster.sources.mysql.catalog import MySQLTableNotFound, read_table_schema
from nilus_dagster.sources.mysql.connection import connect_mysql, parse_dsn
from nilus_dagster.sources.mysql.reader import read_table

__all__ = ["MySQLTableNotFound", "connect_mysql", "parse_dsn", "read_table", "read_table_schema"]
