"""Dagster run storage queries for one pipeline (tenant + resource_id tags), all server-side.

Counts, pages and stats use narrow SQL built from Dagster's own run filters
(`SqlRunStorage._add_filters_to_table/_query`, the same tag joins as `get_runs_count`) so offsets, sums and
maxima are computed by the database instead of by decoding every run. Each is one statement:
a runs page and its total come from one window query (the tag join is the expensive part, ~2
index probes per matching run, so it runs once per request); the latest runs of a page of
pipelines come from one UNION of "newest runs of job X" reads on Dagster's (job, id) index, and
only the run bodies actually looked at are decoded. Non-SQL storages fall back to the public
cursor API.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from dagster import DagsterInstance, DagsterRunStatus, RunRecord, RunsFilter
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.runs.sql_run_storage import SqlRunStorage
from dagster._time import utc_datetime_from_naive

from nilus_dagster.components.tags import PIPELINE_TAG, RESOURCE_ID_TAG, RUN_AS_USER_TAG, TENANT_TAG

SUCCESS = DagsterRunStatus.SUCCESS
FAILED = (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
FINISHED = (SUCCESS, *FAILED)
NOT_SUCCESS = tuple(s for s in DagsterRunStatus if s is not SUCCESS)

# How many of a job's newest runs `latest` looks at for a lower bound, and how many jobs (or
# pipelines) one UNION statement reads at most.
LATEST_BY_JOB = 5
# At most this many runs newer than a pipeline job's latest are walked for a newer tagged run.
ABOVE_BOUND_SCAN = 5000
LATEST_JOBS_PER_QUERY = 50


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
        """The newest run with the pipeline's tenant and resource_id tags (see `latest_many`)."""
        return self.latest_many([(tenant, resource_id, job_name)])[0]

    def latest_many(self, pipelines: Sequence[tuple[str, str, str | None]]) -> list[RunRecord | None]:
        """The newest run with each (tenant, resource_id) pair of tags, in order; any job counts.

        The same runs as the runs list and stats: a pipeline's scheduled and sensor runs (its own
        job) and "Materialize" runs (Dagster's asset job) alike. On SQL storages two statements
        for a whole page: the newest runs of each pipeline's job (`job_name`, tenant-prefixed) by
        Dagster's (job, id) index, the first whose tags match giving a lower bound; then the runs
        above the lowest bound, whatever their job (`_newer_tagged_runs`). The bound keeps the
        second read short (only runs newer than the jobs' latest) where the tag join alone would
        grow with the pipeline's history. Other storages: the tag query per pipeline.
        """
        if self._sql is None:
            return [self._latest_by_tags(tenant, resource_id) for tenant, resource_id, _ in pipelines]
        found: list[RunRecord | None] = [None] * len(pipelines)
        jobs = sorted({job for _, _, job in pipelines if job is not None})
        newest: dict[str, list[dict[str, Any]]] = {}
        for chunk in _chunks(jobs, LATEST_JOBS_PER_QUERY):
            for row in self._sql.fetchall(self._newest_of_jobs(chunk)):
                newest.setdefault(row["pipeline_name"], []).append(row)
        for i, (tenant, resource_id, job) in enumerate(pipelines):
            for row in sorted(newest.get(job, ()) if job else (), key=lambda r: r["id"], reverse=True):
                record = self._record(row)
                tags = record.dagster_run.tags
                if tags.get(TENANT_TAG) == tenant and tags.get(RESOURCE_ID_TAG) == resource_id:
                    found[i] = record
                    break
        newer = self._newer_tagged_runs(pipelines, found)
        if newer:  # rare (e.g. a Materialize run is the newest): read those records by primary key
            query = sa.select(*self._record_columns()).where(RunsTable.c.id.in_(sorted(set(newer.values()))))
            records = {row["id"]: self._record(row) for row in self._sql.fetchall(query)}
            for i, run_id in newer.items():
                found[i] = records[run_id]
        return found

    def _latest_by_tags(self, tenant: str, resource_id: str) -> RunRecord | None:
        records = self.instance.get_run_records(pipeline_filter(tenant, resource_id), limit=1)
        return records[0] if records else None

    def _newer_tagged_runs(
        self, pipelines: Sequence[tuple[str, str, str | None]], found: Sequence[RunRecord | None]
    ) -> dict[int, int]:
        """Pipeline index -> id of its newest run with its tags newer than `found[i]` (any job).

        One statement walks the `ABOVE_BOUND_SCAN` newest runs above the lowest bound, newest first
        by primary key, with their tenant and resource_id tag rows (read by run_id). A pipeline
        whose range that walk did not cover, or that has no bound, gets Dagster's tag join.
        """
        assert self._sql is not None
        bounds = {i: record.storage_id for i, record in enumerate(found) if record is not None}
        tags: dict[int, dict[str, str]] = {}
        if bounds:
            recent = (
                sa.select(RunsTable.c.id, RunsTable.c.run_id)
                .where(RunsTable.c.id > min(bounds.values()))
                .order_by(RunsTable.c.id.desc())
                .limit(ABOVE_BOUND_SCAN)
                .subquery()
            )
            keys = [TENANT_TAG, RESOURCE_ID_TAG]
            on = sa.and_(RunTagsTable.c.run_id == recent.c.run_id, RunTagsTable.c.key.in_(keys))
            query = sa.select(recent.c.id, RunTagsTable.c.key, RunTagsTable.c.value).select_from(
                recent.outerjoin(RunTagsTable, on)
            )
            for row in self._sql.fetchall(query):
                run_tags = tags.setdefault(row["id"], {})
                if row["key"] is not None:
                    run_tags[row["key"]] = row["value"]
        complete = len(tags) < ABOVE_BOUND_SCAN  # the walk reached the lowest bound
        lowest = min(tags, default=None)
        newer: dict[int, int] = {}
        for i, (tenant, resource_id, _) in enumerate(pipelines):
            bound = bounds.get(i)
            if bound is not None and (complete or (lowest is not None and bound >= lowest)):
                wanted = {TENANT_TAG: tenant, RESOURCE_ID_TAG: resource_id}
                ids = [run_id for run_id, t in tags.items() if run_id > bound and t == wanted]
                if ids:
                    newer[i] = max(ids)
                continue
            query = self._matching(pipeline_filter(tenant, resource_id), RunsTable.c.id)
            if bound is not None:
                query = query.where(RunsTable.c.id > bound)
            rows = self._sql.fetchall(query.order_by(RunsTable.c.id.desc()).limit(1))
            if rows:
                newer[i] = rows[0]["id"]
        return newer

    def _newest_of_jobs(self, jobs: Sequence[str]) -> sa.Select | sa.CompoundSelect:
        """The `LATEST_BY_JOB` newest runs of each job (record columns + job name), one statement."""
        columns = [*self._record_columns(), RunsTable.c.pipeline_name]
        selects = [
            sa.select(*columns)
            .where(RunsTable.c.pipeline_name == job)
            .order_by(RunsTable.c.id.desc())
            .limit(LATEST_BY_JOB)
            .subquery()
            for job in jobs
        ]
        parts = [sa.select(*sub.c) for sub in selects]  # a subquery each: SQLite allows no LIMIT in UNION arms
        return parts[0] if len(parts) == 1 else sa.union_all(*parts)

    def _record_columns(self) -> list[sa.ColumnElement]:
        """The columns Dagster's `get_run_records` reads to build a `RunRecord`."""
        names = ["id", "run_body", "status", "create_timestamp", "update_timestamp"]
        if self._sql is not None and self._sql.has_run_stats_index_cols():
            names += ["start_time", "end_time"]
        return [getattr(RunsTable.c, name) for name in names]

    def _record(self, row: Any) -> RunRecord:
        """A `RunRecord` from a row of `_record_columns`, exactly as `get_run_records` builds it."""
        assert self._sql is not None
        return RunRecord(
            storage_id=row["id"],
            dagster_run=self._sql._row_to_run(row),
            create_timestamp=utc_datetime_from_naive(row["create_timestamp"]),
            update_timestamp=utc_datetime_from_naive(row["update_timestamp"]),
            start_time=row.get("start_time"),
            end_time=row.get("end_time"),
        )

    def _matching(self, filters: RunsFilter, *columns: sa.ColumnElement) -> sa.Select:
        """`columns` of the runs matching `filters`: Dagster's tag joins and filters, no ORDER BY."""
        assert self._sql is not None
        table = self._sql._add_filters_to_table(RunsTable, filters)
        return self._sql._add_filters_to_query(sa.select(*columns).select_from(table), filters)

    def count(self, filters: RunsFilter) -> int:
        if self._sql is None:
            return self.instance.get_runs_count(filters)
        # Same joins as get_runs_count, without its run_body column and ORDER BY: the runs table
        # is only joined on run_id (its unique index), nothing is sorted.
        query = sa.select(sa.func.count().label("count")).select_from(
            self._matching(filters, RunsTable.c.run_id).subquery()
        )
        rows = self._sql.fetchall(query)
        return rows[0]["count"] if rows else 0

    def page_and_total(self, filters: RunsFilter, limit: int, offset: int) -> tuple[list[RunRecord], int]:
        """One page (newest first, `offset` applied by the database) and the number of matching runs."""
        if self._sql is None:
            total = self.count(filters)
            return (self.page(filters, limit, offset) if offset < total else []), total
        # The tag join runs once: the window count is taken over every match before LIMIT/OFFSET,
        # then only the page's rows are read back from runs by primary key.
        ids = (
            self._matching(filters, RunsTable.c.id, sa.func.count().over().label("total"))
            .order_by(RunsTable.c.id.desc())
            .limit(limit)
            .offset(offset)
            .subquery()
        )
        query = (
            sa.select(*self._record_columns(), ids.c.total)
            .select_from(ids.join(RunsTable, RunsTable.c.id == ids.c.id))
            .order_by(RunsTable.c.id.desc())
        )
        rows = self._sql.fetchall(query)
        if rows:
            return [self._record(row) for row in rows], rows[0]["total"]
        # An empty page says nothing about the total: at offset 0 there is none, else count.
        return [], (self.count(filters) if offset else 0)

    def page(self, filters: RunsFilter, limit: int, offset: int) -> list[RunRecord]:
        """Newest first; `offset` is applied by the database."""
        if self._sql is not None:
            return self.page_and_total(filters, limit, offset)[0]
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
        runs = self._matching(filters, RunsTable.c.status, RunsTable.c.start_time, RunsTable.c.end_time).subquery()
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


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
