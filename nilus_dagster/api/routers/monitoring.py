"""Tenant monitoring: pipelines with their latest run, a pipeline's runs, its run stats."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from nilus_dagster.api import models
from nilus_dagster.api.deps import Model, ReadTenant
from nilus_dagster.api.errors import ERROR_RESPONSES, ErrorBody
from nilus_dagster.api.params import TEXT_PATTERN, PipelineFilters, RunFilters, StatsQuery

router = APIRouter(prefix="/tenants/{tenant}/pipelines", tags=["monitoring"], responses=ERROR_RESPONSES)
NOT_FOUND: dict[int | str, dict] = {
    404: {"model": ErrorBody, "description": "The tenant has no pipeline (declared or with runs) of this id"}
}
ResourceId = Annotated[str, Path(pattern=TEXT_PATTERN, description="The pipeline's resource id")]


@router.get("", response_model=models.PipelinesPage)
def list_pipelines(tenant: ReadTenant, model: Model, q: Annotated[PipelineFilters, Query()]) -> models.PipelinesPage:
    """Every pipeline declared for the tenant, by name, with its latest run.

    `resource_id` and `run_as_user` match the declaration; `is_success` and the `started_at`
    filters match the latest run (a pipeline that never ran matches none of them).
    """
    return model.pipelines(tenant, q)


@router.get("/{resource_id}/runs", response_model=models.RunsPage, responses=NOT_FOUND)
def list_runs(
    tenant: ReadTenant, resource_id: ResourceId, model: Model, q: Annotated[RunFilters, Query()]
) -> models.RunsPage:
    """The pipeline's Dagster runs, newest first."""
    return model.runs_page(tenant, resource_id, q)


@router.get("/{resource_id}/stats", response_model=models.StatsResponse, responses=NOT_FOUND)
def pipeline_stats(
    tenant: ReadTenant, resource_id: ResourceId, model: Model, q: Annotated[StatsQuery, Query()]
) -> models.StatsResponse:
    """Run counts and durations over runs created in the last `period`."""
    return model.stats(tenant, resource_id, q)
