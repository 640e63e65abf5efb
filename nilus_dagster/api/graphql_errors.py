"""GraphQL errors we mean to show, and running a read-model call the way every resolver does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from graphql import GraphQLError
from starlette.concurrency import run_in_threadpool
from strawberry.types import Info

from nilus_dagster.api.declarations import DeclarationsUnavailable
from nilus_dagster.api.errors import DAGSTER_STORAGE_ERRORS, ApiError
from nilus_dagster.state.store import StateStoreError

T = TypeVar("T")


class GraphQLApiError(GraphQLError):
    """An error we mean to show (not masked), with `extensions.code` as REST's `code`."""

    def __init__(self, message: str, code: str):
        super().__init__(message, extensions={"code": code})


async def call_model(info: Info, run: Callable[[Any], T]) -> T:
    """`run(read_model)` off the event loop; API errors and outages become GraphQLApiError."""
    try:
        return await run_in_threadpool(run, info.context["model"])
    except ApiError as exc:
        raise GraphQLApiError(exc.message, exc.code) from None
    except (StateStoreError, psycopg.OperationalError, *DAGSTER_STORAGE_ERRORS, DeclarationsUnavailable):
        raise GraphQLApiError("storage is unavailable, retry later", "unavailable") from None
    except psycopg.DataError:
        raise GraphQLApiError("a value cannot be used", "invalid_parameter") from None
