"""The state store's foundation: the connection pool, its migrations and shared query helpers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from nilus_dagster.state.migrations import MIGRATIONS

_MIGRATION_LOCK_ID = 0x6E696C7573  # "nilus": serializes concurrent migrators


class StateStoreError(Exception):
    """The state store is unreachable or refused an operation."""


class StoreBase:
    """A psycopg pool over the store's PostgreSQL schema, which this class migrates."""

    """All persistent pipeline state, in one PostgreSQL schema that this class migrates."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "nilus",
        max_connections: int = 4,
        wait_s: float = 30.0,
        cooldown_s: float = 0.0,
    ):
        """`wait_s`: how long a call waits for a connection before StateStoreError. `cooldown_s`:
        after such a failure, calls fail at once for that long (a server answers 503 quickly)."""
        self.schema = schema
        self._wait_s = wait_s
        self._cooldown_s = cooldown_s
        self._down_until = 0.0
        self._schema_sql = sql.Identifier(schema)
        self._pool = ConnectionPool(
            dsn,
            min_size=0,
            max_size=max_connections,
            kwargs={"autocommit": True, "row_factory": dict_row},
            open=False,
        )
        self._opened = False

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, *, migrate: bool = True, timeout_s: float = 10.0) -> Self:
        if not self._opened:
            self._pool.open(wait=False)
            self._opened = True
        if migrate:
            try:
                self.migrate()
            except psycopg.OperationalError as exc:
                raise StateStoreError(f"state store unreachable: {exc}") from exc
        return self

    def close(self) -> None:
        if self._opened:
            self._pool.close()
            self._opened = False

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        if time.monotonic() < self._down_until:
            raise StateStoreError("state store unreachable (failed moments ago)")
        if not self._opened:
            self.open(migrate=False)
        with ExitStack() as stack:
            try:
                conn = stack.enter_context(self._pool.connection(timeout=self._wait_s))
            except (PoolTimeout, psycopg.OperationalError) as exc:
                self._down_until = time.monotonic() + self._cooldown_s
                raise StateStoreError(f"state store unreachable: {exc}") from exc
            yield conn

    def _q(self, text: str) -> sql.Composed:
        """A statement whose `{schema}` placeholder is the store's (quoted) schema."""
        return sql.SQL(text).format(schema=self._schema_sql)  # type: ignore[arg-type]

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in force."""
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(self._q("CREATE SCHEMA IF NOT EXISTS {schema}"))
            conn.execute(
                self._q(
                    "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            )
            rows = conn.execute(self._q("SELECT version FROM {schema}.schema_migrations")).fetchall()
            applied = {r["version"] for r in rows}
            # Every migration not applied yet, in order (also one numbered below an applied one:
            # branches merged in either order each get theirs).
            for version, statement in sorted(MIGRATIONS):
                if version not in applied:
                    conn.execute(self._q(statement))
                    conn.execute(self._q("INSERT INTO {schema}.schema_migrations (version) VALUES (%s)"), (version,))
                    applied.add(version)
            return max(applied, default=0)

    def ping(self) -> None:
        """Raise StateStoreError unless the store answers a query."""
        try:
            with self._conn() as conn:
                conn.execute(self._q("SELECT 1 FROM {schema}.schema_migrations LIMIT 1"))
        except (psycopg.Error, Exception) as exc:  # pool timeouts are not psycopg errors
            raise StateStoreError(f"state store unreachable: {exc}") from exc

    def _page(
        self, table: str, tenant: str, filters: dict[str, Any], limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Newest-first page of a tenant's rows in an append-only table, with the total count."""
        clauses = ["tenant = %s"] + [clause for clause, value in filters.items() if value is not None]
        params: list[Any] = [tenant] + [value for value in filters.values() if value is not None]
        where = sql.SQL(" AND ".join(clauses))  # type: ignore[arg-type]
        target = sql.SQL("{schema}.{table}").format(schema=self._schema_sql, table=sql.Identifier(table))
        with self._conn() as conn:
            total_row = conn.execute(
                sql.SQL("SELECT count(*) AS n FROM {t} WHERE {w}").format(t=target, w=where), params
            ).fetchone()
            rows = conn.execute(
                sql.SQL("SELECT * FROM {t} WHERE {w} ORDER BY id DESC LIMIT %s OFFSET %s").format(t=target, w=where),
                [*params, limit, offset],
            ).fetchall()
        return rows, int(total_row["n"]) if total_row else 0
