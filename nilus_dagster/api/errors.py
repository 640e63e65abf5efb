"""Every error is JSON `{"error", "code"}`: auth, validation, storage outages, unknown routes."""

from __future__ import annotations

import logging

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nilus_dagster.api.declarations import DeclarationsUnavailable
from nilus_dagster.state.store import StateStoreError

log = logging.getLogger(__name__)

try:  # dagster-postgres' "too many retries for DB connection"
    from dagster_postgres.utils import DagsterPostgresException
except ImportError:  # pragma: no cover - dagster-postgres is a dependency

    class DagsterPostgresException(Exception):  # type: ignore[no-redef]
        pass


# Exceptions meaning Dagster's run storage did not answer (a 503, never a 500).
DAGSTER_STORAGE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, DagsterPostgresException)

_CODES = {
    400: "invalid_parameter",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    422: "invalid_parameter",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    error: str
    code: str


class ApiError(Exception):
    """Raise anywhere in a request to answer `status` with `{"error": message, "code": code}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def unauthorized(message: str = "missing or invalid bearer token") -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def unavailable(part: str) -> ApiError:
    return ApiError(503, "unavailable", f"{part} is unavailable, retry later")


# OpenAPI: documented on every route that needs a token.
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorBody, "description": "The request body cannot be parsed"},
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
    403: {"model": ErrorBody, "description": "The token may not access this tenant or scope"},
    422: {"model": ErrorBody, "description": "A parameter is invalid; the error names it"},
    503: {"model": ErrorBody, "description": "Dagster storage or the state store is unreachable"},
}


def _body(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def _describe(errors: list[dict]) -> str:
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body", "header")]
        name = ".".join(loc) or "request"
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _body(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _body(422, "invalid_parameter", _describe(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return _body(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(StateStoreError)
    @app.exception_handler(psycopg.OperationalError)
    async def _store_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("state store error: %s", exc)
        return _body(503, "unavailable", "the state store is unavailable, retry later")

    @app.exception_handler(DeclarationsUnavailable)
    async def _no_declarations(_: Request, exc: Exception) -> JSONResponse:
        log.warning("declarations unavailable: %s", exc)
        return _body(503, "unavailable", "pipeline declarations are unavailable, retry later")

    @app.exception_handler(psycopg.DataError)
    async def _bad_data(_: Request, exc: Exception) -> JSONResponse:
        # A value PostgreSQL cannot store (NUL bytes, NaN in JSON...): the caller's fault.
        return _body(422, "invalid_parameter", f"a value cannot be stored: {str(exc).splitlines()[0]}")

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(DagsterPostgresException)
    async def _dagster_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dagster storage error: %s", exc)
        return _body(503, "unavailable", "Dagster run storage is unavailable, retry later")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _body(500, "internal_error", "internal error")
