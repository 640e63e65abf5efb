"""The state store's snapshot bookkeeping: CTID partition plans and their progress, and the
per-table resync requests a CDC run carries out."""

from __future__ import annotations

from collections.abc import Sequence

from nilus_dagster.state.base import StoreBase
from nilus_dagster.state.records import (
    RESYNC_OPEN,
    PipelineKey,
    ResyncRequest,
    SnapshotPartition,
    SnapshotTableProgress,
)


class SnapshotStore(StoreBase):
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

    # -- resync requests -------------------------------------------------------------------
    def request_resync(self, key: PipelineKey, tables: Sequence[str], reason: str = "") -> list[int]:
        """Ask for tables to be re-snapshotted; a table already waiting keeps its one open request.
        Returns the ids of the open requests for the tables."""
        ids = []
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"resync/{key.tenant}/{key.pipeline}",))
            for table in dict.fromkeys(tables):
                row = conn.execute(
                    self._q(
                        "SELECT id FROM {schema}.resync_requests WHERE tenant = %s AND pipeline = %s "
                        "AND table_name = %s AND status = ANY(%s) ORDER BY id LIMIT 1"
                    ),
                    (key.tenant, key.pipeline, table, list(RESYNC_OPEN)),
                ).fetchone()
                if row is None:
                    row = conn.execute(
                        self._q(
                            "INSERT INTO {schema}.resync_requests (tenant, pipeline, table_name, reason) "
                            "VALUES (%s, %s, %s, %s) RETURNING id"
                        ),
                        (key.tenant, key.pipeline, table, reason),
                    ).fetchone()
                assert row is not None
                ids.append(int(row["id"]))
        return ids

    def open_resyncs(self, tenant: str, pipeline: str) -> list[ResyncRequest]:
        """Requests not yet carried out (pending, or running when a run died mid-resync)."""
        with self._conn() as conn:
            rows = conn.execute(
                self._q(
                    "SELECT * FROM {schema}.resync_requests WHERE tenant = %s AND pipeline = %s "
                    "AND status = ANY(%s) ORDER BY id"
                ),
                (tenant, pipeline, list(RESYNC_OPEN)),
            ).fetchall()
        return [ResyncRequest(**r) for r in rows]

    def resync_requests(self, ids: Sequence[int]) -> list[ResyncRequest]:
        with self._conn() as conn:
            rows = conn.execute(
                self._q("SELECT * FROM {schema}.resync_requests WHERE id = ANY(%s) ORDER BY id"), (list(ids),)
            ).fetchall()
        return [ResyncRequest(**r) for r in rows]

    def mark_resyncs(
        self, ids: Sequence[int], status: str, *, run_id: str | None = None, error: str | None = None
    ) -> None:
        with self._conn() as conn:
            conn.execute(
                self._q(
                    "UPDATE {schema}.resync_requests SET status = %s, run_id = coalesce(%s, run_id), error = %s, "
                    "updated_at = now() WHERE id = ANY(%s)"
                ),
                (status, run_id, error, list(ids)),
            )
