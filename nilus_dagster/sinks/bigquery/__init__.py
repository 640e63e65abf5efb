"""BigQuery sink: Parquet load jobs, MERGE by primary key, CDC MERGE de-duplicated by LSN.

BigQuery commits each job on its own, so every write is either one transaction holding its
checkpoint, or idempotent with the checkpoint written after it: a replay after a crash at any
point changes nothing.

- append with a checkpoint (a cursor): load into a staging table, then one multi-statement
  transaction inserts the rows and moves the checkpoint from the mark the load read from to the
  new one, only while the checkpoint still holds the old mark. A replay of the range (whatever
  arrived in the source since) finds the checkpoint moved and adds nothing. Without a checkpoint
  an append is one load job and not replay-safe (every run appends what it reads).
- replace: load into a staging table, then `DELETE` + `INSERT ... SELECT` in one transaction
  (readers see the old or the new rows; the table keeps its options, policies and description).
- merge: load into a staging table, then one MERGE by primary key (the last row per key wins).
- CDC: load the ChangeSet into a staging table, then one MERGE keeping the last change per key
  by `_nilus_lsn` and touching a row only when the staged LSN is newer than the row's. A truncate
  is part of that MERGE (`WHEN NOT MATCHED BY SOURCE`) and removes only rows older than the
  batch, so a replay keeps what the first attempt wrote. Moved rows (a key change with unchanged
  TOASTed values) take those values from the row at the old key inside the same MERGE.
- CDC, a transaction of more than `batch_max_rows` changes (`change_transaction`): its chunks go
  to a shadow table per target, whose net effect one MERGE applies at the source Commit, then the
  checkpoint (spanning.py); an abandoned transaction never reaches the target.

A resync beside the stream writes through `fork()`: a second sink with its own client and table
cache; the two serialize their writes of the checkpoint table (concurrent DML on one table conflicts).

Loads never pass a schema: the target (or staging) table exists first and its schema applies,
so a load can neither drop nor retype a column.

Transient errors (rate limits, quota, 5xx, concurrent-update conflicts) are retried with
backoff; everything else becomes a SinkError naming the table, the job and BigQuery's reasons.

Modules: `sink` (the protocol), `jobs` (client, tables, loads, queries), `sql` (statement text),
`files` (Arrow → Parquet), `options` (partitioning/clustering), `errors` (retries, messages),
`spanning` (big transactions in chunks).
"""

from nilus_dagster.sinks.bigquery.errors import is_transient
from nilus_dagster.sinks.bigquery.options import (
    BigQueryTableOptions,
    ColumnTimePartitioning,
    IngestionTimePartitioning,
    IntegerRangePartitioning,
    Partitioning,
    table_options_from_spec,
)
from nilus_dagster.sinks.bigquery.sink import CDC_FIELDS, DEFAULT_STATE_DATASET, BigQuerySink, open_bigquery_sink
from nilus_dagster.sinks.bigquery.sql import batch_merge_sql, cdc_merge_sql, replace_sql, truncate_sql

__all__ = [
    "CDC_FIELDS",
    "DEFAULT_STATE_DATASET",
    "BigQuerySink",
    "BigQueryTableOptions",
    "ColumnTimePartitioning",
    "IngestionTimePartitioning",
    "IntegerRangePartitioning",
    "Partitioning",
    "batch_merge_sql",
    "cdc_merge_sql",
    "is_transient",
    "open_bigquery_sink",
    "replace_sql",
    "table_options_from_spec",
    "truncate_sql",
]
