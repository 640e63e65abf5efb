"""Opening source connections with errors that name the connection, never the password."""

from __future__ import annotations

import psycopg


class SourceUnreachable(Exception):
    """The source database could not be reached or refused the login."""


def connect_source(connection_name: str, dsn: str, **kwargs: object) -> psycopg.Connection:
    try:
        return psycopg.connect(dsn, connect_timeout=10, application_name="nilus-dagster", **kwargs)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SourceUnreachable(f"connection '{connection_name}': cannot connect to PostgreSQL: {reason}") from None
