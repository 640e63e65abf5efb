"""Dagster run storage queries for one pipeline (tenant + resource_id tags), all server-side.

Counts use `get_runs_count`; pages and stats use narrow SQL built from Dagster's own run query
(`SqlRunStorage._runs_query`, the same tag joins as `get_runs_count`) so offsets, sums and
maxima are computed by the database instead of by decoding every run. Non-SQL storages fall
back to the public cursor API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from dagster import DagsterInstance, DagsterRunStatus, RunRecord, RunsFilter
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage

from nilus_dagster.components.tags import PIPELINE_TAG, RESOURCE_ID_TAG, RUN_AS_USER_TAG, TENANT_TAG

SUCCESS = DagsterRunStatus.SUCCESS
FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
FINISHED = (SUCCESS, *FAILED)
NOT_SUCCESS = tuple(s for s in DagsterRunStatus if s is not SUCCESS)


@dataclass(frozen=True)
class DurationStats:
    total: int
    successful: int
    failed: int
    avg_duration: float | None
    max_duration: float | None


@dataclass(frozen=True)
class LastRun:
    tenant: str
    pipeline: str
    status: str
    duration: float | None


def pipeline_filter(
    tenant: str,
    resource_id: str,
    *,
    statuses: Sequence[DagsterRunStatus] | None = None,
    run_as_user: str | None = None,
    created_after: datetime | None = None,
) -> RunsFilter:
    tags = {TENANT_TAG: tenant, RESOURCE_ID_TAG: resource_id}
    if run_as_user is not None:
        tags[RUN_AS_USER_TAG] = run_as_user
    return RunsFilter(tags=tags, statuses=list(statuses) if statuses else None, created_after=created_after)


class RunReader:
    def __init__(self, instance: DagsterInstance):
        self.instance = instance
        storage = instance.run_storage
        self._sql: SqlRunStorage | None = storage if isinstance(storage, SqlRunStorage) else None
        if self._sql is not None:
            # Dagster reflects the runs table's columns on every get_run_records call (one more
            # query per call); columns never disappear, so the API process asks once.
            has_cols = self._sql.has_run_stats_index_cols()
            self._sql.has_run_stats_index_cols = lambda: has_cols  # type: ignore[method-assign]

    def ping(self) -> None:
        self.instance.get_runs_count(RunsFilter(tags={TENANT_TAG: "__health__"}))

    def latest(self, tenant: str, resource_id: str, job_name: str | None = None) -> RunRecord | None:
        """The newest run with the pipeline's tenant and resource_id tags.

        With the pipeline's job name (tenant-prefixed), the newest runs of the job are read by
        Dagster's (job, id) index and the first whose tags match is taken: ~1 ms instead of a tag
        join that grows with the pipeline's history. Otherwise, or if none match, the tag query.
        """
        if job_name is not None:
            for record in self.instance.get_run_records(RunsFilter(job_name=job_name), limit=5):
                tags = record.dagster_run.tags
                if tags.get(TENANT_TAG) == tenant and tags.get(RESOURCE_ID_TAG) == resource_id:
                    return record
        records = self.instance.get_run_records(pipeline_filter(tenant, resource_id), limit=1)
        return records[0] if records else None

    def count(self, filters: RunsFilter) -> int:
        return self.instance.get_runs_count(filters)

    def page(self, filters: RunsFilter, limit: int, offset: int) -> list[RunRecord]:
        """Newest first; `offset` is applied by the database."""
        if self._sql is not None:
            query = self._sql._runs_query(filters=filters, limit=limit, columns=["run_id"]).offset(offset)
            run_ids = [row["run_id"] for row in self._sql.fetchall(query)]
            if not run_ids:
                return []
            records = self.instance.get_run_records(RunsFilter(run_ids=run_ids))
            return sorted(records, key=lambda r: r.storage_id, reverse=True)
        cursor = None
        if offset:
            skipped = self.instance.get_run_ids(filters, limit=offset)
            if len(skipped) < offset:
                return []
            cursor = skipped[-1]
        return list(self.instance.get_run_records(filters, limit=limit, cursor=cursor))

    def stats(self, filters: RunsFilter) -> DurationStats:
        """Counts by outcome and durations of finished runs matching `filters`."""
        if self._sql is None:
            return self._stats_by_paging(filters)
        runs = self._sql._runs_query(filters=filters, columns=["status", "start_time", "end_time"]).subquery()
        finished = sa.and_(
            runs.c.status.in_([s.value for s in FINISHED]),
            runs.c.start_time.isnot(None),
            runs.c.end_time.isnot(None),
        )
        duration = sa.case((finished, runs.c.end_time - runs.c.start_time), else_=None)
        query = sa.select(
            runs.c.status,
            sa.func.count().label("n"),
            sa.func.count(duration).label("timed"),
            sa.func.sum(duration).label("total_duration"),
            sa.func.max(duration).label("max_duration"),
        ).group_by(runs.c.status)
        total = successful = failed = timed = 0
        total_duration, max_duration = 0.0, None
        for row in self._sql.fetchall(query):
            total += row["n"]
            if row["status"] == SUCCESS.value:
                successful += row["n"]
            elif row["status"] in {s.value for s in FAILED}:
                failed += row["n"]
            if row["timed"]:
                timed += row["timed"]
                total_duration += float(row["total_duration"])
                max_duration = max(float(row["max_duration"]), max_duration or 0.0)
        avg = total_duration / timed if timed else None
        return DurationStats(total, successful, failed, avg, max_duration)

    def _stats_by_paging(self, filters: RunsFilter) -> DurationStats:
        total = successful = failed = 0
        durations: list[float] = []
        cursor = None
        while True:
            records = self.instance.get_run_records(filters, limit=1000, cursor=cursor)
            for record in records:
                total += 1
                status = record.dagster_run.status
                successful += status is SUCCESS
                failed += status in FAILED
                if status in FINISHED and record.start_time is not None and record.end_time is not None:
                    durations.append(record.end_time - record.start_time)
            if len(records) < 1000:
                break
            cursor = records[-1].dagster_run.run_id
        avg = sum(durations) / len(durations) if durations else None
        return DurationStats(total, successful, failed, avg, max(durations) if durations else None)

    # -- metrics: every nilus pipeline at once (SQL storages only) -------------------------------
    def _tagged_runs(self) -> tuple[sa.Select, sa.Alias, sa.Alias] | None:
        if self._sql is None:
            return None
        tenant = sa.alias(RunTagsTable, "tenant_tag")
        pipeline = sa.alias(RunTagsTable, "pipeline_tag")
        joined = RunsTable.join(
            tenant, sa.and_(tenant.c.run_id == RunsTable.c.run_id, tenant.c.key == TENANT_TAG)
        ).join(pipeline, sa.and_(pipeline.c.run_id == RunsTable.c.run_id, pipeline.c.key == PIPELINE_TAG))
        return (
            sa.select(tenant.c.value.label("tenant"), pipeline.c.value.label("pipeline")).select_from(joined),
            tenant,
            pipeline,
        )

    def status_counts(self) -> dict[tuple[str, str, str], int]:
        """(tenant, pipeline, status) -> number of runs, over all nilus runs."""
        base = self._tagged_runs()
        if base is None or self._sql is None:
            return {}
        select, tenant, pipeline = base
        query = select.add_columns(RunsTable.c.status, sa.func.count().label("n")).group_by(
            tenant.c.value, pipeline.c.value, RunsTable.c.status
        )
        return {(r["tenant"], r["pipeline"], r["status"]): r["n"] for r in self._sql.fetchall(query)}

    def last_finished(self) -> list[LastRun]:
        """The newest finished run of every nilus pipeline."""
        base = self._tagged_runs()
        if base is None or self._sql is None:
            return []
        select, tenant, pipeline = base
        newest = (
            select.add_columns(sa.func.max(RunsTable.c.id).label("id"))
            .where(RunsTable.c.status.in_([s.value for s in FINISHED]))
            .group_by(tenant.c.value, pipeline.c.value)
            .subquery()
        )
        query = sa.select(
            newest.c.tenant,
            newest.c.pipeline,
            RunsTable.c.status,
            RunsTable.c.start_time,
            RunsTable.c.end_time,
        ).select_from(newest.join(RunsTable, RunsTable.c.id == newest.c.id))
        result = []
        for r in self._sql.fetchall(query):
            duration = None
            if r["start_time"] is not None and r["end_time"] is not None:
                duration = float(r["end_time"]) - float(r["start_time"])
            result.append(LastRun(r["tenant"], r["pipeline"], r["status"], duration))
        return result
