"""Source rows of a MySQL/MariaDB table in the form the sinks give them back (see table_compare).

PyMySQL's own conversions, read in a UTC session, then per column what the type mapping promises:
BIT as a boolean or an unsigned integer, unsigned BIGINT as a decimal, FLOAT as the float32 it is,
TIMESTAMP as an instant in UTC (TIME already arrives as a timedelta, like a sink's interval).
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pymysql
from table_compare import Row, normalize

from nilus_dagster.sources.mysql.connection import parse_dsn


def bit_bool(value: bytes) -> bool:
    return any(value)


def bit_int(value: bytes) -> int:
    return int.from_bytes(value, "big")


def bit_decimal(value: bytes) -> Decimal:
    return Decimal(int.from_bytes(value, "big"))


def as_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC)


def mysql_connect(dsn: str) -> pymysql.Connection:
    target = parse_dsn("test", dsn)
    return pymysql.connect(host=target.host, port=target.port, user=target.user, password=target.password,
                           database=target.database, charset="utf8mb4", autocommit=True,
                           init_command="SET time_zone = '+00:00'")


def mysql_execute(dsn: str, *statements: str) -> None:
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def mysql_rows(dsn: str, table: str, columns: list[str], order_by: str,
               expect: dict[str, Callable[[Any], Any]] | None = None, floats: tuple[str, ...] = ()) -> list[Row]:
    """`floats`: FLOAT columns, read through a DOUBLE (a FLOAT's text has only 6 significant digits)."""
    expect = expect or {}
    cols = ", ".join(f"`{c}` + 0e0" if c in floats else f"`{c}`" for c in columns)
    with mysql_connect(dsn) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT {cols} FROM {table} ORDER BY {order_by}")
        rows = cursor.fetchall()
    return [
        tuple(normalize(None if v is None else expect.get(c, lambda x: x)(v)) for c, v in zip(columns, row, strict=True))
        for row in rows
    ]
