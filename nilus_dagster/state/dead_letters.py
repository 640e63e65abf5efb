"""The dead-letter queue: rows a CDC run could not apply (a value the sink cannot take).

An entry is unique per (tenant, pipeline, table, commit LSN, key hash): a run that replays a
transaction after a crash records nothing twice (`ON CONFLICT DO NOTHING`). Entries are written
before the sink transaction that skips their rows commits, so the sink's checkpoint never moves
past a row whose entry is not durable. `ack` marks entries handled (up to an id); `purge` deletes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from nilus_dagster.state.base import StoreBase
from nilus_dagster.state.records import Page, PipelineKey


@dataclass(frozen=True)
class NewDeadLetter:
    """A row to dead-letter: where it is from and why it was refused."""

    table_name: str
    commit_lsn: int
    key_hash: str
    row_key: Any  # JSON: the key values as text
    row_data: dict[str, str | None]  # the row, values as PostgreSQL text
    op: str  # I, U, D
    error_kind: str
    column_name: str | None
    message: str


@dataclass(frozen=True)
class DeadLetter:
    id: int
    tenant: str
    pipeline: str
    resource_id: str
    table_name: str
    commit_lsn: int
    key_hash: str
    row_key: Any
    row_data: dict[str, Any]
    op: str
    error_kind: str
    column_name: str | None
    message: str
    run_id: str | None
    created_at: datetime
    acked_at: datetime | None
    replay_id: int | None = None  # the replay (state/dlq_replays.py) that acknowledged it


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which entries an operation concerns (None: any)."""

    pipeline: str | None = None
    table: str | None = None
    error_kind: str | None = None
    unacked: bool = True

    def where(self, tenant: str) -> tuple[sql.Composable, list[Any]]:
        clauses, params = ["tenant = %s"], [tenant]
        for column, value in (("pipeline", self.pipeline), ("table_name", self.table), ("error_kind", self.error_kind)):
            if value is not None:
                clauses.append(f"{column} = %s")
                params.append(value)
        if self.unacked:
            clauses.append("acked_at IS NULL")
        return sql.SQL(" AND ".join(clauses)), params  # type: ignore[arg-type]


class DeadLetterStore(StoreBase):
    def record_dead_letters(self, key: PipelineKey, entries: Sequence[NewDeadLetter], run_id: str | None) -> int:
        """Store entries (one transaction); returns how many were new (a replay adds none)."""
        if not entries:
            return 0
        added = 0
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            for e in entries:
                cur.execute(
                    self._q(
                        "INSERT INTO {schema}.dead_letters (tenant, pipeline, resource_id, table_name, commit_lsn, "
                        "key_hash, row_key, row_data, op, error_kind, column_name, message, run_id) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                    ),
                    (key.tenant, key.pipeline, key.resource_id, e.table_name, e.commit_lsn, e.key_hash,
                     Jsonb(e.row_key), Jsonb(e.row_data), e.op, e.error_kind, e.column_name, e.message, run_id),
                )
                added += cur.rowcount
        return added

    def dead_letters(
        self, tenant: str, where: DeadLetterFilter = DeadLetterFilter(), *, limit: int = 50, offset: int = 0
    ) -> Page[DeadLetter]:
        """Entries oldest first (the queue's order), with the total matching."""
        clause, params = where.where(tenant)
        with self._conn() as conn:
            total = conn.execute(
                self._q("SELECT count(*) AS n FROM {schema}.dead_letters WHERE ") + clause, params
            ).fetchone()
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.dead_letters WHERE ") + clause
                + sql.SQL(" ORDER BY id LIMIT %s OFFSET %s"),
                [*params, limit, offset],
            ).fetchall()
        return Page([DeadLetter(**r) for r in rows], int(total["n"]) if total else 0)

    def count_dead_letters(self, tenant: str, where: DeadLetterFilter = DeadLetterFilter()) -> int:
        clause, params = where.where(tenant)
        with self._conn() as conn:
            row = conn.execute(self._q("SELECT count(*) AS n FROM {schema}.dead_letters WHERE ") + clause, params)
            found = row.fetchone()
        return int(found["n"]) if found else 0

    def ack_dead_letters(self, tenant: str, up_to_id: int, where: DeadLetterFilter = DeadLetterFilter()) -> int:
        """Mark the unacknowledged entries with id <= `up_to_id` handled; returns how many."""
        clause, params = DeadLetterFilter(where.pipeline, where.table, where.error_kind, unacked=True).where(tenant)
        with self._conn() as conn:
            cur = conn.execute(
                self._q("UPDATE {schema}.dead_letters SET acked_at = now() WHERE id <= %s AND ") + clause,
                [up_to_id, *params],
            )
            return cur.rowcount

    def purge_dead_letters(
        self, tenant: str, where: DeadLetterFilter = DeadLetterFilter(unacked=False), *, acked_only: bool = False
    ) -> int:
        """Delete entries (acknowledged or not, or `acked_only`); returns how many."""
        clause, params = where.where(tenant)
        if acked_only:
            clause = clause + sql.SQL(" AND acked_at IS NOT NULL")
        with self._conn() as conn:
            return conn.execute(self._q("DELETE FROM {schema}.dead_letters WHERE ") + clause, params).rowcount

    def dead_letter_totals(self, tenant: str | None = None) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Per (tenant, pipeline, table): (unacknowledged entries, entries kept)."""
        filter_sql = sql.SQL("WHERE tenant = %s") if tenant is not None else sql.SQL("")
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT tenant, pipeline, table_name, count(*) FILTER (WHERE acked_at IS NULL) AS open, "
                    "count(*) AS kept FROM {schema}.dead_letters "
                )
                + filter_sql
                + sql.SQL(" GROUP BY tenant, pipeline, table_name"),
                [tenant] if tenant is not None else [],
            ).fetchall()
        return {(r["tenant"], r["pipeline"], r["table_name"]): (int(r["open"]), int(r["kept"])) for r in rows}
