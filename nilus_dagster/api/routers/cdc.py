"""Tenant CDC state: persisted offsets and schema history, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from nilus_dagster.api import models
from nilus_dagster.api.deps import Model, ReadTenant
from nilus_dagster.api.errors import ERROR_RESPONSES
from nilus_dagster.api.params import OffsetFilters, SchemaHistoryFilters

router = APIRouter(prefix="/tenants/{tenant}/cdc", tags=["cdc"], responses=ERROR_RESPONSES)


@router.get("/offset-storage", response_model=models.OffsetsPage)
def offset_storage(tenant: ReadTenant, model: Model, q: Annotated[OffsetFilters, Query()]) -> models.OffsetsPage:
    return model.offsets(tenant, q)


@router.get("/schema-history", response_model=models.SchemaHistoryPage)
def schema_history(
    tenant: ReadTenant, model: Model, q: Annotated[SchemaHistoryFilters, Query()]
) -> models.SchemaHistoryPage:
    return model.schema_history(tenant, q)
