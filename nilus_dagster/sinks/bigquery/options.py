"""How the BigQuery sink creates tables: partitioning, clustering and labels (fixed at creation)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from google.cloud import bigquery

if TYPE_CHECKING:
    from nilus_dagster.spec.pipelines import BigQueryTableOptions as TableOptionsSpec

Granularity = Literal["HOUR", "DAY", "MONTH", "YEAR"]


@dataclass(frozen=True)
class ColumnTimePartitioning:
    """Partition by a DATE, DATETIME or TIMESTAMP column."""

    column: str
    granularity: Granularity = "DAY"


@dataclass(frozen=True)
class IngestionTimePartitioning:
    """Partition by load time (the `_PARTITIONTIME` pseudo-column)."""

    granularity: Granularity = "DAY"


@dataclass(frozen=True)
class IntegerRangePartitioning:
    """Partition an INT64 column into `[start, end)` buckets of `interval`."""

    column: str
    start: int
    end: int
    interval: int


Partitioning = ColumnTimePartitioning | IngestionTimePartitioning | IntegerRangePartitioning


@dataclass(frozen=True)
class BigQueryTableOptions:
    """Applied when the sink creates a table (BigQuery fixes partitioning at creation)."""

    partitioning: Partitioning | None = None
    clustering: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.clustering) > 4:
            raise ValueError(f"BigQuery clusters by at most 4 columns, got {list(self.clustering)}")

    def apply_to(self, table: bigquery.Table) -> None:
        match self.partitioning:
            case ColumnTimePartitioning(column, granularity):
                table.time_partitioning = bigquery.TimePartitioning(type_=granularity, field=column)
            case IngestionTimePartitioning(granularity):
                table.time_partitioning = bigquery.TimePartitioning(type_=granularity)
            case IntegerRangePartitioning(column, start, end, interval):
                table.range_partitioning = bigquery.RangePartitioning(
                    field=column, range_=bigquery.PartitionRange(start=start, end=end, interval=interval)
                )
        if self.clustering:
            table.clustering_fields = list(self.clustering)
        if self.labels:
            table.labels = dict(self.labels)


def table_options_from_spec(spec: TableOptionsSpec) -> BigQueryTableOptions:
    partitioning: Partitioning | None = None
    if spec.partition_range is not None:
        if not spec.partition_by:
            raise ValueError("partition_range needs partition_by (the INT64 column to partition on)")
        partitioning = IntegerRangePartitioning(spec.partition_by, *spec.partition_range)
    elif spec.ingestion_time_partitioning:
        partitioning = IngestionTimePartitioning(spec.partition_granularity)
    elif spec.partition_by:
        partitioning = ColumnTimePartitioning(spec.partition_by, spec.partition_granularity)
    return BigQueryTableOptions(partitioning, tuple(spec.clustering), dict(spec.labels))
