"""BigQuery sink: Parquet load jobs, MERGE by primary key, CDC MERGE de-duplicated by LSN.

BigQuery commits each job on its own, so the checkpoint (a row of `_nilus_checkpoints` in the
sink's dataset) is written only after the data job succeeded, and every data job is idempotent:
a replay after a crash between the two changes nothing.

- append: one load job whose id is derived from the target, the checkpoint and the data; a replay
  finds that job done and skips it. Without a checkpoint an append is not replay-safe.
- replace: load into a staging table, then `DELETE` + `INSERT ... SELECT` in one transaction
  (readers see the old or the new rows; the table keeps its options, policies and description).
- merge: load into a staging table, then one MERGE by primary key (the last row per key wins).
- CDC: load the ChangeSet into a staging table, then one MERGE keeping the last change per key
  by `_nilus_lsn` and touching a row only when the staged LSN is newer than the row's. A truncate
  is part of that MERGE (`WHEN NOT MATCHED BY SOURCE`) and removes only rows older than the
  batch, so a replay keeps what the first attempt wrote.

Loads never pass a schema: the target (or staging) table exists first and its schema applies,
so a load can neither drop nor retype a column.

Transient errors (rate limits, quota, 5xx, concurrent-update conflicts) are retried with
backoff; everything else becomes a SinkError naming the table, the job and BigQuery's reasons.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests
from google.api_core import exceptions as api_errors
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.oauth2 import service_account

from nilus_dagster.schema import Column, TableSchema, arrow_schema
from nilus_dagster.sinks.base import (
    CHECKPOINT_TABLE,
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    ChangeSet,
    Checkpoint,
    ChunkedApplyUnsupported,
    SinkError,
    SinkTable,
    WriteResult,
    WriteStrategy,
)
from nilus_dagster.sinks.bigquery_types import TOASTABLE_KINDS, bigquery_field, bigquery_fields, to_load_table

if TYPE_CHECKING:
    from nilus_dagster.spec.connections import BigQueryConnection
    from nilus_dagster.spec.pipelines import BigQueryTableOptions as TableOptionsSpec

# Where checkpoints live when the connection names no dataset.
DEFAULT_STATE_DATASET = "nilus_state"

CDC_FIELDS = (
    bigquery.SchemaField(LSN_COLUMN, "INT64"),
    bigquery.SchemaField(OP_COLUMN, "STRING"),
    bigquery.SchemaField(SYNCED_AT_COLUMN, "TIMESTAMP"),
    bigquery.SchemaField(DELETED_COLUMN, "BOOL"),
)
_CHANGE_FIELDS = (
    bigquery.SchemaField(LSN_COLUMN, "INT64"),
    bigquery.SchemaField(OP_COLUMN, "STRING"),
    bigquery.SchemaField(UNCHANGED_COLUMN, "STRING", mode="REPEATED"),
)
_ROW_NUMBER = "_nilus_row"
_CHECKPOINT_FIELDS = (
    bigquery.SchemaField("key", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("value", "STRING"),
    bigquery.SchemaField("updated_at", "TIMESTAMP"),
)
_CDC_KEY_FIX = "declare primary_key for the table in the pipeline"
_STAGING_LIFETIME = dt.timedelta(days=1)  # a crashed run's staging table expires by itself
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

# --- table options ------------------------------------------------------------------------------

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


# --- errors and retries -------------------------------------------------------------------------


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
def _sink_errors(action: str, resource: str) -> Iterator[None]:
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


# --- SQL ----------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return f"`{name}`"


def _columns(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{_quote(n)}" for n in names)


def _key_match(keys: Sequence[str]) -> str:
    return " AND ".join(f"T.{_quote(k)} = S.{_quote(k)}" for k in keys)


def _latest_per_key(stage: str, keys: Sequence[str], order_by: str) -> str:
    partition = _columns(keys)
    return (
        f"(SELECT * FROM {stage} WHERE TRUE "
        f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY {_quote(order_by)} DESC) = 1)"
    )


def batch_merge_sql(target: str, stage: str, schema: TableSchema) -> str:
    """Upsert the staged rows by primary key; the last staged row per key wins."""
    keys, names = schema.primary_key, schema.column_names
    updates = ", ".join(f"{_quote(n)} = S.{_quote(n)}" for n in names if n not in keys)
    matched = f"WHEN MATCHED THEN UPDATE SET {updates} " if updates else ""
    return (
        f"MERGE {target} T USING {_latest_per_key(stage, keys, _ROW_NUMBER)} S ON {_key_match(keys)} "
        f"{matched}WHEN NOT MATCHED THEN INSERT ({_columns(names)}) VALUES ({_columns(names, 'S.')})"
    )


def cdc_merge_sql(
    target: str, stage: str, schema: TableSchema, *, soft_delete: bool, truncate_before: int | None = None
) -> str:
    """One MERGE applying staged changes newer than each row; unchanged TOASTed values are kept.

    Only columns PostgreSQL can TOAST get the `IF(... IN UNNEST(...))` guard, which keeps the
    statement compact for wide tables. With `truncate_before` (the batch's first LSN) the same
    statement also removes the rows the batch does not touch and that are older than the batch.
    """
    keys = schema.primary_key
    lsn, op = _quote(LSN_COLUMN), _quote(OP_COLUMN)
    newer = f"(T.{lsn} IS NULL OR S.{lsn} > T.{lsn})"
    unchanged = f"S.{_quote(UNCHANGED_COLUMN)}"

    def new_value(name: str, kind: str) -> str:
        if kind in TOASTABLE_KINDS:
            return f"IF('{name}' IN UNNEST({unchanged}), T.{_quote(name)}, S.{_quote(name)})"
        return f"S.{_quote(name)}"

    updates = [
        f"{_quote(c.name)} = {new_value(c.name, c.type.kind)}" for c in schema.columns if c.name not in keys
    ]
    now = "CURRENT_TIMESTAMP()"
    updates += [f"{lsn} = S.{lsn}", f"{op} = S.{op}", f"{_quote(SYNCED_AT_COLUMN)} = {now}"]
    updates.append(f"{_quote(DELETED_COLUMN)} = FALSE")
    delete = f"{_soft_delete()}, {lsn} = S.{lsn}" if soft_delete else "DELETE"
    inserted = [*schema.column_names, LSN_COLUMN, OP_COLUMN, SYNCED_AT_COLUMN, DELETED_COLUMN]
    values = f"{_columns([*schema.column_names, LSN_COLUMN, OP_COLUMN], 'S.')}, {now}, FALSE"
    merge = (
        f"MERGE {target} T USING {_latest_per_key(stage, keys, LSN_COLUMN)} S ON {_key_match(keys)} "
        f"WHEN MATCHED AND S.{op} = 'D' AND {newer} THEN {delete} "
        f"WHEN MATCHED AND {newer} THEN UPDATE SET {', '.join(updates)} "
        f"WHEN NOT MATCHED AND S.{op} != 'D' THEN INSERT ({_columns(inserted)}) VALUES ({values})"
    )
    if truncate_before is None:
        return merge
    older = f"(T.{lsn} IS NULL OR T.{lsn} < {int(truncate_before)})"
    truncated = _soft_delete() if soft_delete else "DELETE"
    if soft_delete:
        older += f" AND NOT IFNULL(T.{_quote(DELETED_COLUMN)}, FALSE)"
    return f"{merge} WHEN NOT MATCHED BY SOURCE AND {older} THEN {truncated}"


def _soft_delete() -> str:
    return (
        f"UPDATE SET {_quote(DELETED_COLUMN)} = TRUE, {_quote(OP_COLUMN)} = 'D', "
        f"{_quote(SYNCED_AT_COLUMN)} = CURRENT_TIMESTAMP()"
    )


def truncate_sql(target: str, *, soft_delete: bool) -> str:
    """A truncate with no other change in its batch: delete (or soft-delete) every row."""
    if not soft_delete:
        return f"DELETE FROM {target} WHERE TRUE"
    return f"UPDATE {target} {_soft_delete().removeprefix('UPDATE ')} WHERE TRUE"


def replace_sql(target: str, stage: str, names: Sequence[str]) -> str:
    """Swap the table's rows for the staged ones in one transaction: readers never see a half table."""
    columns = _columns(names)
    return (
        f"BEGIN TRANSACTION; DELETE FROM {target} WHERE TRUE; "
        f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {stage}; COMMIT TRANSACTION;"
    )


# --- the sink -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoadFile:
    path: Path
    rows: int
    bytes: int
    digest: str


class BigQuerySink:
    """Writes to one BigQuery project; `dataset` holds the checkpoint table.

    Credentials: the service-account key file named by the environment variable `credentials_env`,
    else Application Default Credentials; an `http://` `api_endpoint` (an emulator) is called
    anonymously. Tests may inject a ready `client`. `table_options` apply to every table the sink
    creates; `options_by_table` overrides them per table name (`orders`) or `dataset.table`.
    """

    name = "bigquery"

    def __init__(
        self,
        project: str,
        *,
        dataset: str,
        location: str | None = None,
        credentials_env: str | None = None,
        api_endpoint: str | None = None,
        table_options: BigQueryTableOptions | None = None,
        options_by_table: Mapping[str, BigQueryTableOptions] | None = None,
        client: bigquery.Client | None = None,
        retry_deadline: float = 600.0,
    ):
        self.project = project
        self.dataset = dataset
        self.location = location
        self.table_options = table_options
        self.options_by_table = dict(options_by_table or {})
        self._owns_client = client is None
        self.client = client or _make_client(project, location, credentials_env, api_endpoint)
        self._retry = Retry(
            predicate=is_transient, initial=1.0, maximum=32.0, multiplier=2.0, timeout=retry_deadline
        )
        self._tables: dict[str, bigquery.Table] = {}
        self._datasets: set[str] = set()

    # -- protocol --

    def prepare_table(self, target: SinkTable, schema: TableSchema, *, cdc: bool = False) -> list[str]:
        """Create/evolve the table; `cdc=True` adds the `_nilus_*` columns and needs a primary key."""
        if not cdc:
            return self._ensure_table(target, bigquery_fields(schema))[1]
        self._require_primary_key(target, schema, "stream changes into", _CDC_KEY_FIX)
        return self._ensure_table(target, [*bigquery_fields(schema), *CDC_FIELDS])[1]

    def widen_columns(self, target: SinkTable, columns: list[Column]) -> None:
        """`ALTER COLUMN ... SET DATA TYPE` where the BigQuery type really changes (int16 → int64
        is INT64 either way; NUMERIC → BIGNUMERIC is not)."""
        ref = f"{self.project}.{target.qualified}"
        with _sink_errors("widening columns of", ref):
            current = {f.name: f for f in self.client.get_table(ref, retry=self._retry).schema}
        for column in columns:
            wanted, have = bigquery_field(column, target.qualified), current.get(column.name)
            if have is None or _type_spelling(have) == _type_spelling(wanted):
                continue
            self._query(
                f"ALTER TABLE `{ref}` ALTER COLUMN `{column.name}` SET DATA TYPE {_type_spelling(wanted)}",
                f"widening {column.name} of",
            )
        self._tables.pop(ref, None)

    def write(
        self,
        target: SinkTable,
        schema: TableSchema,
        batches: Iterable[pa.RecordBatch],
        strategy: WriteStrategy,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        strategy = WriteStrategy(strategy)
        if strategy is WriteStrategy.MERGE:
            self._require_primary_key(target, schema, "merge")
        table, added = self._ensure_table(target, bigquery_fields(schema))
        data = _batches_table(batches, schema)
        if strategy is WriteStrategy.APPEND:
            result = self._append(target, table, schema, data, checkpoint)
        elif data.num_rows == 0:
            if strategy is WriteStrategy.REPLACE:
                self._query(f"TRUNCATE TABLE {_ref(table)}", f"replacing {target.qualified}")
            result = WriteResult()
        else:
            result = self._replace_or_merge(target, table, schema, data, strategy)
        result.added_columns = added
        self._save_checkpoint(checkpoint)
        return result

    def apply_changes(
        self,
        target: SinkTable,
        schema: TableSchema,
        changes: ChangeSet,
        checkpoint: Checkpoint | None,
        *,
        soft_delete: bool = False,
    ) -> WriteResult:
        self._require_primary_key(target, schema, "apply changes to", _CDC_KEY_FIX)
        table, added = self._ensure_table(target, [*bigquery_fields(schema), *CDC_FIELDS])
        if changes.is_empty:
            self._save_checkpoint(checkpoint)
            return WriteResult(added_columns=added)
        staged = _change_rows(changes, schema)
        if staged.num_rows == 0:  # a truncate alone
            self._query(truncate_sql(_ref(table), soft_delete=soft_delete), f"truncating {target.qualified}")
            self._save_checkpoint(checkpoint)
            return WriteResult(added_columns=added)
        truncate_before = pc.min(staged.column(LSN_COLUMN)).as_py() if changes.truncate else None
        load = self._stage(target, schema, staged, [*bigquery_fields(schema), *_CHANGE_FIELDS])
        with self._staging_table(load) as stage:
            sql = cdc_merge_sql(
                _ref(table), _ref(stage), schema, soft_delete=soft_delete, truncate_before=truncate_before
            )
            self._query(sql, f"applying changes to {target.qualified}")
        self._save_checkpoint(checkpoint)
        return WriteResult(rows=load.rows, bytes=load.bytes, added_columns=added)

    def read_checkpoint(self, key: str) -> str | None:
        table = f"{self.project}.{self.dataset}.{CHECKPOINT_TABLE}"
        with _sink_errors("reading checkpoint", table):
            try:
                self.client.get_table(table, retry=self._retry)
            except api_errors.NotFound:
                return None
        rows = self._query(
            f"SELECT value FROM `{table}` WHERE key = @key",
            f"reading checkpoint {key}",
            bigquery.ScalarQueryParameter("key", "STRING", key),
        )
        return next((row["value"] for row in rows), None)

    def change_transaction(self) -> contextlib.AbstractContextManager[None]:
        """Refused: BigQuery has no transaction across requests, so the chunks of one source
        transaction would become visible one by one; and they share its commit LSN, so the
        LSN-guarded MERGE (`S.lsn > T.lsn`) would skip a later chunk's change to a key an earlier
        chunk wrote, and a truncate would keep the earlier chunks' rows. The CDC engine then
        buffers such a transaction whole, as one MERGE per table."""
        raise ChunkedApplyUnsupported(
            "bigquery sink cannot apply one source transaction in several MERGEs exactly"
        )

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # -- tables --

    def _ensure_table(
        self, target: SinkTable, fields: Sequence[bigquery.SchemaField]
    ) -> tuple[bigquery.Table, list[str]]:
        """Create the table (with its options) or add the missing columns; return the added names."""
        ref = f"{self.project}.{target.qualified}"
        with _sink_errors("preparing table", ref):
            table = self._tables.get(ref) or self._get_or_create(target, ref, fields)
            known = {f.name for f in table.schema}
            missing = [f for f in fields if f.name not in known]
            if missing:
                table.schema = [*table.schema, *missing]
                table = self.client.update_table(table, ["schema"], retry=self._retry)
        self._tables[ref] = table
        return table, [f.name for f in missing]

    def _get_or_create(
        self, target: SinkTable, ref: str, fields: Sequence[bigquery.SchemaField]
    ) -> bigquery.Table:
        self._ensure_dataset(target.dataset)
        try:
            return self.client.get_table(ref, retry=self._retry)
        except api_errors.NotFound:
            table = bigquery.Table(ref, schema=list(fields))
            if target.name != CHECKPOINT_TABLE and (options := self._options_for(target)):
                options.apply_to(table)
            self.client.create_table(table, exists_ok=True, retry=self._retry)
            return self.client.get_table(ref, retry=self._retry)

    def _options_for(self, target: SinkTable) -> BigQueryTableOptions | None:
        by_table = self.options_by_table
        return by_table.get(target.qualified) or by_table.get(target.name) or self.table_options

    def _ensure_dataset(self, dataset: str) -> None:
        if dataset in self._datasets:
            return
        ref = f"{self.project}.{dataset}"
        try:
            self.client.get_dataset(ref, retry=self._retry)
        except api_errors.NotFound:
            wanted = bigquery.Dataset(ref)
            wanted.location = self.location
            self.client.create_dataset(wanted, exists_ok=True, retry=self._retry)
        self._datasets.add(dataset)

    @contextlib.contextmanager
    def _staging_table(self, load: _StagedLoad) -> Iterator[bigquery.Table]:
        """Yield the staging table of `load` and drop it afterwards."""
        try:
            yield load.table
        finally:
            with contextlib.suppress(api_errors.GoogleAPICallError):
                self.client.delete_table(load.table, not_found_ok=True)

    def _stage(
        self, target: SinkTable, schema: TableSchema, data: pa.Table, fields: Sequence[bigquery.SchemaField]
    ) -> _StagedLoad:
        """Load `data` into a fresh staging table next to the target (expires by itself)."""
        ref = f"{self.project}.{target.dataset}._nilus_stage_{target.name}_{uuid.uuid4().hex[:12]}"
        table = bigquery.Table(ref, schema=list(fields))
        table.expires = dt.datetime.now(dt.UTC) + _STAGING_LIFETIME
        with _sink_errors("creating staging table", ref):
            table = self.client.create_table(table, retry=self._retry)
        try:
            with _parquet_file(to_load_table(data, schema, fields)) as file:
                self._load(file, table, f"staging {target.qualified}")
        except BaseException:
            with contextlib.suppress(api_errors.GoogleAPICallError):
                self.client.delete_table(table, not_found_ok=True)
            raise
        return _StagedLoad(table, file.rows, file.bytes)

    @staticmethod
    def _require_primary_key(
        target: SinkTable, schema: TableSchema, action: str, fix: str = "use the append/replace strategy"
    ) -> None:
        if not schema.primary_key:
            raise SinkError(
                f"BigQuery sink cannot {action} {target.qualified}: source table {schema.table} has no "
                f"primary key (add one, or {fix})"
            )

    # -- writes --

    def _append(
        self,
        target: SinkTable,
        table: bigquery.Table,
        schema: TableSchema,
        data: pa.Table,
        checkpoint: Checkpoint | None,
    ) -> WriteResult:
        if data.num_rows == 0:
            return WriteResult()
        with _parquet_file(to_load_table(data, schema, table.schema)) as file:
            job_id = _job_id("append", table, checkpoint, file.digest) if checkpoint else None
            self._load(file, table, f"appending to {target.qualified}", job_id)
        return WriteResult(rows=file.rows, bytes=file.bytes)

    def _replace_or_merge(
        self,
        target: SinkTable,
        table: bigquery.Table,
        schema: TableSchema,
        data: pa.Table,
        strategy: WriteStrategy,
    ) -> WriteResult:
        if strategy is WriteStrategy.REPLACE:
            load = self._stage(target, schema, data, table.schema)
            sql = replace_sql(_ref(table), _ref(load.table), [f.name for f in table.schema])
        else:
            data = data.append_column(_ROW_NUMBER, pa.array(range(data.num_rows), pa.int64()))
            fields = [*bigquery_fields(schema), bigquery.SchemaField(_ROW_NUMBER, "INT64")]
            load = self._stage(target, schema, data, fields)
            sql = batch_merge_sql(_ref(table), _ref(load.table), schema)
        with self._staging_table(load):
            self._query(sql, f"{strategy.value} into {target.qualified}")
        return WriteResult(rows=load.rows, bytes=load.bytes)

    def _load(
        self,
        file: _LoadFile,
        table: bigquery.Table,
        action: str,
        job_id: str | None = None,
        attempts: int = 8,
    ) -> None:
        """Run one Parquet load job, retried on transient failures.

        With a `job_id`, a job already done under that id (a replay) counts as this load: BigQuery
        keeps job ids unique, so the data lands at most once. Failed attempts use `<job_id>_<n+1>`.
        """
        config = bigquery.LoadJobConfig(  # the table's own schema applies: no schema here
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            parquet_options=_list_inference(),
        )
        attempt_ids: Iterable[str | None] = (
            (f"{job_id}_{n}" for n in itertools.count()) if job_id else itertools.repeat(None)
        )
        failures = 0
        with _sink_errors(action, _ref(table)):
            for attempt_id in attempt_ids:
                job = self._existing_load(attempt_id) if attempt_id else None
                if job is not None and job.error_result is not None:
                    continue  # an earlier run's failed attempt: take the next id
                try:
                    (job or self._submit_load(file, table, config, attempt_id)).result(retry=self._retry)
                    return
                except api_errors.GoogleAPICallError as exc:
                    failures += 1
                    if failures >= attempts or not is_transient(exc):
                        raise
                    time.sleep(min(2.0**failures, 32.0))

    def _existing_load(self, job_id: str) -> bigquery.LoadJob | None:
        try:
            job = self.client.get_job(job_id, location=self.location, retry=self._retry)
        except api_errors.NotFound:
            return None
        return job if isinstance(job, bigquery.LoadJob) else None

    def _submit_load(
        self, file: _LoadFile, table: bigquery.Table, config: bigquery.LoadJobConfig, job_id: str | None
    ) -> bigquery.LoadJob:
        try:
            with open(file.path, "rb") as source:
                return self.client.load_table_from_file(
                    source, table, job_id=job_id, job_config=config, location=self.location
                )
        except api_errors.Conflict:  # submitted concurrently under the same id
            assert job_id is not None
            return self.client.get_job(job_id, location=self.location, retry=self._retry)

    def _query(self, sql: str, action: str, *parameters: bigquery.ScalarQueryParameter) -> list[bigquery.Row]:
        config = bigquery.QueryJobConfig(query_parameters=list(parameters))
        with _sink_errors(action, self.project):
            job = self.client.query(
                sql, job_config=config, location=self.location, retry=self._retry, job_retry=self._retry
            )
            return list(job.result(retry=self._retry))

    def _save_checkpoint(self, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            return
        table, _ = self._ensure_table(SinkTable(self.dataset, CHECKPOINT_TABLE), _CHECKPOINT_FIELDS)
        self._query(
            f"MERGE {_ref(table)} T USING (SELECT @key AS key, @value AS value) S ON T.key = S.key "
            "WHEN MATCHED THEN UPDATE SET value = S.value, updated_at = CURRENT_TIMESTAMP() "
            "WHEN NOT MATCHED THEN INSERT (key, value, updated_at) "
            "VALUES (S.key, S.value, CURRENT_TIMESTAMP())",
            f"saving checkpoint {checkpoint.key}",
            bigquery.ScalarQueryParameter("key", "STRING", checkpoint.key),
            bigquery.ScalarQueryParameter("value", "STRING", checkpoint.value),
        )


def open_bigquery_sink(
    name: str,
    connection: BigQueryConnection,
    table_options: TableOptionsSpec | None = None,
    *,
    dataset: str | None = None,
) -> BigQuerySink:
    """The sink for the `bigquery` connection `name` declared in YAML.

    `dataset` (the pipeline's sink dataset) holds the checkpoint table next to the pipeline's
    tables; without it the connection's `dataset`, else `nilus_state`.
    """
    try:
        options = table_options_from_spec(table_options) if table_options else None
    except ValueError as exc:
        raise SinkError(f"BigQuery connection '{name}': {exc}") from exc
    return BigQuerySink(
        connection.project,
        dataset=dataset or connection.dataset or DEFAULT_STATE_DATASET,
        location=connection.location,
        credentials_env=connection.credentials_env,
        api_endpoint=connection.api_endpoint,
        table_options=options,
    )


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


@dataclass(frozen=True)
class _StagedLoad:
    table: bigquery.Table
    rows: int
    bytes: int


def _make_client(
    project: str, location: str | None, credentials_env: str | None, api_endpoint: str | None
) -> bigquery.Client:
    options = ClientOptions(api_endpoint=api_endpoint) if api_endpoint else None
    credentials = None
    if credentials_env:
        key_file = os.environ.get(credentials_env)
        if not key_file:
            raise SinkError(
                f"BigQuery sink: environment variable {credentials_env} is not set; it must name a "
                "service-account key file"
            )
        credentials = service_account.Credentials.from_service_account_file(key_file)
    elif api_endpoint and api_endpoint.startswith("http://"):
        credentials = AnonymousCredentials()
    return bigquery.Client(
        project=project, location=location, credentials=credentials, client_options=options
    )


def _ref(table: bigquery.Table) -> str:
    return f"`{table.project}.{table.dataset_id}.{table.table_id}`"


_LEGACY_TYPE_NAMES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}


def _type_spelling(field: bigquery.SchemaField) -> str:
    """`NUMERIC(20, 4)`, `INT64`...: a field's type as DDL, legacy names normalized."""
    name = _LEGACY_TYPE_NAMES.get(field.field_type, field.field_type)
    if field.precision is not None:
        return f"{name}({field.precision}, {field.scale or 0})"
    return name


def _job_id(kind: str, table: bigquery.Table, checkpoint: Checkpoint, digest: str) -> str:
    identity = "\x1f".join(
        [kind, table.full_table_id or _ref(table), checkpoint.key, checkpoint.value, digest]
    )
    return f"nilus_{kind}_{hashlib.sha256(identity.encode()).hexdigest()[:40]}"


def _list_inference() -> bigquery.ParquetOptions:
    options = bigquery.ParquetOptions()
    options.enable_list_inference = True  # read pyarrow's 3-level lists as REPEATED columns
    return options


@contextlib.contextmanager
def _parquet_file(data: pa.Table) -> Iterator[_LoadFile]:
    """Write `data` to a temporary Parquet file (loads stream it from disk, not memory)."""
    with tempfile.TemporaryDirectory(prefix="nilus-bq-") as directory:
        path = Path(directory) / "load.parquet"
        pq.write_table(data, path)
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        yield _LoadFile(path, data.num_rows, path.stat().st_size, digest.hexdigest())


def _batches_table(batches: Iterable[pa.RecordBatch], schema: TableSchema) -> pa.Table:
    """The batches as one table laid out as `schema`, columns matched by name. Nullability is not
    compared: a NOT NULL source column may arrive in a nullable field (e.g. CDC snapshot rows)."""
    layout = pa.schema([f.with_nullable(True) for f in arrow_schema(schema)])
    return pa.Table.from_batches(
        [pa.RecordBatch.from_arrays(batch.select(layout.names).columns, schema=layout) for batch in batches],
        schema=layout,
    )


def _change_rows(changes: ChangeSet, schema: TableSchema) -> pa.Table:
    """Upserts and deletes as one table: the columns, `_nilus_lsn`, `_nilus_op`, `_nilus_unchanged`."""
    layout = pa.schema(
        [
            *arrow_schema(schema),
            pa.field(LSN_COLUMN, pa.int64()),
            pa.field(OP_COLUMN, pa.string()),
            pa.field(UNCHANGED_COLUMN, pa.list_(pa.string())),
        ]
    )
    deletes = changes.deletes.append_column(
        OP_COLUMN, pa.array(["D"] * changes.deletes.num_rows, pa.string())
    )
    return pa.concat_tables([_conform(changes.upserts, layout), _conform(deletes, layout)])


def _conform(data: pa.Table, layout: pa.Schema) -> pa.Table:
    """`data` with exactly `layout`'s columns: missing ones NULL."""
    return pa.Table.from_arrays(
        [
            data.column(f.name).cast(f.type)
            if f.name in data.column_names
            else pa.nulls(data.num_rows, f.type)
            for f in layout
        ],
        schema=layout,
    )
