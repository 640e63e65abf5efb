"""Query parameters as pydantic models: REST (FastAPI query models) and GraphQL validate alike."""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_OFFSET = 10_000_000
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,62}$"  # tenants and pipeline names (spec rule)
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"  # ids and labels: printable, bounded
_PERIOD = re.compile(r"^([1-9][0-9]{0,3})([hd])$")
MAX_PERIOD = timedelta(days=365)


def _to_utc(value: datetime) -> datetime:
    """Naive timestamps are UTC; aware ones are converted."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("timestamp out of range") from None


def _clean_json(value: Any, depth: int = 0) -> Any:
    """JSON PostgreSQL can store: no NUL or lone surrogates in strings, finite numbers, bounded depth."""
    if depth > 64:
        raise ValueError("JSON nested too deeply")
    if isinstance(value, str):
        if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value):
            raise ValueError("strings may not contain NUL characters or lone surrogates")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    elif isinstance(value, dict):
        for key, item in value.items():
            _clean_json(key, depth + 1)
            _clean_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _clean_json(item, depth + 1)
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_clean_json)]
Text = Annotated[str, Field(pattern=TEXT_PATTERN)]


def parse_period(period: str) -> timedelta:
    match = _PERIOD.match(period)
    if not match:
        raise ValueError("period must look like 24h, 7d or 30d")
    amount, unit = int(match.group(1)), match.group(2)
    span = timedelta(hours=amount) if unit == "h" else timedelta(days=amount)
    if span > MAX_PERIOD:
        raise ValueError("period may not exceed 365d")
    return span


class _Query(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Paging(_Query):
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=f"Page size, at most {MAX_LIMIT}")
    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="Rows to skip")


class PipelineFilters(Paging):
    """Filters on a pipeline (`resource_id`, `run_as_user` as declared) or on its latest run."""

    run_as_user: Text | None = Field(None, description="The pipeline's declared run_as_user")
    is_success: bool | None = Field(None, description="Latest run succeeded (true) or ended otherwise (false)")
    resource_id: Text | None = None
    started_at: date | UtcDatetime | None = Field(
        None,
        union_mode="left_to_right",
        description="Latest run started on this UTC day (YYYY-MM-DD) or in this second (timestamp)",
    )
    started_at_gte: UtcDatetime | None = Field(None, description="Latest run started at or after")
    started_at_lte: UtcDatetime | None = Field(None, description="Latest run started at or before")
    label: list[Text] | None = Field(
        None,
        max_length=20,
        description="`key:value` (or `key`: any value) among the declared labels; repeated labels must all match",
    )

    def labels_match(self, labels: dict[str, str]) -> bool:
        """Every `label` filter matches (AND); `key` alone matches any value of that key."""
        for wanted in self.label or ():
            name, sep, value = wanted.partition(":")
            if name not in labels or (sep and labels[name] != value):
                return False
        return True

    def started_window(self) -> tuple[datetime | None, datetime | None, bool]:
        """(lower, upper, upper_inclusive) bounds on the latest run's start, combining all filters."""
        lower, upper, inclusive = self.started_at_gte, self.started_at_lte, True
        if self.started_at is not None:
            if isinstance(self.started_at, datetime):
                start = self.started_at.replace(microsecond=0)
                span = timedelta(seconds=1)
            else:
                start = datetime(self.started_at.year, self.started_at.month, self.started_at.day, tzinfo=UTC)
                span = timedelta(days=1)
            lower = start if lower is None else max(lower, start)
            if upper is None or upper >= start + span:
                upper, inclusive = start + span, False
        return lower, upper, inclusive

    @property
    def filters_on_runs(self) -> bool:
        return self.is_success is not None or any(self.started_window()[:2])


class RunFilters(Paging):
    is_success: bool | None = Field(None, description="Only SUCCESS runs (true) or only other runs (false)")
    run_as_user: Text | None = Field(None, description="The run's nilus/run_as_user tag")


class StatsQuery(_Query):
    period: str = Field(
        "24h",
        pattern=_PERIOD.pattern,
        description="Window ending now: Nh or Nd, e.g. 24h, 7d, 30d (at most 365d)",
    )

    @field_validator("period")
    @classmethod
    def _period(cls, value: str) -> str:
        parse_period(value)
        return value

    def span(self) -> timedelta:
        return parse_period(self.period)


class _CdcFilters(Paging):
    resource_id: Text | None = None
    connector_name: Text | None = None
    record_insert_ts_gte: UtcDatetime | None = None
    record_insert_ts_lte: UtcDatetime | None = None


class OffsetFilters(_CdcFilters):
    offset_key: Text | None = None


class SchemaHistoryFilters(_CdcFilters):
    pass


class TableFailureFilters(_Query):
    pipeline: Annotated[str | None, Field(pattern=NAME_PATTERN, description="Only this pipeline's tables")] = None
