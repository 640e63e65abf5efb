"""One big source transaction applied to BigQuery in chunks, in bounded memory, all or nothing.

BigQuery has no transaction across requests, so the chunks never touch the target table while the
source transaction is open. Each table the transaction writes gets a *shadow* table
(`_nilus_txn_<table>_<hex>`, expiring after a day) holding, for every key the transaction has
touched so far, the row as it stands after the chunks applied so far, plus `_nilus_present`
(FALSE: the key is deleted). Per chunk: the chunk is loaded into a staging table; the target's
rows of the chunk's keys (and of the old keys of moved rows) not yet in the shadow are copied into
it; then the ordinary CDC MERGE runs against the shadow, letting a change at the same LSN through
(every chunk carries the transaction's commit LSN), so unchanged TOASTed values and key changes
read the right row. A truncate marks every shadow row deleted and stops the copying from the
target. At the source Commit, per table, one MERGE applies the shadow's net effect to the target,
then the checkpoint is saved and the shadow dropped (a replay after a crash between the two
recomputes the same rows from the target it left and writes the same values again). A crash or an
abandoned transaction before that leaves the target untouched; the next run replays the
transaction from the slot (a new shadow of the table drops the leftovers first).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.api_core import exceptions as api_errors
from google.cloud import bigquery

from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import ChangeSet, Checkpoint, SinkTable
from nilus_dagster.sinks.bigquery import sql as bq_sql
from nilus_dagster.sinks.bigquery.errors import sink_errors
from nilus_dagster.sinks.bigquery.files import change_rows
from nilus_dagster.sinks.bigquery.sql import PRESENT, quote, table_ref

if TYPE_CHECKING:
    from nilus_dagster.sinks.bigquery.sink import BigQuerySink

_PREFIX = "_nilus_txn_"
_LIFETIME = dt.timedelta(days=1)


@dataclass
class Shadow:
    table: bigquery.Table
    truncated: bool = False


class ShadowTransaction:
    """The shadows of one source transaction (see the module docstring)."""

    def __init__(self, sink: BigQuerySink) -> None:
        self.sink = sink
        self.shadows: dict[str, Shadow] = {}

    def shadow_for(self, target: SinkTable, fields: list[bigquery.SchemaField]) -> Shadow:
        """The target's shadow, created on first use (leftovers of a crashed run dropped first);
        columns added to the target since are added to it too."""
        shadow = self.shadows.get(target.qualified)
        if shadow is None:
            self._drop_leftovers(target)
            name = f"{_PREFIX}{target.name}_{uuid.uuid4().hex[:12]}"
            ref = f"{self.sink.project}.{target.dataset}.{name}"
            table = bigquery.Table(ref, schema=[*fields, bigquery.SchemaField(PRESENT, "BOOL")])
            table.expires = dt.datetime.now(dt.UTC) + _LIFETIME
            with sink_errors("creating the transaction's shadow table", ref):
                table = self.sink.client.create_table(table, retry=self.sink._retry)
            shadow = self.shadows[target.qualified] = Shadow(table)
        else:
            shadow.table, _ = self.sink._ensure_table(_shadow_target(shadow), [*fields])
        return shadow

    def apply(
        self,
        target: SinkTable,
        table: bigquery.Table,
        schema: TableSchema,
        changes: ChangeSet,
        checkpoint: Checkpoint | None,
        *,
        soft_delete: bool,
    ) -> None:
        """One chunk of the transaction into the table's shadow; with the checkpoint (the source
        Commit), the shadow's net effect into the target, then the checkpoint."""
        shadow = self.shadow_for(target, list(table.schema))
        staged = None if changes.is_empty else change_rows(changes, schema)
        flags = {"soft_delete": soft_delete, "truncate": changes.truncate}
        if staged is not None and staged.num_rows:
            moved, load = self.sink._stage_changes(target, schema, staged)
            with self.sink._staging_table(load) as stage:
                self.apply_chunk(target, table, schema, shadow, stage, moved=moved, **flags)
        elif changes.truncate:
            self.apply_chunk(target, table, schema, shadow, None, moved=False, **flags)
        if checkpoint is not None:
            self.commit(target, table, schema, soft_delete=soft_delete)
            self.sink._save_checkpoint(checkpoint)

    def apply_chunk(
        self,
        target: SinkTable,
        table: bigquery.Table,
        schema: TableSchema,
        shadow: Shadow,
        stage: bigquery.Table | None,
        *,
        soft_delete: bool,
        truncate: bool,
        moved: bool,
    ) -> None:
        """Bring the shadow to where the target would be after this chunk."""
        sink, ref = self.sink, table_ref(shadow.table)
        if truncate:
            sink._query(bq_sql.shadow_truncate_sql(ref, soft_delete=soft_delete), f"truncating {target.qualified}")
            shadow.truncated = True
        if stage is None:
            return
        if not shadow.truncated:
            names = [f.name for f in table.schema]
            sql = bq_sql.shadow_seed_sql(ref, table_ref(table), table_ref(stage), schema, names, moved=moved)
            sink._query(sql, f"reading the rows of {target.qualified} the transaction changes")
        if moved:
            sink._refuse_uncarriable(target, ref, table_ref(stage), schema)
        merge = bq_sql.cdc_merge_sql(ref, table_ref(stage), schema, soft_delete=soft_delete, moved=moved, shadow=True)
        sink._query(merge, f"applying a chunk of a transaction to {target.qualified}")

    def fill(
        self, target: SinkTable, field: bigquery.SchemaField, expression: str, *parameters: bigquery.QueryParameter
    ) -> None:
        """ADD COLUMN ... DEFAULT inside the transaction: the rows it wrote so far read the default."""
        shadow = self.shadows.get(target.qualified)
        if shadow is not None:
            shadow.table, _ = self.sink._ensure_table(_shadow_target(shadow), [field])
            self.sink._query(
                f"UPDATE {table_ref(shadow.table)} SET {quote(field.name)} = {expression} WHERE TRUE",
                f"filling {field.name} of the transaction's rows of {target.qualified}",
                *parameters,
            )

    def commit(self, target: SinkTable, table: bigquery.Table, schema: TableSchema, *, soft_delete: bool) -> None:
        """Apply the shadow's net effect to the target (a replay changes nothing)."""
        shadow = self.shadows.pop(target.qualified, None)
        if shadow is None:
            return
        names = [f.name for f in table.schema]
        sql = bq_sql.shadow_apply_sql(
            table_ref(table),
            table_ref(shadow.table),
            names,
            schema.primary_key,
            soft_delete=soft_delete,
            truncated=shadow.truncated,
        )
        try:
            self.sink._query(sql, f"applying a transaction to {target.qualified}")
        finally:
            self._drop(shadow.table)

    def discard(self) -> None:
        """The transaction ends without its Commit: nothing of it reaches the targets."""
        shadows, self.shadows = list(self.shadows.values()), {}
        for shadow in shadows:
            self._drop(shadow.table)

    def _drop(self, table: bigquery.Table) -> None:
        with contextlib.suppress(api_errors.GoogleAPICallError):
            self.sink.client.delete_table(table, not_found_ok=True)

    def _drop_leftovers(self, target: SinkTable) -> None:
        """Shadows of this table left by a crashed run (only this pipeline's run writes the table)."""
        pattern = re.compile(rf"{_PREFIX}{re.escape(target.name)}_[0-9a-f]{{12}}")
        with contextlib.suppress(api_errors.NotFound):
            for item in self.sink.client.list_tables(f"{self.sink.project}.{target.dataset}", retry=self.sink._retry):
                if pattern.fullmatch(item.table_id):
                    self._drop(self.sink.client.get_table(item.reference, retry=self.sink._retry))


def _shadow_target(shadow: Shadow) -> SinkTable:
    return SinkTable(shadow.table.dataset_id, shadow.table.table_id)

