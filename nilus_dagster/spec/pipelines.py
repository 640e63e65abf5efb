"""Pipeline declarations: source tables, sink, mode (batch | cdc), schedule, policies."""

from __future__ import annotations

import re
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import Field, field_validator, model_validator

from nilus_dagster.schema.table import TableName
from nilus_dagster.spec.connections import SpecModel

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
NAME_RULE = "letters, digits and underscores, starting with a letter, at most 63 characters"


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} '{value}' is not valid: use {NAME_RULE}")
    return value


class SourceTable(SpecModel):
    """One source table, optionally loaded incrementally by a cursor column."""

    name: str = Field(description="schema.table, e.g. public.orders")
    cursor: str | None = Field(
        default=None, description="Incremental column (e.g. updated_at or id): only rows above the mark load."
    )
    primary_key: list[str] | None = Field(default=None, description="Overrides the key read from the catalog.")
    sink_table: str | None = Field(default=None, description="Name in the sink; defaults to the table's name.")

    @field_validator("name")
    @classmethod
    def _table_name(cls, value: str) -> str:
        TableName.parse(value)
        return value

    @field_validator("sink_table")
    @classmethod
    def _sink_table(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "sink_table")

    @property
    def table(self) -> TableName:
        return TableName.parse(self.name)

    @property
    def target_name(self) -> str:
        return self.sink_table or self.table.name


class Source(SpecModel):
    connection: str
    tables: list[SourceTable] = Field(min_length=1)

    @field_validator("tables", mode="before")
    @classmethod
    def _strings_are_tables(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _unique_tables(self) -> Source:
        seen: set[str] = set()
        for t in self.tables:
            if t.target_name in seen:
                raise ValueError(
                    f"two tables land in the same sink table '{t.target_name}': give one of them a sink_table"
                )
            seen.add(t.target_name)
        return self


class BigQueryTableOptions(SpecModel):
    """BigQuery-only table options applied when a sink table is created."""

    partition_by: str | None = Field(default=None, description="Column for time or integer-range partitioning.")
    partition_granularity: Literal["HOUR", "DAY", "MONTH", "YEAR"] = "DAY"
    partition_range: tuple[int, int, int] | None = Field(
        default=None, description="Integer range partitioning: [start, end, interval]."
    )
    ingestion_time_partitioning: bool = False
    clustering: list[str] = Field(default_factory=list, max_length=4)
    labels: dict[str, str] = Field(default_factory=dict)


class Sink(SpecModel):
    connection: str
    dataset: str = Field(description="Schema (DuckDB/PostgreSQL) or dataset (BigQuery) tables land in.")
    strategy: Literal["merge", "append", "replace"] = "merge"
    table_options: BigQueryTableOptions | None = None

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        return check_name(value, "dataset")


class CdcOptions(SpecModel):
    """Change-data-capture settings (type: cdc)."""

    snapshot: Literal["initial", "never"] = "initial"
    snapshot_workers: int = Field(default=2, ge=1, le=32)
    snapshot_partition_blocks: int = Field(default=4096, ge=1, description="Heap blocks per snapshot partition.")
    batch_max_rows: int = Field(default=50_000, ge=1)
    batch_max_ms: int = Field(default=1_000, ge=10)
    soft_delete: bool = False
    slot_name: str | None = None
    publication_name: str | None = None
    retry_for: str = Field(
        default="10m",
        description="How long a run keeps reconnecting through a transient fault (source, sink or state store "
        "down) before it fails, e.g. 30s, 10m, 1h.",
    )

    @field_validator("retry_for")
    @classmethod
    def _retry_for(cls, value: str) -> str:
        from nilus_dagster.cdc.retry import parse_duration

        if parse_duration(value) < 0:
            raise ValueError("retry_for must not be negative")
        return value

    @property
    def retry_for_s(self) -> float:
        from nilus_dagster.cdc.retry import parse_duration

        return parse_duration(self.retry_for)

    @field_validator("slot_name", "publication_name")
    @classmethod
    def _pg_name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value, "slot/publication name")


_DURATION = re.compile(r"^(\d+)(s|m|h)$")


