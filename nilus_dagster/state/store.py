"""The state store: cursors, CDC offsets, schema history, snapshot progress, pipeline state.

Plain Python over a psycopg connection pool; all SQL of the state store lives here. The Dagster
resource (`resource.py`) and the monitoring API both use this class.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from nilus_dagster.state.migrations import MIGRATIONS
from nilus_dagster.state.records import (
    Heartbeat,
    OffsetRecord,
    Page,
    PipelineKey,
    PipelineState,
    SchemaHistoryRecord,
    SnapshotPartition,
    SnapshotTableProgress,
)

_MIGRATION_LOCK_ID = 0x6E696C7573  # "nilus": serializes concurrent migrators


class StateStoreError(Exception):
    """The state store is unreachable or refused an operation."""


class StateStore:
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
    def open(self, *, migrate: bool = True, timeout_s: float = 10.0) -> StateStore:
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

    def __enter__(self) -> StateStore:
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
            row = conn.execute(self._q("SELECT max(version) AS v FROM {schema}.schema_migrations")).fetchone()
            current = (row or {}).get("v") or 0
            for version, statement in MIGRATIONS:
                if version > current:
                    conn.execute(self._q(statement))
                    conn.execute(self._q("INSERT INTO {schema}.schema_migrations (version) VALUES (%s)"), (version,))
                    current = version
            return current

    def ping(self) -> None:
        """Raise StateStoreError unless the store answers a query."""
        try:
            with self._conn() as conn:
                conn.execute(self._q("SELECT 1 FROM {schema}.schema_migrations LIMIT 1"))
        except (psycopg.Error, Exception) as exc:  # pool timeouts are not psycopg errors
            raise StateStoreError(f"state store unreachable: {exc}") from exc

    # -- pipeline state --------------------------------------------------------------------
    def set_pipeline_state(self, key: PipelineKey, state: str, detail: dict[str, Any] | None = None) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.pipeline_state (tenant, pipeline, resource_id, state, detail) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant, pipeline) DO UPDATE SET "
                    "resource_id = EXCLUDED.resource_id, state = EXCLUDED.state, detail = EXCLUDED.detail, "
                    "updated_at = now()"
                ),
                (key.tenant, key.pipeline, key.resource_id, state, Jsonb(detail or {})),
            )

    def get_pipeline_state(self, tenant: str, pipeline: str) -> PipelineState | None:
        with self._conn() as conn:
            row = conn.execute(
                self._q("SELECT * FROM {schema}.pipeline_state WHERE tenant = %s AND pipeline = %s"),
                (tenant, pipeline),
            ).fetchone()
        return PipelineState(**row) if row else None

    def list_pipeline_states(self, tenant: str) -> list[PipelineState]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.pipeline_state WHERE tenant = %s ORDER BY pipeline"), (tenant,)
            ).fetchall()
        return [PipelineState(**r) for r in rows]

    # -- batch cursors (high-water marks) --------------------------------------------------
    def get_cursor(self, key: PipelineKey, table: str) -> str | None:
        with self._conn() as conn:
            row = conn.execute(
                self._q(
                    "SELECT cursor_value FROM {schema}.batch_cursors "
                    "WHERE tenant = %s AND pipeline = %s AND table_name = %s"
                ),
                (key.tenant, key.pipeline, table),
            ).fetchone()
        return row["cursor_value"] if row else None

    def set_cursor(self, key: PipelineKey, table: str, column: str, value: str) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.batch_cursors "
                    "(tenant, pipeline, resource_id, table_name, cursor_column, cursor_value) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, pipeline, table_name) DO UPDATE "
                    "SET cursor_column = EXCLUDED.cursor_column, cursor_value = EXCLUDED.cursor_value, "
                    "resource_id = EXCLUDED.resource_id, updated_at = now()"
                ),
                (key.tenant, key.pipeline, key.resource_id, table, column, value),
            )

    # -- CDC offsets (append-only; the latest row is in force) ------------------------------
    def append_offset(
        self,
        key: PipelineKey,
        *,
        connector_name: str,
        offset_key: str,
        offset_value: dict[str, Any],
        run_id: str | None = None,
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.cdc_offsets "
                    "(tenant, pipeline, resource_id, connector_name, offset_key, offset_value, run_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
                ),
                (key.tenant, key.pipeline, key.resource_id, connector_name, offset_key, Jsonb(offset_value), run_id),
            )

    def latest_offset(self, tenant: str, pipeline: str) -> OffsetRecord | None:
        with self._conn() as conn:
            row = conn.execute(
                self._q(
                    "SELECT * FROM {schema}.cdc_offsets WHERE tenant = %s AND pipeline = %s ORDER BY id DESC LIMIT 1"
                ),
                (tenant, pipeline),
            ).fetchone()
        return OffsetRecord(**row) if row else None

    def list_offsets(
        self,
        tenant: str,
        *,
        resource_id: str | None = None,
        connector_name: str | None = None,
        offset_key: str | None = None,
        inserted_gte: datetime | None = None,
        inserted_lte: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[OffsetRecord]:
        filters = {
            "resource_id = %s": resource_id,
            "connector_name = %s": connector_name,
            "offset_key = %s": offset_key,
            "record_insert_ts >= %s": inserted_gte,
            "record_insert_ts <= %s": inserted_lte,
        }
        rows, total = self._page("cdc_offsets", tenant, filters, limit, offset)
        return Page([OffsetRecord(**r) for r in rows], total)

    # -- schema history (append-only) ------------------------------------------------------
    def append_schema(
        self,
        key: PipelineKey,
        *,
        connector_name: str,
        table_name: str,
        table_schema: dict[str, Any],
        lsn: str | None,
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.schema_history "
                    "(tenant, pipeline, resource_id, connector_name, table_name, table_schema, lsn) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)"
                ),
                (key.tenant, key.pipeline, key.resource_id, connector_name, table_name, Jsonb(table_schema), lsn),
            )

    def latest_schemas(self, tenant: str, pipeline: str) -> dict[str, SchemaHistoryRecord]:
        """The schema in force per table: the newest history row of each."""
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT DISTINCT ON (table_name) * FROM {schema}.schema_history "
                    "WHERE tenant = %s AND pipeline = %s ORDER BY table_name, id DESC"
                ),
                (tenant, pipeline),
            ).fetchall()
        return {r["table_name"]: SchemaHistoryRecord(**r) for r in rows}

    def has_schema_history(self, tenant: str, pipeline: str) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                self._q(
                    "SELECT EXISTS (SELECT 1 FROM {schema}.schema_history WHERE tenant = %s AND pipeline = %s) AS e"
                ),
                (tenant, pipeline),
            ).fetchone()
        return bool(row and row["e"])

    def list_schema_history(
        self,
        tenant: str,
        *,
        pipeline: str | None = None,
        resource_id: str | None = None,
        connector_name: str | None = None,
        inserted_gte: datetime | None = None,
        inserted_lte: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[SchemaHistoryRecord]:
        filters = {
            "pipeline = %s": pipeline,
            "resource_id = %s": resource_id,
            "connector_name = %s": connector_name,
            "record_insert_ts >= %s": inserted_gte,
            "record_insert_ts <= %s": inserted_lte,
        }
        rows, total = self._page("schema_history", tenant, filters, limit, offset)
        return Page([SchemaHistoryRecord(**r) for r in rows], total)

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

    # -- snapshot progress -----------------------------------------------------------------
    def plan_snapshot(
        self, key: PipelineKey, table: str, partitions: Sequence[tuple[int, int]], rows_estimate: int
    ) -> list[SnapshotPartition]:
        """Record a table's CTID partitions unless already planned; return the plan in force.

        A plan is written once: a resumed snapshot keeps its partitions and their progress.
        """
        per_partition = rows_estimate // max(1, len(partitions))
        with self._conn() as conn, conn.transaction():
            exists = conn.execute(
                self._q(
                    "SELECT 1 FROM {schema}.snapshot_partitions "
                    "WHERE tenant = %s AND pipeline = %s AND table_name = %s LIMIT 1"
                ),
                (key.tenant, key.pipeline, table),
            ).fetchone()
            if not exists:
                with conn.cursor() as cur:
                    cur.executemany(
                        self._q(
                            "INSERT INTO {schema}.snapshot_partitions (tenant, pipeline, table_name, partition_no, "
                            "start_block, end_block, rows_estimate) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                        ),
                        [
                            (key.tenant, key.pipeline, table, no, start, end, per_partition)
                            for no, (start, end) in enumerate(partitions)
                        ],
                    )
        return self.snapshot_partitions(key.tenant, key.pipeline, table)

    def snapshot_partitions(self, tenant: str, pipeline: str, table: str) -> list[SnapshotPartition]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT table_name, partition_no, start_block, end_block, rows_estimate, rows_done, done "
                    "FROM {schema}.snapshot_partitions WHERE tenant = %s AND pipeline = %s AND table_name = %s "
                    "ORDER BY partition_no"
                ),
                (tenant, pipeline, table),
            ).fetchall()
        return [SnapshotPartition(**r) for r in rows]

    def mark_partition_done(self, key: PipelineKey, table: str, partition_no: int, rows: int) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "UPDATE {schema}.snapshot_partitions SET done = true, rows_done = %s, updated_at = now() "
                    "WHERE tenant = %s AND pipeline = %s AND table_name = %s AND partition_no = %s"
                ),
                (rows, key.tenant, key.pipeline, table, partition_no),
            )

    def clear_snapshot(self, tenant: str, pipeline: str, table: str | None = None) -> None:
        """Forget a snapshot plan (a new slot means a new snapshot)."""
        with self._conn() as conn:
            if table is None:
                conn.execute(
                    self._q("DELETE FROM {schema}.snapshot_partitions WHERE tenant = %s AND pipeline = %s"),
                    (tenant, pipeline),
                )
            else:
                conn.execute(
                    self._q(
                        "DELETE FROM {schema}.snapshot_partitions "
                        "WHERE tenant = %s AND pipeline = %s AND table_name = %s"
                    ),
                    (tenant, pipeline, table),
                )

    def snapshot_progress(self, tenant: str, pipeline: str) -> list[SnapshotTableProgress]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT table_name AS table, count(*) AS partitions_total, "
                    "count(*) FILTER (WHERE done) AS partitions_done, "
                    "sum(greatest(rows_estimate, rows_done))::bigint AS rows_total, "
                    "sum(rows_done)::bigint AS rows_done "
                    "FROM {schema}.snapshot_partitions WHERE tenant = %s AND pipeline = %s "
                    "GROUP BY table_name ORDER BY table_name"
                ),
                (tenant, pipeline),
            ).fetchall()
        return [SnapshotTableProgress(**r) for r in rows]

    # -- heartbeats ------------------------------------------------------------------------
    def beat(self, key: PipelineKey, run_id: str, detail: dict[str, Any] | None = None) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.heartbeats (tenant, pipeline, run_id, detail) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (tenant, pipeline) DO UPDATE SET run_id = EXCLUDED.run_id, "
                    "detail = EXCLUDED.detail, beat_at = now()"
                ),
                (key.tenant, key.pipeline, run_id, Jsonb(detail or {})),
            )

    def last_heartbeat(self, tenant: str, pipeline: str) -> Heartbeat | None:
        with self._conn() as conn:
            row = conn.execute(
                self._q("SELECT run_id, beat_at, detail FROM {schema}.heartbeats WHERE tenant = %s AND pipeline = %s"),
                (tenant, pipeline),
            ).fetchone()
        return Heartbeat(**row) if row else None

    def list_heartbeats(self, tenant: str | None = None) -> dict[tuple[str, str], Heartbeat]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT tenant, pipeline, run_id, beat_at, detail FROM {schema}.heartbeats "
                    "WHERE %s::text IS NULL OR tenant = %s"
                ),
                (tenant, tenant),
            ).fetchall()
        return {(r["tenant"], r["pipeline"]): Heartbeat(r["run_id"], r["beat_at"], r["detail"]) for r in rows}

    # -- run metadata stored by a remote runtime (internal API) ----------------------------
    def record_run(self, key: PipelineKey, run_id: str, payload: dict[str, Any]) -> int:
        with self._conn() as conn:
            row = conn.execute(
                self._q(
                    "INSERT INTO {schema}.pipeline_runs (tenant, pipeline, resource_id, run_id, payload) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING id"
                ),
                (
                    key.tenant,
                    key.pipeline,
                    key.resource_id,
                    run_id,
                    Jsonb(json.loads(json.dumps(payload, default=str))),
                ),
            ).fetchone()
        assert row is not None
        return int(row["id"])
