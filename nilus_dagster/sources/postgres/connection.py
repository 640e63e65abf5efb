"""Opening source connections with errors that name the connection, never the password."""

from __future__ import annotations

import psycopg

from nilus_dagster.sources.errors import SourceUnreachable

# A connect timeout and TCP keepalives on every source connection: a dead peer is noticed in
# seconds (unanswered probes; unacknowledged data after `tcp_user_timeout` ms), not hours.
CONNECT_OPTIONS: dict[str, object] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,
}


def connect_source(connection_name: str, dsn: str, **kwargs: object) -> psycopg.Connection:
    try:
        options = {**CONNECT_OPTIONS, "application_name": "nilus-dagster", **kwargs}
        return psycopg.connect(dsn, **options)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SourceUnreachable(f"connection '{connection_name}': cannot connect to PostgreSQL: {reason}") from None
