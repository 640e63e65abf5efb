"""Which BigQuery errors are worth retrying, and SinkErrors that say what failed, where and why."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import requests
from google.api_core import exceptions as api_errors

from nilus_dagster.sinks.base import SinkError

_TRANSIENT_REASONS = frozenset(
    {"rateLimitExceeded", "quotaExceeded", "backendError", "internalError", "jobRateLimitExceeded"}
)
_TRANSIENT_HTTP = (
    ConnectionError,
    requests.ConnectionError,
    requests.Timeout,
    api_errors.TooManyRequests,
    api_errors.InternalServerError,
    api_errors.BadGateway,
    api_errors.ServiceUnavailable,
    api_errors.GatewayTimeout,
)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: rate limits, quota, server errors, concurrent DML conflicts, dropped connections."""
    if isinstance(exc, _TRANSIENT_HTTP):
        return True
    if isinstance(exc, api_errors.GoogleAPICallError):
        reasons = {error.get("reason") for error in exc.errors or []}
        return bool(reasons & _TRANSIENT_REASONS) or "concurrent update" in str(exc.message)
    return False


def _describe(exc: api_errors.GoogleAPICallError) -> str:
    details = [
        f"{error.get('message', '')}" + (f" (at {error['location']})" if error.get("location") else "")
        for error in (exc.errors or [])[:5]
    ]
    return "; ".join(dict.fromkeys(d for d in details if d)) or str(exc.message)


@contextlib.contextmanager
def sink_errors(action: str, resource: str) -> Iterator[None]:
    """Turn BigQuery API errors into SinkErrors that say what failed, where, and why."""
    try:
        yield
    except SinkError:
        raise
    except api_errors.Forbidden as exc:
        raise SinkError(
            f"BigQuery denied {action} on {resource}: {_describe(exc)}. Grant the credentials the "
            "named permission (roles/bigquery.dataEditor on the dataset, roles/bigquery.jobUser on "
            "the project)"
        ) from exc
    except api_errors.GoogleAPICallError as exc:
        raise SinkError(f"BigQuery failed {action} ({resource}): {_describe(exc)}") from exc
    except (ConnectionError, requests.RequestException) as exc:
        raise SinkError(f"BigQuery unreachable while {action} on {resource}: {exc}") from exc
