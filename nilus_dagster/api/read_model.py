"""The monitoring read model, shared by REST and GraphQL: declarations + run storage + state store.

Pipelines come from the defs folder (a pipeline that never ran is listed, with `latest_run`
null). Runs, latest runs and stats come from Dagster run storage filtered server-side by the
`nilus/tenant` and `nilus/resource_id` run tags. CDC records come from the state store.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from dagster import RunRecord

from nilus_dagster.api import models
from nilus_dagster.api.declarations import Declarations, DeclarationsUnavailable
from nilus_dagster.api.errors import ApiError
from nilus_dagster.api.params import (
    OffsetFilters,
    PipelineFilters,
    RunFilters,
    SchemaHistoryFilters,
    StatsQuery,
)
from nilus_dagster.api.runs import FINISHED, NOT_SUCCESS, SUCCESS, RunReader, pipeline_filter
from nilus_dagster.components.tags import PIPELINE_TAG, RESOURCE_ID_TAG, RUN_AS_USER_TAG
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state.control import ControlStore
from nilus_dagster.state.store import StateStore

log = logging.getLogger(__name__)


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class ReadModel:
    def __init__(self, declarations: Declarations, runs: RunReader, store: StateStore | None, ui_url: str):
        self.declarations = declarations
        self.runs = runs
        self._store = store
        self.ui_url = ui_url

    @property
    def store(self) -> StateStore:
        if self._store is None:
            raise ApiError(503, "unavailable", "the state store is not configured (NILUS_STATE_DSN)")
        return self._store

    def run(self, record: RunRecord) -> models.Run:
        run = record.dagster_run
        ended = record.end_time if run.status in FINISHED else None
        duration = None
        if record.start_time is not None and ended is not None:
            duration = round(ended - record.start_time, 3)
        return models.Run(
            run_id=run.run_id,
            job_name=run.job_name,
            pipeline_name=run.tags.get(PIPELINE_TAG),
            resource_id=run.tags.get(RESOURCE_ID_TAG),
            status=run.status.value,
            is_success=run.status is SUCCESS,
            created_at=record.create_timestamp,
            started_at=_ts(record.start_time),
            ended_at=_ts(ended),
            duration_sec=duration,
            run_as_user=run.tags.get(RUN_AS_USER_TAG),
            dagster_url=f"{self.ui_url}/runs/{run.run_id}",
        )

    # -- pipelines -------------------------------------------------------------------------------
    def pipelines(self, tenant: str, q: PipelineFilters) -> models.PipelinesPage:
        declared = [
            p
            for p in self.declarations.for_tenant(tenant)
            if (q.resource_id is None or p.effective_resource_id == q.resource_id)
            and (q.run_as_user is None or p.run_as_user == q.run_as_user)
            and q.labels_match(p.labels)
        ]
        if q.filters_on_runs:
            latest = self._latest(tenant, declared)
            declared = [p for p in declared if self._matches(latest[p.name], q)]
        page = declared[q.offset : q.offset + q.limit]
        if not q.filters_on_runs:
            latest = self._latest(tenant, page)
        states = self._states(tenant) if page else {}
        rows = [
            models.Pipeline(
                pipeline_name=p.name,
                tenant=p.tenant,
                resource_id=p.effective_resource_id,
                type=p.type,
                description=p.description,
                labels=p.labels,
                run_as_user=p.run_as_user,
                job_name=p.job_name,
                schedule=p.schedule,
                state=states.get(p.name),
                latest_run=latest[p.name],
            )
            for p in page
        ]
        return models.PipelinesPage(pipelines=rows, limit=q.limit, offset=q.offset, total=len(declared))

    def _latest(self, tenant: str, pipelines: list[Pipeline]) -> dict[str, models.Run | None]:
        """Each pipeline's latest run, by name (one run-storage read for the whole list)."""
        records = self.runs.latest_many([(tenant, p.effective_resource_id, p.job_name) for p in pipelines])
        return {p.name: (self.run(r) if r else None) for p, r in zip(pipelines, records, strict=True)}

    @staticmethod
    def _matches(run: models.Run | None, q: PipelineFilters) -> bool:
        if run is None:
            return False
        if q.is_success is not None and run.is_success != q.is_success:
            return False
        lower, upper, inclusive = q.started_window()
        if lower is None and upper is None:
            return True
        started = run.started_at
        if started is None or (lower is not None and started < lower):
            return False
        return upper is None or (started <= upper if inclusive else started < upper)

    def _states(self, tenant: str) -> dict[str, str]:
        if self._store is None:
            return {}
        try:
            states = {s.pipeline: s.state for s in self._store.list_pipeline_states(tenant)}
            holds = ControlStore(self._store).for_tenant(tenant)
            return {**states, **{name: h.desired for name, h in holds.items() if h.held}}  # an operator's hold wins
        except Exception as exc:  # state is an extra: monitoring of runs works without it
            log.warning("pipeline states unavailable: %s", exc)
            return {}

    # -- runs and stats --------------------------------------------------------------------------
    def runs_page(self, tenant: str, resource_id: str, q: RunFilters) -> models.RunsPage:
        statuses = None if q.is_success is None else ([SUCCESS] if q.is_success else NOT_SUCCESS)
        filters = pipeline_filter(tenant, resource_id, statuses=statuses, run_as_user=q.run_as_user)
        records, total = self.runs.page_and_total(filters, q.limit, q.offset)
        if not total:
            self._ensure_known(tenant, resource_id)
        return models.RunsPage(
            resource_id=resource_id,
            runs=[self.run(r) for r in records],
            limit=q.limit,
            offset=q.offset,
            total=total,
        )

    def stats(self, tenant: str, resource_id: str, q: StatsQuery, now: datetime | None = None) -> models.StatsResponse:
        end = now or datetime.now(UTC)
        start = end - q.span()
        agg = self.runs.stats(pipeline_filter(tenant, resource_id, created_after=start))
        if not agg.total:
            self._ensure_known(tenant, resource_id)
        finished = agg.successful + agg.failed
        return models.StatsResponse(
            resource_id=resource_id,
            period=q.period,
            period_start=start,
            period_end=end,
            stats=models.RunStats(
                total_runs=agg.total,
                successful_runs=agg.successful,
                failed_runs=agg.failed,
                success_rate=round(100.0 * agg.successful / finished, 2) if finished else 0.0,
                avg_duration_sec=None if agg.avg_duration is None else round(agg.avg_duration, 3),
                max_duration_sec=None if agg.max_duration is None else round(agg.max_duration, 3),
            ),
        )

    def _ensure_known(self, tenant: str, resource_id: str) -> None:
        """404 unless the tenant declares a pipeline with `resource_id` or has runs tagged with it
        (a pipeline removed from the YAML keeps its history)."""
        try:
            if any(p.effective_resource_id == resource_id for p in self.declarations.for_tenant(tenant)):
                return
        except DeclarationsUnavailable:
            if self.runs.count(pipeline_filter(tenant, resource_id)):
                return
            raise
        if not self.runs.count(pipeline_filter(tenant, resource_id)):
            raise ApiError(404, "not_found", "the tenant has no pipeline with this resource_id")

    # -- CDC state -------------------------------------------------------------------------------
    def offsets(self, tenant: str, q: OffsetFilters) -> models.OffsetsPage:
        page = self.store.list_offsets(
            tenant,
            resource_id=q.resource_id,
            connector_name=q.connector_name,
            offset_key=q.offset_key,
            inserted_gte=q.record_insert_ts_gte,
            inserted_lte=q.record_insert_ts_lte,
            limit=q.limit,
            offset=q.offset,
        )
        return models.OffsetsPage(
            offsets=[offset_record(r) for r in page.items], limit=q.limit, offset=q.offset, total=page.total
        )

    def schema_history(self, tenant: str, q: SchemaHistoryFilters) -> models.SchemaHistoryPage:
        page = self.store.list_schema_history(
            tenant,
            resource_id=q.resource_id,
            connector_name=q.connector_name,
            inserted_gte=q.record_insert_ts_gte,
            inserted_lte=q.record_insert_ts_lte,
            limit=q.limit,
            offset=q.offset,
        )
        return models.SchemaHistoryPage(
            schema_history=[schema_record(r) for r in page.items],
            limit=q.limit,
            offset=q.offset,
            total=page.total,
        )

    # -- health ----------------------------------------------------------------------------------
    def health(self) -> models.Health:
        components = {"service": models.ComponentHealth(ok=True)}
        components["dagster_storage"] = _probe(self.runs.ping)
        components["state_store"] = (
            _probe(self._store.ping)
            if self._store is not None
            else models.ComponentHealth(ok=False, detail="not configured (NILUS_STATE_DSN)")
        )
        declarations_error = self.declarations.check()
        components["declarations"] = models.ComponentHealth(
            ok=declarations_error is None,
            detail=None if declarations_error is None else "defs folder failed to load",
        )
        ok = all(c.ok for c in components.values())
        return models.Health(status="ok" if ok else "error", components=components)


def _probe(check) -> models.ComponentHealth:
    try:
        check()
    except Exception as exc:
        log.warning("health probe failed: %s", exc)
        return models.ComponentHealth(ok=False, detail="unreachable")
    return models.ComponentHealth(ok=True)


def offset_record(r) -> models.OffsetRecord:
    return models.OffsetRecord(
        id=r.id,
        pipeline_name=r.pipeline,
        resource_id=r.resource_id,
        connector_name=r.connector_name,
        offset_key=r.offset_key,
        offset_value=r.offset_value,
        run_id=r.run_id,
        record_insert_ts=r.record_insert_ts,
    )


def schema_record(r) -> models.SchemaHistoryRecord:
    return models.SchemaHistoryRecord(
        id=r.id,
        pipeline_name=r.pipeline,
        resource_id=r.resource_id,
        connector_name=r.connector_name,
        table_name=r.table_name,
        table_schema=r.table_schema,
        lsn=r.lsn,
        record_insert_ts=r.record_insert_ts,
    )
