"""Opening MySQL/MariaDB source connections with PyMySQL, with errors that name the connection.

PyMySQL (pure Python) is the driver `mysql-replication` is built on, so the batch reader and the
binlog reader share one driver and one way to log in. Every session is pinned to the UTC time
zone (`+00:00`: needs no time zone tables) and utf8mb4, whatever the server's defaults are, so
TIMESTAMP values and 4-byte characters (emoji) arrive exactly.

Result values arrive undecoded (text, or bytes for binary columns): the reader converts whole
columns with Arrow instead of building one Python object per value (`RAW_CONVERSIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pymysql
from pymysql import converters

from nilus_dagster.sources.errors import SourceError, SourceUnreachable

# Parameters are still escaped by type (the encoders); results are left as the server sent them.
RAW_CONVERSIONS: dict[Any, Any] = {k: v for k, v in converters.conversions.items() if not isinstance(k, int)}
SESSION_SETUP = "SET time_zone = '+00:00', NAMES utf8mb4"
MINIMUM_VERSIONS = {"MySQL": (8, 0), "MariaDB": (10, 6)}


@dataclass(frozen=True)
class MySQLTarget:
    host: str
    port: int
    user: str
    password: str
    database: str | None
    ssl_mode: str | None = None
    ssl_ca: str | None = None

    def login(self) -> dict[str, Any]:
        """Host, port, user, password and TLS as `pymysql.connect` (and mysql-replication's
        `connection_settings`) take them."""
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                **_ssl_options(self)}


def parse_dsn(connection_name: str, dsn: str) -> MySQLTarget:
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
        raise SourceUnreachable(
            f"connection '{connection_name}': not a MySQL DSN (expected mysql://user:password@host:3306/database)"
        )
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return MySQLTarget(
        host=parts.hostname,
        port=parts.port or 3306,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=unquote(parts.path.lstrip("/")) or None,
        ssl_mode=query.get("ssl_mode"),
        ssl_ca=query.get("ssl_ca"),
    )


def _ssl_options(target: MySQLTarget) -> dict[str, Any]:
    """PyMySQL's `ssl` for MySQL's --ssl-mode: required encrypts, verify_ca checks the certificate
    against `ssl_ca`, verify_identity also the host name. PyMySQL has no opportunistic TLS, so
    `preferred` connects without it (as a MySQL client does when the server offers none)."""
    mode = target.ssl_mode
    if mode in (None, "disabled", "preferred"):
        return {}
    if mode == "required":
        return {"ssl": {"check_hostname": False}}  # no CA: encrypted, certificate not verified
    return {"ssl": {"ca": target.ssl_ca, "check_hostname": mode == "verify_identity"}}


def _version(conn: pymysql.Connection) -> tuple[str, tuple[int, ...], str]:
    text = conn.get_server_info().removeprefix("5.5.5-")  # MariaDB's handshake prefix for old clients
    flavour = "MariaDB" if "mariadb" in text.lower() else "MySQL"
    numbers = tuple(int(part) for part in text.split("-")[0].split(".")[:2] if part.isdigit())
    return flavour, numbers, text


def connect_mysql(connection_name: str, dsn: str, **kwargs: Any) -> pymysql.Connection:
    """A session in UTC and utf8mb4 with raw result values (`conv=None` for PyMySQL's conversions;
    other keyword arguments go to `pymysql.connect` too); refuses servers older than MySQL 8 / MariaDB 10.6."""
    target = parse_dsn(connection_name, dsn)
    options: dict[str, Any] = {
        "charset": "utf8mb4", "connect_timeout": 10, "autocommit": True, "init_command": SESSION_SETUP,
        "conv": RAW_CONVERSIONS, **target.login(), **kwargs,
    }
    try:
        conn = pymysql.connect(database=target.database, **options)
    except pymysql.err.MySQLError as exc:
        code, message = (exc.args + ("",))[:2] if exc.args else (0, type(exc).__name__)
        hint = ""
        if code == 1045:
            hint = " (check the user and the password its environment variable holds)"
        elif code == 1049:
            hint = " (the DSN's database does not exist: create it or leave the database out)"
        elif code in (2003, 2005, 2013):
            hint = f" (is the server running and reachable at {target.host}:{target.port}?)"
        raise SourceUnreachable(
            f"connection '{connection_name}': cannot connect to MySQL: ({code}) {message}{hint}"
        ) from None
    flavour, version, text = _version(conn)
    if version < MINIMUM_VERSIONS[flavour]:
        conn.close()
        minimum = ".".join(map(str, MINIMUM_VERSIONS[flavour]))
        raise SourceError(
            f"connection '{connection_name}': server version {text} is too old: nilus reads {flavour} "
            f"{minimum} or later"
        )
    return conn
