"""Requests to replay dead-letter entries, carried out by the CDC run (cdc/dlq_replay.py).

A request names the entries (resolved when it is made: ids and/or a table, unacknowledged only).
The run writes the *current* source rows of their keys to the sink, then `finish_dlq_replay`
acknowledges the entries it replayed and closes the request in one store transaction: an entry is
acknowledged once (`acked_at IS NULL` guard), by the request that replayed it (`replay_id`). A run
that dies between the sink write and that transaction leaves the request pending: the next run
replays it again (the write is idempotent, see cdc/dlq_replay.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from psycopg.types.json import Jsonb

from nilus_dagster.state.base import StoreBase
from nilus_dagster.state.dead_letters import DeadLetter
from nilus_dagster.state.records import PipelineKey

REPLAY_PENDING = "pending"


@dataclass(frozen=True)
class DlqReplay:
    id: int
    tenant: str
    pipeline: str
    entry_ids: list[int]
    status: str  # pending, done, failed
    message: str | None
    run_id: str | None
    requested_at: datetime
    updated_at: datetime


class DlqReplayStore(StoreBase):
    def request_dlq_replay(
        self, key: PipelineKey, ids: Sequence[int] | None = None, table: str | None = None
    ) -> tuple[int, list[DeadLetter]]:
        """Record a replay of the pipeline's unacknowledged entries with these ids (None: any) of
        `table` (None: any). Returns the request id and its entries (none: nothing recorded, id 0)."""
        clauses, params = ["tenant = %s", "pipeline = %s", "acked_at IS NULL"], [key.tenant, key.pipeline]
        if ids is not None:
            clauses.append("id = ANY(%s)")
            params.append(list(ids))
        if table is not None:
            clauses.append("table_name = %s")
            params.append(table)
        with self._conn() as conn, conn.transaction():
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.dead_letters WHERE " + " AND ".join(clauses) + " ORDER BY id"),
                params,
            ).fetchall()
            entries = [DeadLetter(**r) for r in rows]
            if not entries:
                return 0, []
            row = conn.execute(
                self._q("INSERT INTO {schema}.dlq_replays (tenant, pipeline, entry_ids) VALUES (%s, %s, %s) "
                        "RETURNING id"),
                (key.tenant, key.pipeline, Jsonb([e.id for e in entries])),
            ).fetchone()
        assert row is not None
        return int(row["id"]), entries

    def pending_dlq_replays(self, tenant: str, pipeline: str) -> list[DlqReplay]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.dlq_replays WHERE tenant = %s AND pipeline = %s AND status = %s "
                        "ORDER BY id"),
                (tenant, pipeline, REPLAY_PENDING),
            ).fetchall()
        return [DlqReplay(**r) for r in rows]

    def dlq_replay(self, replay_id: int) -> DlqReplay | None:
        with self._conn() as conn:
            row = conn.execute(self._q("SELECT * FROM {schema}.dlq_replays WHERE id = %s"), (replay_id,)).fetchone()
        return DlqReplay(**row) if row else None

    def dead_letters_by_id(self, ids: Sequence[int]) -> list[DeadLetter]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.dead_letters WHERE id = ANY(%s) ORDER BY id"), (list(ids),)
            ).fetchall()
        return [DeadLetter(**r) for r in rows]

    def finish_dlq_replay(
        self, replay_id: int, status: str, message: str, replayed: Sequence[int], run_id: str | None
    ) -> int:
        """Acknowledge the `replayed` entries (those still unacknowledged) and close the request, at
        once. Returns how many entries this acknowledged."""
        with self._conn() as conn, conn.transaction():
            acked = conn.execute(
                self._q("UPDATE {schema}.dead_letters SET acked_at = now(), replay_id = %s "
                        "WHERE id = ANY(%s) AND acked_at IS NULL"),
                (replay_id, list(replayed)),
            ).rowcount
            conn.execute(
                self._q("UPDATE {schema}.dlq_replays SET status = %s, message = %s, run_id = %s, updated_at = now() "
                        "WHERE id = %s AND status = %s"),
                (status, message, run_id, replay_id, REPLAY_PENDING),
            )
        return acked
