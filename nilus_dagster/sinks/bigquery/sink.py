"""`BigQuerySink`: the Sink protocol over BigQuery jobs (see the package docstring)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from google.api_core import exceptions as api_errors
from google.cloud import bigquery

from nilus_dagster.schema import Column, TableName, TableSchema
from nilus_dagster.schema.table import SinkLimits
from nilus_dagster.sinks.base import (
    CHECKPOINT_TABLE,
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    ChangeSet,
    Checkpoint,
    MarkCheckpoint,
    SinkError,
    SinkTable,
    WriteResult,
    WriteStrategy,
    old_key_column,
)
from nilus_dagster.sinks.bigquery import sql as bq_sql
from nilus_dagster.sinks.bigquery.errors import sink_errors
from nilus_dagster.sinks.bigquery.files import MOVED_OP, batches_table, change_rows, parquet_file
from nilus_dagster.sinks.bigquery.jobs import BigQueryJobs, StagedLoad, type_spelling
from nilus_dagster.sinks.bigquery.options import table_options_from_spec
from nilus_dagster.sinks.bigquery.spanning import ShadowTransaction
from nilus_dagster.sinks.bigquery.sql import table_ref
from nilus_dagster.sinks.bigquery_types import bigquery_field, bigquery_fields, to_load_table

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
_CHECKPOINT_FIELDS = (
    bigquery.SchemaField("key", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("value", "STRING"),
    bigquery.SchemaField("updated_at", "TIMESTAMP"),
)
_CDC_KEY_FIX = "declare primary_key for the table in the pipeline"


class BigQuerySink(BigQueryJobs):
    """Writes to one BigQuery project; `dataset` holds the checkpoint table.

    Credentials: the service-account key file named by the environment variable `credentials_env`,
    else Application Default Credentials; an `http://` `api_endpoint` (an emulator) is called
    anonymously. Tests may inject a ready `client`. `table_options` apply to every table the sink
    creates; `options_by_table` overrides them per table name (`orders`) or `dataset.table`.
    """

    name = "bigquery"
    holds_numeric_specials = False  # NUMERIC/BIGNUMERIC: NaN and ±Infinity are refused per value
    # DATE/DATETIME/TIMESTAMP end at 9999-12-31 (a timestamptz late that day west of UTC is past it),
    # an ARRAY cannot hold NULL: such a row is a poison row (on_error) instead of a failed load.
    value_limits = SinkLimits("BigQuery", max_year=9999, null_elements=False)
    # In change_transaction() a table's checkpoint moves its shadow into the target: it must come
    # with the table's last piece (cdc/spanning.py).
    checkpoint_with_last_piece = True
    _span: ShadowTransaction | None = None  # inside change_transaction(): the open transaction's shadows

    # -- protocol --

    def check_table(
        self, target: SinkTable, schema: TableSchema, *, cdc: bool, strategy: WriteStrategy | None = None
    ) -> None:
        """Refuse what prepare_table/write/apply_changes would refuse, without calling BigQuery."""
        bigquery_fields(schema)  # UnsupportedColumnType naming the column
        if cdc:
            self._require_primary_key(target, schema, "stream changes into", _CDC_KEY_FIX)
        elif strategy is not None and WriteStrategy(strategy) is WriteStrategy.MERGE:
            self._require_primary_key(target, schema, "merge")

    def prepare_table(self, target: SinkTable, schema: TableSchema, *, cdc: bool = False) -> list[str]:
        """Create/evolve the table; `cdc=True` adds the `_nilus_*` columns and needs a primary key."""
        self.check_table(target, schema, cdc=cdc)
        fields = [*bigquery_fields(schema), *CDC_FIELDS] if cdc else bigquery_fields(schema)
        return self._ensure_table(target, fields)[1]

    def recreate_table(self, target: SinkTable, schema: TableSchema, checkpoint: Checkpoint) -> None:
        """Drop the table and create it empty for `schema` (a resync whose source columns changed
        type). BigQuery commits each step on its own, so the checkpoint (the resync marker) comes
        first: a crash after it makes the next run resync the table again from scratch."""
        self.check_table(target, schema, cdc=True)
        self._save_checkpoint(checkpoint)
        ref = f"{self.project}.{target.qualified}"
        with sink_errors("dropping the table to recreate it", ref):
            self.client.delete_table(ref, not_found_ok=True, retry=self._retry)
        self._tables.pop(ref, None)
        self._ensure_table(target, [*bigquery_fields(schema), *CDC_FIELDS])

    def widen_columns(self, target: SinkTable, columns: list[Column]) -> None:
        """`ALTER COLUMN ... SET DATA TYPE` where the BigQuery type really changes (int16 → int64
        is INT64 either way; NUMERIC → BIGNUMERIC is not)."""
        ref = f"{self.project}.{target.qualified}"
        with sink_errors("widening columns of", ref):
            current = {f.name: f for f in self.client.get_table(ref, retry=self._retry).schema}
        shadow = self._span.shadows.get(target.qualified) if self._span is not None else None
        refs = [ref, *([f"{shadow.table.project}.{shadow.table.dataset_id}.{shadow.table.table_id}"] if shadow else [])]
        for column in columns:
            wanted, have = bigquery_field(column, target.qualified), current.get(column.name)
            if have is None or type_spelling(have) == type_spelling(wanted):
                continue
            for table in refs:  # the open transaction's shadow too (spanning.py)
                self._query(
                    f"ALTER TABLE `{table}` ALTER COLUMN `{column.name}` SET DATA TYPE {type_spelling(wanted)}",
                    f"widening {column.name} of",
                )
        for table in refs:
            self._tables.pop(table, None)

    def fill_column(self, target: SinkTable, column: Column, value: pa.Array, *, before_lsn: int) -> None:
        """Set `column` to `value` (one element) in every CDC row older than `before_lsn`."""
        field = bigquery_field(column, target.qualified)
        one = TableSchema(TableName(target.dataset, target.name), (column,), ())
        loaded = to_load_table(pa.table({column.name: value}), one, [field]).column(0)[0].as_py()
        kind = "STRING" if field.field_type == "JSON" else field.field_type
        if field.mode == "REPEATED":
            parameter: bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter
            parameter = bigquery.ArrayQueryParameter("value", kind, loaded or [])
        else:
            parameter = bigquery.ScalarQueryParameter("value", kind, loaded)
        expression = "PARSE_JSON(@value)" if field.field_type == "JSON" else "@value"
        self._query(
            f"UPDATE `{self.project}.{target.qualified}` SET {bq_sql.quote(column.name)} = {expression} "
            f"WHERE {bq_sql.quote(LSN_COLUMN)} < @lsn",
            f"filling {column.name} of",
            parameter,  # type: ignore[arg-type]
            bigquery.ScalarQueryParameter("lsn", "INT64", before_lsn),
        )
        if self._span is not None:  # the rows the open transaction wrote so far precede the DDL
            self._span.fill(target, field, expression, parameter)

    def write(
        self,
        target: SinkTable,
        schema: TableSchema,
        batches: Iterable[pa.RecordBatch],
        strategy: WriteStrategy,
        checkpoint: Checkpoint | None = None,
    ) -> WriteResult:
        strategy = WriteStrategy(strategy)
        self.check_table(target, schema, cdc=False, strategy=strategy)
        table, added = self._ensure_table(target, bigquery_fields(schema))
        data = batches_table(batches, schema)
        if strategy is WriteStrategy.APPEND:
            result = self._append(target, table, schema, data, checkpoint)
        else:
            if data.num_rows == 0:
                if strategy is WriteStrategy.REPLACE:
                    self._query(f"TRUNCATE TABLE {table_ref(table)}", f"replacing {target.qualified}")
                result = WriteResult()
            else:
                result = self._replace_or_merge(target, table, schema, data, strategy)
            self._save_checkpoint(checkpoint)
        result.added_columns = added
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
        self.check_table(target, schema, cdc=True)
        table, added = self._ensure_table(target, [*bigquery_fields(schema), *CDC_FIELDS])
        if self._span is not None:
            self._span.apply(target, table, schema, changes, checkpoint, soft_delete=soft_delete)
            return WriteResult(rows=changes.upserts.num_rows + changes.deletes.num_rows, added_columns=added)
        if changes.is_empty:
            self._save_checkpoint(checkpoint)
            return WriteResult(added_columns=added)
        staged = change_rows(changes, schema)
        if staged.num_rows == 0:  # a truncate alone
            self._query(
                bq_sql.truncate_sql(table_ref(table), soft_delete=soft_delete), f"truncating {target.qualified}"
            )
            self._save_checkpoint(checkpoint)
            return WriteResult(added_columns=added)
        truncate_before = pc.min(staged.column(LSN_COLUMN)).as_py() if changes.truncate else None
        moved, load = self._stage_changes(target, schema, staged)
        with self._staging_table(load) as stage:
            if moved:
                self._refuse_uncarriable(target, table_ref(table), table_ref(stage), schema)
            sql = bq_sql.cdc_merge_sql(
                table_ref(table),
                table_ref(stage),
                schema,
                soft_delete=soft_delete,
                truncate_before=truncate_before,
                moved=moved,
            )
            self._query(sql, f"applying changes to {target.qualified}")
        self._save_checkpoint(checkpoint)
        rows = changes.upserts.num_rows + changes.deletes.num_rows
        return WriteResult(rows=rows, bytes=load.bytes, added_columns=added)

    def read_checkpoint(self, key: str) -> str | None:
        table = f"{self.project}.{self.dataset}.{CHECKPOINT_TABLE}"
        with sink_errors("reading checkpoint", table):
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

    def row_count(self, target: SinkTable) -> int:
        table = f"{self.project}.{target.dataset}.{target.name}"
        with sink_errors("counting rows of", table):
            try:
                self.client.get_table(table, retry=self._retry)
            except api_errors.NotFound:
                return 0
        rows = self._query(f"SELECT COUNT(*) AS n FROM `{table}`", f"counting rows of {target.qualified}")
        return int(rows[0]["n"])

    def column_names(self, target: SinkTable) -> list[str]:
        table = f"{self.project}.{target.dataset}.{target.name}"
        with sink_errors("reading the columns of", table):
            try:
                return [f.name for f in self.client.get_table(table, retry=self._retry).schema]
            except api_errors.NotFound:
                return []

    @contextlib.contextmanager
    def change_transaction(self) -> Iterator[None]:
        """BigQuery has no transaction across requests: the chunks go to shadow tables, and each
        table's net effect reaches it with its checkpoint, at the source Commit (spanning.py). An
        exception (an abandoned transaction) drops the shadows: the targets never saw any of it."""
        if self._span is not None:
            raise SinkError("BigQuery sink: change transactions do not nest")
        span = self._span = ShadowTransaction(self)
        try:
            yield
        finally:
            self._span = None
            span.discard()  # after a commit: nothing left

    def _stage_changes(self, target: SinkTable, schema: TableSchema, staged: pa.Table) -> tuple[bool, StagedLoad]:
        """Load change rows into a staging table; True when they include moved rows."""
        moved = old_key_column(schema.primary_key[0]) in staged.column_names
        fields = [*bigquery_fields(schema), *_CHANGE_FIELDS]
        if moved:
            keys = {f.name: f for f in bigquery_fields(schema)}
            fields += [_renamed(keys[k], old_key_column(k)) for k in schema.primary_key]
        return moved, self._stage(target, schema, staged, fields)

    # -- writes --

    @staticmethod
    def _require_primary_key(
        target: SinkTable, schema: TableSchema, action: str, fix: str = "use the append/replace strategy"
    ) -> None:
        if not schema.primary_key:
            raise SinkError(
                f"BigQuery sink cannot {action} {target.qualified}: source table {schema.table} has no "
                f"primary key (add one, or {fix})"
            )

    def _append(
        self,
        target: SinkTable,
        table: bigquery.Table,
        schema: TableSchema,
        data: pa.Table,
        checkpoint: Checkpoint | None,
    ) -> WriteResult:
        """Without a checkpoint: one load job. With one: stage, then insert and set the checkpoint in
        one transaction; a MarkCheckpoint also guards it by the mark the load read from, so a replay
        of the range, whatever arrived in the source since, adds nothing."""
        if checkpoint is None:
            if data.num_rows == 0:
                return WriteResult()
            with parquet_file(to_load_table(data, schema, table.schema)) as file:
                self._load(file, table, f"appending to {target.qualified}")
            return WriteResult(rows=file.rows, bytes=file.bytes)
        if data.num_rows == 0 and not isinstance(checkpoint, MarkCheckpoint):
            self._save_checkpoint(checkpoint)
            return WriteResult()
        if data.num_rows == 0:
            self._advance_mark(target, table, None, checkpoint)
            return WriteResult()
        load = self._stage(target, schema, data, table.schema)
        with self._staging_table(load) as stage:
            self._advance_mark(target, table, stage, checkpoint)
        return WriteResult(rows=load.rows, bytes=load.bytes)

    def _advance_mark(
        self, target: SinkTable, table: bigquery.Table, stage: bigquery.Table | None, checkpoint: Checkpoint
    ) -> None:
        """Insert the staged rows and set the checkpoint in one transaction. A MarkCheckpoint whose
        `previous` the checkpoint no longer holds writes nothing: fine if it already holds the new
        mark (a replay), else a SinkError (another run loaded meanwhile)."""
        guarded = isinstance(checkpoint, MarkCheckpoint)
        names = [f.name for f in table.schema]
        checkpoints = table_ref(self._checkpoint_table())
        script = bq_sql.append_sql(
            table_ref(table), table_ref(stage) if stage else None, names, checkpoints, guarded=guarded
        )
        parameters = [
            bigquery.ScalarQueryParameter("key", "STRING", checkpoint.key),
            bigquery.ScalarQueryParameter("value", "STRING", checkpoint.value),
        ]
        if isinstance(checkpoint, MarkCheckpoint):
            parameters.append(bigquery.ScalarQueryParameter("previous", "STRING", checkpoint.previous))
        with self._checkpoint_lock:
            self._query(script, f"appending to {target.qualified}", *parameters)
        if not isinstance(checkpoint, MarkCheckpoint):
            return
        stored = self.read_checkpoint(checkpoint.key)
        if stored != checkpoint.value:
            raise SinkError(
                f"BigQuery sink did not append to {target.qualified}: checkpoint {checkpoint.key} is "
                f"{stored!r}, not {checkpoint.previous!r} as when this load read the source (another run "
                "loaded meanwhile); nothing was written, the next run continues from the stored mark"
            )

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
            sql = bq_sql.replace_sql(table_ref(table), table_ref(load.table), [f.name for f in table.schema])
        else:
            data = data.append_column(bq_sql.ROW_NUMBER, pa.array(range(data.num_rows), pa.int64()))
            fields = [*bigquery_fields(schema), bigquery.SchemaField(bq_sql.ROW_NUMBER, "INT64")]
            load = self._stage(target, schema, data, fields)
            sql = bq_sql.batch_merge_sql(table_ref(table), table_ref(load.table), schema)
        with self._staging_table(load):
            job, _ = self._query_job(sql, f"{strategy.value} into {target.qualified}")
        # a MERGE's DML statistics say how many rows were new (the others updated existing rows)
        stats = job.dml_stats if strategy is WriteStrategy.MERGE else None
        inserted = stats.inserted_row_count if stats is not None else None
        return WriteResult(rows=load.rows, bytes=load.bytes, inserted=inserted)

    def _refuse_uncarriable(self, target: SinkTable, table: str, stage: str, schema: TableSchema) -> None:
        rows = self._query(bq_sql.uncarriable_sql(table, stage, schema), f"checking moved rows of {target.qualified}")
        missing = rows[0]["n"] if rows else 0
        if missing:
            raise SinkError(
                f"BigQuery sink cannot apply changes to {target.qualified}: {missing} row(s) changed their "
                "primary key with unchanged TOASTed values, but the sink holds no row at the old key to "
                f"carry them from ({MOVED_OP!r} rows); nothing was applied. Re-snapshot the table"
            )

    def _checkpoint_table(self) -> bigquery.Table:
        return self._ensure_table(SinkTable(self.dataset, CHECKPOINT_TABLE), _CHECKPOINT_FIELDS)[0]

    def _save_checkpoint(self, checkpoint: Checkpoint | None) -> None:
        if checkpoint is None:
            return
        with self._checkpoint_lock:
            self._query(
                bq_sql.checkpoint_merge_sql(table_ref(self._checkpoint_table())),
                f"saving checkpoint {checkpoint.key}",
                bigquery.ScalarQueryParameter("key", "STRING", checkpoint.key),
                bigquery.ScalarQueryParameter("value", "STRING", checkpoint.value),
            )


def _renamed(field: bigquery.SchemaField, name: str) -> bigquery.SchemaField:
    return bigquery.SchemaField(name, field.field_type, mode=field.mode, precision=field.precision, scale=field.scale)


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
