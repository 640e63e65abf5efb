"""The state store's record of CDC tables held because their sink apply keeps failing
(cdc/table_failures.py): what the run holds, what an operator asked to retry, what the API shows."""

from __future__ import annotations

from collections.abc import Sequence

from nilus_dagster.state.base import StoreBase
from nilus_dagster.state.records import PipelineKey, TableFailure

_COLUMNS = "tenant, pipeline, table_name, status, reason, checkpoint, run_id, failed_at, updated_at"


class TableFailureStore(StoreBase):
    def record_table_failure(
        self, key: PipelineKey, table: str, reason: str, checkpoint: str | None, run_id: str | None
    ) -> None:
        """Hold `table` as failed (a retry asked meanwhile is superseded: it failed again)."""
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "INSERT INTO {schema}.table_failures (tenant, pipeline, table_name, status, reason, checkpoint, "
                    "run_id) VALUES (%s, %s, %s, 'failed', %s, %s, %s) ON CONFLICT (tenant, pipeline, table_name) "
                    "DO UPDATE SET status = 'failed', reason = EXCLUDED.reason, checkpoint = EXCLUDED.checkpoint, "
                    "run_id = EXCLUDED.run_id, updated_at = now()"
                ),
                (key.tenant, key.pipeline, table, reason[:2000], checkpoint, run_id),
            )

    def table_failures(self, tenant: str, pipeline: str | None = None) -> list[TableFailure]:
        """The tenant's held tables (of one pipeline), oldest failure first."""
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    f"SELECT {_COLUMNS} FROM {{schema}}.table_failures WHERE tenant = %s "
                    "AND (%s::text IS NULL OR pipeline = %s) ORDER BY failed_at, pipeline, table_name"
                ),
                (tenant, pipeline, pipeline),
            ).fetchall()
        return [TableFailure(**r) for r in rows]

    def request_table_retry(self, key: PipelineKey, tables: Sequence[str]) -> list[str]:
        """Ask the CDC run to stream failed tables again; returns the tables that were failed."""
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "UPDATE {schema}.table_failures SET status = 'retry', updated_at = now() "
                    "WHERE tenant = %s AND pipeline = %s AND table_name = ANY(%s) RETURNING table_name"
                ),
                (key.tenant, key.pipeline, list(tables)),
            ).fetchall()
        return sorted(r["table_name"] for r in rows)

    def mark_table_retrying(self, key: PipelineKey, tables: Sequence[str]) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "UPDATE {schema}.table_failures SET status = 'retrying', updated_at = now() "
                    "WHERE tenant = %s AND pipeline = %s AND table_name = ANY(%s) AND status = 'retry'"
                ),
                (key.tenant, key.pipeline, list(tables)),
            )

    def clear_table_failures(self, key: PipelineKey, tables: Sequence[str] | None = None) -> None:
        """Forget the failures of `tables` (all the pipeline's when None): they stream again."""
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "DELETE FROM {schema}.table_failures WHERE tenant = %s AND pipeline = %s "
                    "AND (%s::text[] IS NULL OR table_name = ANY(%s))"
                ),
                (key.tenant, key.pipeline, None if tables is None else list(tables),
                 None if tables is None else list(tables)),
            )
