"""The state store: cursors, CDC offsets, schema history, snapshot progress, pipeline state.

Plain Python over a psycopg connection pool; all SQL of the state store lives in this package
(`base.py`: pool and migrations, `snapshots.py`: snapshot progress and resync requests). The
Dagster resource (`resource.py`) and the monitoring API both use `StateStore`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from nilus_dagster.state.base import StateStoreError
from nilus_dagster.state.dead_letters import DeadLetterStore
from nilus_dagster.state.dlq_replays import DlqReplayStore
from nilus_dagster.state.records import (
    Heartbeat,
    OffsetRecord,
    Page,
    PipelineKey,
    PipelineState,
    SchemaHistoryRecord,
)
from nilus_dagster.state.snapshots import SnapshotStore
from nilus_dagster.state.table_failures import TableFailureStore

__all__ = ["StateStore", "StateStoreError"]


# The newest offset row of each (connector_name, offset_key) of a pipeline: a recursive skip scan
# over the keys, then one index probe per key.
_LATEST_OFFSETS = """
WITH RECURSIVE k AS (
    (SELECT connector_name, offset_key FROM {schema}.cdc_offsets
     WHERE tenant = %(t)s AND pipeline = %(p)s ORDER BY connector_name, offset_key LIMIT 1)
    UNION ALL
    SELECT n.connector_name, n.offset_key FROM k CROSS JOIN LATERAL (
        SELECT connector_name, offset_key FROM {schema}.cdc_offsets
        WHERE tenant = %(t)s AND pipeline = %(p)s
          AND (connector_name, offset_key) > (k.connector_name, k.offset_key)
        ORDER BY connector_name, offset_key LIMIT 1) n
)
SELECT o.* FROM k CROSS JOIN LATERAL (
    SELECT * FROM {schema}.cdc_offsets
    WHERE tenant = %(t)s AND pipeline = %(p)s AND connector_name = k.connector_name AND offset_key = k.offset_key
    ORDER BY id DESC LIMIT 1) o
ORDER BY o.id DESC
"""


class StateStore(SnapshotStore, DeadLetterStore, DlqReplayStore, TableFailureStore):
    """All persistent pipeline state, in one PostgreSQL schema that this class migrates."""

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

    def latest_offsets(self, tenant: str, pipeline: str) -> list[OffsetRecord]:
        """The offsets in force: the newest row of each (connector_name, offset_key), newest first.

        A skip scan over the (tenant, pipeline, connector_name, offset_key, id) index: one probe
        per key, however many rows each key has accumulated.
        """
        with self._conn() as conn:
            rows = conn.execute(
                self._q(_LATEST_OFFSETS),
                {"t": tenant, "p": pipeline},
            ).fetchall()
        return [OffsetRecord(**r) for r in rows]

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
