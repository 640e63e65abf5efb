"""The BigQuery plumbing under the sink: the client, tables and datasets, staging tables, load
and query jobs with retries. `BigQuerySink` (sink.py) builds the protocol on top of it."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

import pyarrow as pa
from google.api_core import exceptions as api_errors
from google.api_core.client_options import ClientOptions
from google.api_core.retry import Retry
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.oauth2 import service_account

from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import CHECKPOINT_TABLE, SinkError, SinkTable
from nilus_dagster.sinks.bigquery.errors import is_transient, sink_errors
from nilus_dagster.sinks.bigquery.files import LoadFile, parquet_file
from nilus_dagster.sinks.bigquery.options import BigQueryTableOptions
from nilus_dagster.sinks.bigquery.sql import table_ref
from nilus_dagster.sinks.bigquery_types import to_load_table

log = logging.getLogger(__name__)

_STAGING_LIFETIME = dt.timedelta(days=1)  # a crashed run's staging table expires by itself
_LEGACY_TYPE_NAMES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}


@dataclass(frozen=True)
class StagedLoad:
    table: bigquery.Table
    rows: int
    bytes: int


class BigQueryJobs:
    """One project's client with retries, and the tables this process has seen (see BigQuerySink)."""

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
        self.credentials_env = credentials_env
        self.api_endpoint = api_endpoint
        self.retry_deadline = retry_deadline
        self._owns_client = client is None
        self.client = client or make_client(project, location, credentials_env, api_endpoint)
        self.transient_errors = 0  # transient API errors waited out (an outage count: sink_errors_total)
        self._retry = Retry(
            predicate=is_transient, initial=1.0, maximum=32.0, multiplier=2.0, timeout=retry_deadline,
            on_error=self._retrying,
        )
        self._tables: dict[str, bigquery.Table] = {}
        self._datasets: set[str] = set()
        self._parent: BigQueryJobs | None = None  # the sink this one was forked from
        # Held by every statement writing the checkpoint table, shared with forks: the stream and a
        # resync's worker both write it, and concurrent DML on one table conflicts (BigQuery aborts one).
        self._checkpoint_lock = threading.Lock()

    def _retrying(self, error: BaseException) -> None:
        """A transient error the retry waits out: counted (on the sink a fork came from too) and logged."""
        for sink in (self, self._parent) if self._parent is not None else (self,):
            sink.transient_errors += 1
        log.warning("BigQuery answered %s: retrying for up to %.0f s", error, self.retry_deadline)

    @property
    def can_fork(self) -> bool:
        """`fork()` needs a client this sink built (an injected one cannot be duplicated)."""
        return self._owns_client

    def fork(self) -> Self:
        """A sink on the same project for another thread: its own client (the HTTP session is not
        shared between threads) and nothing per transaction (`_span`) or cached shared with this one;
        only the lock serializing writes of the checkpoint table.
        Its `close()` makes this sink forget the tables the fork saw (it may have emptied, widened
        or recreated them), so this one reads them again on next use."""
        if not self._owns_client:
            raise SinkError("BigQuery sink: a sink built on an injected client cannot fork (no client of its own)")
        forked = type(self)(
            self.project,
            dataset=self.dataset,
            location=self.location,
            credentials_env=self.credentials_env,
            api_endpoint=self.api_endpoint,
            table_options=self.table_options,
            options_by_table=self.options_by_table,
            retry_deadline=self.retry_deadline,
        )
        forked._parent, forked._checkpoint_lock = self, self._checkpoint_lock
        return forked

    def close(self) -> None:
        if self._parent is not None:  # each pop is atomic: safe beside the parent's thread
            for ref in list(self._tables):
                self._parent._tables.pop(ref, None)
        if self._owns_client:
            self.client.close()

    def _ensure_table(
        self, target: SinkTable, fields: Sequence[bigquery.SchemaField]
    ) -> tuple[bigquery.Table, list[str]]:
        """Create the table (with its options) or add the missing columns; return the added names."""
        ref = f"{self.project}.{target.qualified}"
        with sink_errors("preparing table", ref):
            table = self._tables.get(ref) or self._get_or_create(target, ref, fields)
            known = {f.name for f in table.schema}
            missing = [f for f in fields if f.name not in known]
            if missing:
                table.schema = [*table.schema, *missing]
                table = self.client.update_table(table, ["schema"], retry=self._retry)
        self._tables[ref] = table
        return table, [f.name for f in missing]

    def _get_or_create(self, target: SinkTable, ref: str, fields: Sequence[bigquery.SchemaField]) -> bigquery.Table:
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
    def _staging_table(self, load: StagedLoad) -> Iterator[bigquery.Table]:
        """Yield the staging table of `load` and drop it afterwards."""
        try:
            yield load.table
        finally:
            with contextlib.suppress(api_errors.GoogleAPICallError):
                self.client.delete_table(load.table, not_found_ok=True)

    def _stage(
        self, target: SinkTable, schema: TableSchema, data: pa.Table, fields: Sequence[bigquery.SchemaField]
    ) -> StagedLoad:
        """Load `data` into a fresh staging table next to the target (expires by itself)."""
        ref = f"{self.project}.{target.dataset}._nilus_stage_{target.name}_{uuid.uuid4().hex[:12]}"
        table = bigquery.Table(ref, schema=list(fields))
        table.expires = dt.datetime.now(dt.UTC) + _STAGING_LIFETIME
        with sink_errors("creating staging table", ref):
            table = self.client.create_table(table, retry=self._retry)
        try:
            with parquet_file(to_load_table(data, schema, fields)) as file:
                self._load(file, table, f"staging {target.qualified}")
        except BaseException:
            with contextlib.suppress(api_errors.GoogleAPICallError):
                self.client.delete_table(table, not_found_ok=True)
            raise
        return StagedLoad(table, file.rows, file.bytes)

    def _load(self, file: LoadFile, table: bigquery.Table, action: str, attempts: int = 8) -> None:
        """Run one Parquet load job (into a staging table or a plain append), retried on transient
        failures; the table's own schema applies, so a load can neither drop nor retype a column."""
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            parquet_options=list_inference(),
        )
        with sink_errors(action, table_ref(table)):
            for failures in range(1, attempts + 1):
                try:
                    with open(file.path, "rb") as source:
                        job = self.client.load_table_from_file(source, table, job_config=config, location=self.location)
                    job.result(retry=self._retry)
                    return
                except Exception as exc:  # an upload's dropped connection too, not only API errors
                    if failures >= attempts or not is_transient(exc):
                        raise
                    self._retrying(exc)
                    time.sleep(min(2.0**failures, 32.0))

    def _query(self, sql: str, action: str, *parameters: bigquery.ScalarQueryParameter) -> list[bigquery.Row]:
        return self._query_job(sql, action, *parameters)[1]

    def _query_job(
        self, sql: str, action: str, *parameters: bigquery.ScalarQueryParameter
    ) -> tuple[bigquery.QueryJob, list[bigquery.Row]]:
        """The finished job (its statistics, e.g. `dml_stats`) and its rows."""
        config = bigquery.QueryJobConfig(query_parameters=list(parameters))
        with sink_errors(action, self.project):
            job = self.client.query(
                sql, job_config=config, location=self.location, retry=self._retry, job_retry=self._retry
            )
            return job, list(job.result(retry=self._retry))


def make_client(
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
    return bigquery.Client(project=project, location=location, credentials=credentials, client_options=options)


def type_spelling(field: bigquery.SchemaField) -> str:
    """`NUMERIC(20, 4)`, `INT64`...: a field's type as DDL, legacy names normalized."""
    name = _LEGACY_TYPE_NAMES.get(field.field_type, field.field_type)
    if field.precision is not None:
        return f"{name}({field.precision}, {field.scale or 0})"
    return name


def list_inference() -> bigquery.ParquetOptions:
    options = bigquery.ParquetOptions()
    options.enable_list_inference = True  # read pyarrow's 3-level lists as REPEATED columns
    return options
