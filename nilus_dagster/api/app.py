"""The Nilus Manager monitoring API: `create_app(settings)`.

Routes: REST under `/nilus-manager/api/v1` (bearer token on every route, `/health` and `/info`
included), GraphQL at `/nilus-manager/graphql`; Swagger `/nilus-manager/docs`, ReDoc
`/nilus-manager/redoc` (their assets under `/nilus-manager/static`, no internet needed) and
`/nilus-manager/openapi.json` are open. The metrics server is a
separate app sharing `app.state.metrics_registry` (see `metrics.py`, `server.py`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from nilus_dagster.api.docs import install_docs
from nilus_dagster.api.errors import install_error_handlers
from nilus_dagster.api.graphql import graphql_router
from nilus_dagster.api.metrics import RequestMetricsMiddleware, build_registry
from nilus_dagster.api.routers import cdc, dlq, monitoring, operator, runtime, system
from nilus_dagster.api.routers.system import package_version
from nilus_dagster.api.services import Services
from nilus_dagster.api.settings import API_PREFIX, Settings

ROOT = "/nilus-manager"


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """Build the app; `services` may be injected (tests), else built from `settings` (or the env)."""
    services = services or Services.build(settings or Settings.from_env())
    registry, api_metrics = build_registry(services)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        services.close()

    app = FastAPI(
        title="Nilus Manager API",
        version=package_version(),
        description="Pipeline monitoring, CDC state and the internal runtime API. "
        "Every request needs `Authorization: Bearer <token>`.",
        docs_url=None,  # served by install_docs from packaged assets, not from a CDN
        redoc_url=None,
        openapi_url=f"{ROOT}/openapi.json",
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.metrics_registry = registry
    install_error_handlers(app)
    install_docs(app, ROOT)
    for module in (system, monitoring, cdc, dlq, runtime, operator):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(graphql_router(), prefix=f"{ROOT}/graphql", include_in_schema=False)
    extra_routes = [f"{ROOT}/graphql", f"{ROOT}/docs", f"{ROOT}/redoc", f"{ROOT}/openapi.json"]
    app.add_middleware(
        RequestMetricsMiddleware, metrics=api_metrics, templates=lambda: [*app.openapi()["paths"], *extra_routes]
    )
    return app