class ChecksOptions(SpecModel):
    """Asset checks on every table of a pipeline (shown in Dagster's Checks tab)."""

    severity: Literal["warn", "error"] = Field(
        default="warn", description="How a failed check is reported: warn, or error (fails the asset's check)."
    )
    max_lag: str | None = Field(default=None, description="CDC: the most lag a table may have, e.g. 30s, 5m, 1h.")
    row_count_interval: str | None = Field(
        default="10m",
        description="CDC: how often the row-count parity check counts source and sink (e.g. 10m, 1h); "
        "null turns it off.",
    )

    @field_validator("row_count_interval", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return None if value is False or value == "off" else value  # YAML reads a bare `off` as false

    @field_validator("max_lag", "row_count_interval")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and not _DURATION.match(value):
            raise ValueError(f"'{value}' is not a duration: use a number and s, m or h, e.g. 30s, 5m or 1h")
        return value

    @property
    def max_lag_seconds(self) -> float | None:
        return _seconds(self.max_lag)

    @property
    def row_count_interval_seconds(self) -> float | None:
        return _seconds(self.row_count_interval)


def _seconds(duration: str | None) -> float | None:
    if duration is None:
        return None
    match = _DURATION.match(duration)
    assert match is not None
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


class Pipeline(SpecModel):
    """A pipeline: tables from one source connection into one sink connection."""

    name: str
    tenant: str
    description: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    resource_id: str | None = Field(default=None, description="Defaults to nilus:v1:{name}:{tenant}.")
    type: Literal["batch", "cdc"] = "batch"
    source: Source
    sink: Sink
    schedule: str | None = Field(default=None, description="Cron (batch), e.g. '0 * * * *'.")
    schedule_timezone: str = "UTC"
    schema_changes: Literal["evolve", "pause", "fail"] = "evolve"
    on_error: Literal["dlq", "pause_table", "fail"] = Field(
        default="dlq",
        description="A row the sink cannot take (e.g. NaN into a DECIMAL): dlq (dead-letter it, the rest flows), "
        "pause_table (hold its table), fail (stop the run).",
    )
    run_as_user: str | None = None
    cdc: CdcOptions = Field(default_factory=CdcOptions)
    checks: ChecksOptions = Field(default_factory=ChecksOptions)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "pipeline name")

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        return check_name(value, "tenant")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(
                f"'{value}' is not a cron expression: use five fields, e.g. '0 * * * *' (hourly) "
                "or '*/15 * * * *' (every 15 minutes)"
            )
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"'{value}' is not a time zone: use an IANA name, e.g. 'UTC', 'Europe/Berlin' or 'America/New_York'"
            ) from None
        return value

    @model_validator(mode="after")
    def _mode_rules(self) -> Pipeline:
        if self.type == "cdc" and self.schedule:
            raise ValueError("a cdc pipeline runs continuously: remove 'schedule' (it is for batch pipelines)")
        if self.type == "cdc" and any(t.cursor for t in self.source.tables):
            raise ValueError("'cursor' is for batch pipelines: a cdc pipeline reads every change from the WAL")
        if self.sink.strategy == "replace" and any(t.cursor for t in self.source.tables):
            raise ValueError(
                "strategy replace reloads whole tables, so a 'cursor' would drop older rows: "
                "use strategy merge or append with a cursor"
            )
        if self.type == "batch":
            cdc_only = [f for f in ("cdc", "on_error") if f in self.model_fields_set]
            cdc_only += [f"checks.{f}" for f in ("max_lag", "row_count_interval") if f in self.checks.model_fields_set]
            if cdc_only:
                raise ValueError(
                    f"{', '.join(cdc_only)} only apply to cdc pipelines: remove them, or set type: cdc"
                )
        if self.type == "cdc" and self.sink.strategy != "merge":
            raise ValueError("a cdc pipeline applies changes by key: set sink.strategy to merge (the default)")
        return self

    @property
    def effective_resource_id(self) -> str:
        return self.resource_id or f"nilus:v1:{self.name}:{self.tenant}"

    @property
    def job_name(self) -> str:
        return f"{self.tenant}__{self.name}"
