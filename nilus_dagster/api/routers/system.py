"""`/health` and `/info`: any valid token (the seed: every request carries a bearer token)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import dagster
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from nilus_dagster.api import models
from nilus_dagster.api.deps import Model, authenticate, services
from nilus_dagster.api.errors import ERROR_RESPONSES
from nilus_dagster.api.services import Services
from nilus_dagster.api.settings import API_PREFIX, SERVICE_NAME

router = APIRouter(tags=["system"], dependencies=[Depends(authenticate)], responses=ERROR_RESPONSES)


def package_version() -> str:
    try:
        return version("nilus-dagster")
    except PackageNotFoundError:
        return "unknown"


@router.get(
    "/health",
    response_model=models.Health,
    responses={503: {"model": models.Health, "description": "A component failed; `components` says which"}},
)
def health(model: Model) -> JSONResponse:
    """The service, Dagster run storage, the state store and the declarations; 503 if any failed."""
    result = model.health()
    return JSONResponse(result.model_dump(mode="json"), status_code=200 if result.status == "ok" else 503)


@router.get("/info", response_model=models.Info)
def info(svc: Annotated[Services, Depends(services)]) -> models.Info:
    """Service identity: name, version, commit and image when known, Dagster version."""
    return models.Info(
        service=SERVICE_NAME,
        version=package_version(),
        commit=svc.settings.commit,
        image=svc.settings.image,
        dagster_version=dagster.__version__,
        api_base_path=API_PREFIX,
    )
