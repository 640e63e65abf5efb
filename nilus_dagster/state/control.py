"""Operator control in the state store: the state an operator holds a pipeline in, and the audit
trail of every operator action (REST and Dagster jobs alike).

A hold lives in its own table, not in `pipeline_state`: a CDC run rewrites that row (merging its
detail) while it works, and an operator's stop must never be lost to such a write.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from nilus_dagster.state.records import Page, PipelineKey
from nilus_dagster.state.store import StateStore

# What an operator asked a pipeline to be: held (no run may consume) or running.
HELD_STATES = ("stopped", "paused")
AUDIT_RESULTS = ("pending", "ok", "refused", "error")


@dataclass(frozen=True)
class Hold:
    """The state an operator last asked for (`desired`), by whom, and the audit row of that action."""

    tenant: str
    pipeline: str
    resource_id: str
    desired: str
    actor: str
    audit_id: int | None
    updated_at: datetime

    @property
    def held(self) -> bool:
        return self.desired in HELD_STATES


@dataclass(frozen=True)
class AuditRecord:
    id: int
    tenant: str
    pipeline: str | None
    resource_id: str | None
    actor: str
    action: str
    params: dict[str, Any]
    result: str
    detail: dict[str, Any]
    run_ids: list[str]
    at: datetime


class ControlStore:
    """Holds and the audit trail, over a StateStore's pool and schema (migration 6)."""

    def __init__(self, store: StateStore):
        self.store = store

    # -- holds -----------------------------------------------------------------------------
    @contextmanager
    def serialized(self, key: PipelineKey) -> Iterator[None]:
        """One operator action at a time per pipeline (a session advisory lock, every process)."""
        name = f"nilus-control/{key.tenant}/{key.pipeline}"
        with self.store._conn() as conn:
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (name,))
            try:
                yield
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (name,))

    def set_desired(self, key: PipelineKey, desired: str, actor: str, audit_id: int | None) -> None:
        with self.store._conn() as conn:
            conn.execute(
                self.store._q(
                    "INSERT INTO {schema}.pipeline_control (tenant, pipeline, resource_id, desired, actor, audit_id) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (tenant, pipeline) DO UPDATE SET "
                    "resource_id = EXCLUDED.resource_id, desired = EXCLUDED.desired, actor = EXCLUDED.actor, "
                    "audit_id = EXCLUDED.audit_id, updated_at = now()"
                ),
                (key.tenant, key.pipeline, key.resource_id, desired, actor, audit_id),
            )

    def get(self, tenant: str, pipeline: str) -> Hold | None:
        with self.store._conn() as conn:
            row = conn.execute(
                self.store._q("SELECT * FROM {schema}.pipeline_control WHERE tenant = %s AND pipeline = %s"),
                (tenant, pipeline),
            ).fetchone()
        return Hold(**row) if row else None

    def for_tenant(self, tenant: str) -> dict[str, Hold]:
        return {h.pipeline: h for h in self.holds(tenant)}

    def holds(self, tenant: str | None = None) -> list[Hold]:
        """Every pipeline's last asked-for state (of one tenant, or all), by tenant and pipeline."""
        with self.store._conn() as conn:
            rows = conn.execute(
                self.store._q(
                    "SELECT * FROM {schema}.pipeline_control WHERE %s::text IS NULL OR tenant = %s "
                    "ORDER BY tenant, pipeline"
                ),
                (tenant, tenant),
            ).fetchall()
        return [Hold(**r) for r in rows]

    # -- audit trail -----------------------------------------------------------------------
    def audit_start(self, tenant: str, key: PipelineKey | None, actor: str, action: str, params: dict[str, Any]) -> int:
        """Record an action as it begins (result `pending`); `audit_end` records how it ended."""
        with self.store._conn() as conn:
            row = conn.execute(
                self.store._q(
                    "INSERT INTO {schema}.operator_audit (tenant, pipeline, resource_id, actor, action, params) "
                    "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"
                ),
                (
                    tenant,
                    key.pipeline if key else None,
                    key.resource_id if key else None,
                    actor,
                    action,
                    Jsonb(params),
                ),
            ).fetchone()
        assert row is not None
        return int(row["id"])

    def audit_end(self, audit_id: int, result: str, detail: dict[str, Any], run_ids: list[str]) -> None:
        if result not in AUDIT_RESULTS:
            raise ValueError(f"audit result must be one of {AUDIT_RESULTS}, got {result!r}")
        with self.store._conn() as conn:
            conn.execute(
                self.store._q(
                    "UPDATE {schema}.operator_audit SET result = %s, detail = %s, run_ids = %s WHERE id = %s"
                ),
                (result, Jsonb(detail), Jsonb(run_ids), audit_id),
            )

    def audit_page(
        self,
        tenant: str,
        *,
        pipeline: str | None = None,
        resource_id: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        result: str | None = None,
        at_gte: datetime | None = None,
        at_lte: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Page[AuditRecord]:
        """A tenant's audit trail, newest first."""
        filters = {
            "pipeline = %s": pipeline,
            "resource_id = %s": resource_id,
            "actor = %s": actor,
            "action = %s": action,
            "result = %s": result,
            "at >= %s": at_gte,
            "at <= %s": at_lte,
        }
        rows, total = self.store._page("operator_audit", tenant, filters, limit, offset)
        return Page([AuditRecord(**r) for r in rows], total)
