"""BigQuery as a pipeline sink end to end: Dagster jobs → real PostgreSQL → the local-bigquery emulator.

Batch and CDC pipelines are declared like any other (the connection names the emulator as its
`api_endpoint`); every test compares BigQuery with the source row by row. Crashes between a
BigQuery job and its checkpoint are simulated by failing the checkpoint write once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message, pipeline, project, run_job
from bigquery_emulator import RunningEmulator
from cdc_project import cdc_pipeline, run_until_caught_up
from google.api_core.exceptions import NotFound
from google.cloud import bigquery
from refusals import assert_nothing_created
from table_compare import Row, assert_same_rows, bigquery_rows, source_rows

from nilus_dagster.cdc.changes import TableChanges
from nilus_dagster.schema import Column, ColumnType, TableName, TableSchema
from nilus_dagster.sinks.base import CHECKPOINT_TABLE, Checkpoint, SinkTable
from nilus_dagster.sinks.bigquery import BigQuerySink
from nilus_dagster.sinks.bigquery.spanning import ShadowTransaction

# --- fixtures and helpers -----------------------------------------------------------------------

CrashBeforeCheckpoint = Callable[[Callable[[Checkpoint], bool]], list[str]]


@dataclass
class Warehouse:
    """One dataset of the emulator, declared as the pipelines' sink connection `sink`."""

    client: bigquery.Client
    dataset: str
    target: SinkTarget

    def sink(self, strategy: str = "merge", **table_options: Any) -> dict[str, Any]:
        """A pipeline's `sink:` block landing in this dataset."""
        spec: dict[str, Any] = {"connection": "sink", "dataset": self.dataset, "strategy": strategy}
        return {**spec, "table_options": table_options} if table_options else spec

    def ref(self, table: str) -> str:
        return f"{self.client.project}.{self.dataset}.{table}"

    def table(self, name: str) -> bigquery.Table:
        return self.client.get_table(self.ref(name))

    def rows(self, table: str, columns: list[str], order_by: str = "id", *, live: bool = False) -> list[Row]:
        """The table's rows; `live` keeps the CDC rows not (soft-)deleted."""
        source = self.ref(table)
        if live:
            source = f"(SELECT * FROM `{source}` WHERE NOT IFNULL(_nilus_deleted, FALSE))"
        return bigquery_rows(self.client, source, columns, order_by)

    def duplicate_keys(self, table: str, key: str = "id") -> int:
        sql = f"SELECT COUNT(*) - COUNT(DISTINCT `{key}`) AS n FROM `{self.ref(table)}`"
        return next(iter(self.client.query(sql).result()))["n"]

    def checkpoint(self, key: str) -> str | None:
        return BigQuerySink(self.client.project, dataset=self.dataset, client=self.client).read_checkpoint(key)

    def set_checkpoint(self, key: str, value: str) -> None:
        sql = f"UPDATE `{self.ref(CHECKPOINT_TABLE)}` SET value = @value WHERE key = @key"
        parameters = [
            bigquery.ScalarQueryParameter("value", "STRING", value),
            bigquery.ScalarQueryParameter("key", "STRING", key),
        ]
        self.client.query(sql, job_config=bigquery.QueryJobConfig(query_parameters=parameters)).result()


@pytest.fixture
def env(source_db: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SOURCE_DSN", source_db)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    return source_db


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def warehouse(bigquery_emulator: RunningEmulator, bigquery_client: bigquery.Client) -> Iterator[Warehouse]:
    dataset = f"pipes_{uuid.uuid4().hex[:10]}"
    connection = {"type": "bigquery", "project": bigquery_emulator.project, "api_endpoint": bigquery_emulator.url}
    yield Warehouse(bigquery_client, dataset, SinkTarget("bigquery", connection, dataset))
    bigquery_client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)


def execute(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def succeeded(result: dg.ExecuteInProcessResult) -> dg.ExecuteInProcessResult:
    assert result.success, failure_message(result)
    return result


def loaded_rows(result: dg.ExecuteInProcessResult, node: str) -> int:
    return result.asset_materializations_for_node(node)[0].metadata["rows"].value


class SimulatedCrash(RuntimeError):
    """The process dying at this point: not a sink error, which the run would retry or isolate
    to the table (cdc/table_failures.py), so the run ends there."""


@pytest.fixture
def fail_checkpoint_once(monkeypatch: pytest.MonkeyPatch) -> CrashBeforeCheckpoint:
    """Make the next checkpoint write matching `condition` fail after its data job committed
    (a crash between the two); returns the keys that failed."""

    def arm(condition: Callable[[Checkpoint], bool]) -> list[str]:
        original, failed = BigQuerySink._save_checkpoint, []

        def save(sink: BigQuerySink, checkpoint: Checkpoint | None) -> None:
            if checkpoint is not None and not failed and condition(checkpoint):
                failed.append(checkpoint.key)
                raise SimulatedCrash(f"simulated crash before checkpoint {checkpoint.key}")
            original(sink, checkpoint)

        monkeypatch.setattr(BigQuerySink, "_save_checkpoint", save)
        return failed

    return arm


# --- batch --------------------------------------------------------------------------------------

ALL_TYPES_DDL = """
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE public.everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, f4 real, f8 double precision,
    money numeric(12, 2), n numeric(38, 9), n_free numeric, big numeric(30, 12), fine numeric(20, 15),
    whole numeric(38, 0),
    t text, vc varchar(20), ch char(3), b boolean, d date, tm time, ts timestamp, tstz timestamptz,
    j json, jb jsonb, u uuid, raw bytea, ia integer[], ta text[], m mood
);
INSERT INTO public.everything VALUES
 (1, 32767, -2147483648, 1.5, 3.141592653589793, 9999999999.99, 12345678901234567890123456789.123456789, 1.5,
  123456789012345678.123456789012, 12345.123456789012345, 99999999999999999999,
  'plain ✓', 'varchar', 'abc', true, '2024-02-29', '23:59:59.999999', '2024-01-01 12:34:56.789',
  '2024-06-01 12:00:00+05:30', '{"a": [1, 2, {"b": null}]}', '{"k": "v", "n": 1.25}',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10'::bytea, '{1,2,3}', '{"a,b","q\\"uote",""}', 'happy'),
 (2, -32768, 0, -0.0, -1e300, -0.01, -99999999999999999999999999999.999999999, -0.000000001,
  -0.000000000001, -0.000000000000001, -1, '', '', '', false, '0001-01-01', '00:00:00', '1970-01-01 00:00:00',
  '1999-12-31 23:59:59-08', '[]', '[]', '00000000-0000-0000-0000-000000000000', ''::bytea, '{}', '{}', 'sad'),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"""
ALL_TYPES_COLUMNS = [
    "id", "i2", "i4", "f4", "f8", "money", "n", "n_free", "big", "fine", "whole", "t", "vc", "ch", "b", "d",
    "tm", "ts", "tstz", "j", "jb", "u", "raw", "ia", "ta", "m",
]  # fmt: skip
# (BigQuery type, precision, scale, mode) of each column the issue names.
EXPECTED_FIELDS = {
    "money": ("NUMERIC", 12, 2, "NULLABLE"),
    "n": ("NUMERIC", 38, 9, "NULLABLE"),
    "n_free": ("NUMERIC", None, None, "NULLABLE"),
    "big": ("BIGNUMERIC", 30, 12, "NULLABLE"),  # scale > 9
    "fine": ("BIGNUMERIC", 20, 15, "NULLABLE"),
    "whole": ("BIGNUMERIC", 38, 0, "NULLABLE"),  # 38 integer digits > 29
    "ts": ("DATETIME", None, None, "NULLABLE"),
    "tstz": ("TIMESTAMP", None, None, "NULLABLE"),
    "j": ("JSON", None, None, "NULLABLE"),
    "jb": ("JSON", None, None, "NULLABLE"),
    "u": ("STRING", None, None, "NULLABLE"),
    "raw": ("BYTES", None, None, "NULLABLE"),
    "ia": ("INTEGER", None, None, "REPEATED"),
    "ta": ("STRING", None, None, "REPEATED"),
    "m": ("STRING", None, None, "NULLABLE"),
}


def null_arrays_as_empty(rows: list[Row], columns: list[str], arrays: set[str]) -> list[Row]:
    """BigQuery stores a NULL array as an empty one (documented); the expected rows say so too."""
    return [
        tuple(() if value is None and name in arrays else value for name, value in zip(columns, row, strict=True))
        for row in rows
    ]


def test_every_type_lands_exactly(env: str, warehouse: Warehouse, instance: dg.DagsterInstance) -> None:
    execute(env, ALL_TYPES_DDL)
    defs = project(warehouse.target, pipeline("types", ["public.everything"], sink=warehouse.sink()))
    result = succeeded(run_job(defs, "acme__types", instance))
    assert loaded_rows(result, "acme__types__public__everything") == 3
    expected = source_rows(env, "public.everything", ALL_TYPES_COLUMNS, "id")
    expected = null_arrays_as_empty(expected, ALL_TYPES_COLUMNS, {"ia", "ta"})
    assert_same_rows(expected, warehouse.rows("everything", ALL_TYPES_COLUMNS))
    fields = {f.name: (f.field_type, f.precision, f.scale, f.mode) for f in warehouse.table("everything").schema}
    assert {name: fields[name] for name in EXPECTED_FIELDS} == EXPECTED_FIELDS


def test_checkpoints_live_in_the_pipeline_dataset(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    execute(env, "CREATE TABLE public.t (id int PRIMARY KEY)", "INSERT INTO public.t VALUES (1), (2)")
    defs = project(warehouse.target, pipeline("marks", [{"name": "public.t", "cursor": "id"}], sink=warehouse.sink()))
    succeeded(run_job(defs, "acme__marks", instance))
    assert {t.table_id for t in warehouse.client.list_tables(warehouse.dataset)} == {"t", CHECKPOINT_TABLE}
    assert warehouse.checkpoint("acme/marks/public.t") == "2"


def test_incremental_merge_reruns_load_only_new_rows(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    execute(
        env,
        "CREATE TABLE public.orders (id int PRIMARY KEY, status text, updated_at timestamptz NOT NULL)",
        "INSERT INTO public.orders SELECT g, 'new', '2024-01-01'::timestamptz + g * interval '1 minute' "
        "FROM generate_series(1, 100) g",
    )
    spec = pipeline("orders", [{"name": "public.orders", "cursor": "updated_at"}], sink=warehouse.sink())
    defs, node, columns = project(warehouse.target, spec), "acme__orders__public__orders", ["id", "status", "updated_at"]
    assert loaded_rows(succeeded(run_job(defs, "acme__orders", instance)), node) == 100
    execute(
        env,
        "UPDATE public.orders SET status = 'paid', updated_at = '2025-01-01' WHERE id <= 10",
        "INSERT INTO public.orders VALUES (101, 'new', '2025-01-02'), (102, 'new', '2025-01-02')",
    )
    second = succeeded(run_job(defs, "acme__orders", instance))
    assert loaded_rows(second, node) == 12  # 10 updated + 2 new, nothing else re-read
    assert second.asset_materializations_for_node(node)[0].metadata["high_water_mark"].value == "2025-01-02 00:00:00+00"
    assert loaded_rows(succeeded(run_job(defs, "acme__orders", instance)), node) == 0
    assert_same_rows(source_rows(env, "public.orders", columns, "id"), warehouse.rows("orders", columns))


def test_append_with_id_cursor_and_replace(env: str, warehouse: Warehouse, instance: dg.DagsterInstance) -> None:
    execute(
        env,
        "CREATE TABLE public.events (id bigserial PRIMARY KEY, kind text)",
        "CREATE TABLE public.catalog (sku text PRIMARY KEY, price numeric(10,2))",
        "INSERT INTO public.events (kind) SELECT 'view' FROM generate_series(1, 50)",
        "INSERT INTO public.catalog VALUES ('a', 1.00), ('b', 2.00)",
    )
    defs = project(
        warehouse.target,
        pipeline("events", [{"name": "public.events", "cursor": "id"}], sink=warehouse.sink("append")),
        pipeline("catalog", ["public.catalog"], sink=warehouse.sink("replace")),
    )
    jobs = ("acme__events", "acme__catalog")
    for job in jobs:
        succeeded(run_job(defs, job, instance))
    execute(
        env,
        "INSERT INTO public.events (kind) SELECT 'click' FROM generate_series(1, 7)",
        "DELETE FROM public.catalog WHERE sku = 'a'",
        "INSERT INTO public.catalog VALUES ('c', 3.00)",
    )
    for job in jobs:
        succeeded(run_job(defs, job, instance))
    assert_same_rows(source_rows(env, "public.events", ["id", "kind"], "id"), warehouse.rows("events", ["id", "kind"]))
    assert_same_rows(
        source_rows(env, "public.catalog", ["sku", "price"], "sku"), warehouse.rows("catalog", ["sku", "price"], "sku")
    )


def test_new_source_column_is_added(env: str, warehouse: Warehouse, instance: dg.DagsterInstance) -> None:
    execute(env, "CREATE TABLE public.people (id int PRIMARY KEY, name text)", "INSERT INTO public.people VALUES (1, 'ann')")
    defs = project(warehouse.target, pipeline("people", ["public.people"], sink=warehouse.sink()))
    succeeded(run_job(defs, "acme__people", instance))
    execute(
        env,
        "ALTER TABLE public.people ADD COLUMN email text, ADD COLUMN score numeric(12, 4)",
        "INSERT INTO public.people VALUES (2, 'bob', 'bob@example.com', 1.5)",
    )
    result = succeeded(run_job(defs, "acme__people", instance))
    metadata = result.asset_materializations_for_node("acme__people__public__people")[0].metadata
    assert metadata["added_columns"].value == "email, score"
    columns = ["id", "name", "email", "score"]
    assert_same_rows(source_rows(env, "public.people", columns, "id"), warehouse.rows("people", columns))


def test_table_options_from_yaml_apply_to_created_tables(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    execute(
        env,
        "CREATE TABLE public.sales (id int PRIMARY KEY, region text, sold_at timestamptz)",
        "INSERT INTO public.sales VALUES (1, 'eu', '2024-01-05'), (2, 'us', '2024-02-05')",
        "CREATE TABLE public.stock (id int PRIMARY KEY, qty int)",
        "INSERT INTO public.stock SELECT g, g FROM generate_series(1, 30) g",
    )
    partitioned = warehouse.sink(
        partition_by="sold_at", partition_granularity="MONTH", clustering=["region", "id"], labels={"team": "sales"}
    )
    ranged = warehouse.sink(partition_by="id", partition_range=(0, 1000, 100), labels={"mode": "cdc"})
    defs = project(
        warehouse.target,
        pipeline("sales", ["public.sales"], sink=partitioned),
        cdc_pipeline("stock", ["public.stock"], sink=ranged),
    )
    succeeded(run_job(defs, "acme__sales", instance))
    succeeded(run_until_caught_up(defs, "acme__stock", instance))
    sales, stock = warehouse.table("sales"), warehouse.table("stock")
    assert (sales.time_partitioning.type_, sales.time_partitioning.field) == ("MONTH", "sold_at")
    assert (sales.clustering_fields, sales.labels) == (["region", "id"], {"team": "sales"})
    ranges = stock.range_partitioning
    assert (ranges.field, ranges.range_.start, ranges.range_.end, ranges.range_.interval) == ("id", 0, 1000, 100)
    assert stock.labels == {"mode": "cdc"}
    checkpoints = warehouse.table(CHECKPOINT_TABLE)
    assert (checkpoints.time_partitioning, checkpoints.range_partitioning, checkpoints.labels) == (None, None, {})
    assert_same_rows(source_rows(env, "public.stock", ["id", "qty"], "id"), warehouse.rows("stock", ["id", "qty"]))


# --- CDC ----------------------------------------------------------------------------------------

CDC_DDL = """
CREATE TABLE public.orders (
    id bigint PRIMARY KEY, status text NOT NULL, amount numeric(38, 9), placed_at timestamptz,
    attrs jsonb, tags text[], notes text
);
ALTER TABLE public.orders ALTER COLUMN notes SET STORAGE EXTERNAL;  -- long notes are TOASTed out of line
CREATE TABLE public.events (id int PRIMARY KEY, kind text, happened_at timestamp, payload json);
INSERT INTO public.orders
SELECT g, 'new', g * 1.123456789, '2024-01-01 00:00:00+02'::timestamptz + g * interval '1 hour',
       jsonb_build_object('n', g), ARRAY['t' || g], CASE WHEN g % 10 = 0 THEN repeat('x', 3000) END
FROM generate_series(1, 300) g;
INSERT INTO public.events SELECT g, 'boot', '2024-01-01'::timestamp + g * interval '1 minute', '{}'
FROM generate_series(1, 20) g;
"""
ORDER_COLUMNS = ["id", "status", "amount", "placed_at", "attrs", "tags", "notes"]
EVENT_COLUMNS = ["id", "kind", "happened_at", "payload"]


def cdc_workload(dsn: str) -> None:
    """Inserts, updates (TOASTed values untouched, key changes), deletes and a truncate."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(8):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO public.orders SELECT g, 'new', g / 7.0, now(), '{\"k\": [1, 2]}', '{a,b}', NULL "
                    "FROM generate_series(%s::int, %s::int) g",
                    (1000 + i * 10, 1009 + i * 10),
                )
                conn.execute("UPDATE public.orders SET status = 'paid' WHERE id %% 20 = %s::int", (i,))
                conn.execute("DELETE FROM public.orders WHERE id = %s::int", (100 + i,))
        conn.execute("UPDATE public.orders SET status = 'toast-kept' WHERE notes IS NOT NULL")  # TOAST unchanged
        # key changes; id 20's TOASTed notes stay unchanged, so the sink carries them from its old row
        conn.execute("UPDATE public.orders SET id = id + 100000 WHERE id BETWEEN 1 AND 5 OR id = 20")
        with conn.transaction():  # insert and update the same row in one transaction
            conn.execute("INSERT INTO public.orders VALUES (9999, 'a', 1, now(), NULL, NULL, repeat('y', 3000))")
            conn.execute("UPDATE public.orders SET status = 'b' WHERE id = 9999")
        conn.execute("TRUNCATE public.events")
        conn.execute("INSERT INTO public.events VALUES (1, 'after', now(), '{\"x\": 1}'), (2, 'after', now(), NULL)")
        conn.execute("UPDATE public.events SET kind = 'changed' WHERE payload IS NULL")


def assert_replica_matches(env: str, warehouse: Warehouse) -> None:
    for table, columns in (("orders", ORDER_COLUMNS), ("events", EVENT_COLUMNS)):
        expected = null_arrays_as_empty(source_rows(env, f"public.{table}", columns, "id"), columns, {"tags"})
        assert_same_rows(expected, warehouse.rows(table, columns, live=True))
        assert warehouse.duplicate_keys(table) == 0


@pytest.fixture
def shop(env: str, warehouse: Warehouse) -> Callable[..., dg.Definitions]:
    """The CDC pipeline `shop` over public.orders and public.events (source tables created)."""
    execute(env, CDC_DDL)

    def define(**cdc: Any) -> dg.Definitions:
        cdc = {"batch_max_ms": 1500, **cdc}  # few, large batches: each costs BigQuery jobs
        spec = cdc_pipeline("shop", ["public.orders", "public.events"], sink=warehouse.sink(), cdc=cdc)
        return project(warehouse.target, spec)

    return define


def test_cdc_snapshot_then_stream_is_exact(
    env: str, warehouse: Warehouse, shop: Callable[..., dg.Definitions], instance: dg.DagsterInstance
) -> None:
    defs = shop(soft_delete=True)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)
    cdc_workload(env)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)
    tombstones = warehouse.rows("orders", ["id", "_nilus_op"], "id")
    assert (100, "D") in tombstones and (1, "D") in tombstones  # soft deletes keep the row
    toasted = warehouse.rows("orders", ["id", "status", "notes"], live=True)
    assert (10, "toast-kept", "x" * 3000) in toasted  # the unchanged TOASTed value is kept
    assert (100020, "toast-kept", "x" * 3000) in toasted  # also under a new key


def test_cdc_replay_after_crash_between_merge_and_checkpoint(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    fail_checkpoint_once: CrashBeforeCheckpoint,
) -> None:
    defs = shop()
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    key = "acme/shop/public.orders"
    before = warehouse.checkpoint(key)
    assert before is not None
    cdc_workload(env)
    failed = fail_checkpoint_once(lambda checkpoint: checkpoint.key == key)
    crashed = run_until_caught_up(defs, "acme__shop", instance)
    assert not crashed.success and failed == [key]
    assert warehouse.checkpoint(key) == before  # the MERGE committed, its checkpoint did not
    assert (1000,) in warehouse.rows("orders", ["id"], live=True)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))  # the slot replays the batch
    assert warehouse.checkpoint(key) != before
    assert_replica_matches(env, warehouse)
    warehouse.set_checkpoint(key, before)  # a lost checkpoint commit: the stream starts further back
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)


@pytest.fixture
def fail_once(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """Make the first BigQuerySink.<method> call matching `condition(args)` fail, before it runs or
    (`after=True`) after it completed: a run dying at that exact point. Returns what failed."""

    def arm(method: str, condition: Callable[..., bool], *, after: bool = False) -> list[str]:
        original, failed = getattr(BigQuerySink, method), []

        def wrapper(sink: BigQuerySink, *args: Any, **kwargs: Any) -> Any:
            if failed or not condition(*args):
                return original(sink, *args, **kwargs)
            if after:
                original(sink, *args, **kwargs)
            failed.append(method)
            raise SimulatedCrash(f"simulated crash {'after' if after else 'before'} {method}")

        monkeypatch.setattr(BigQuerySink, method, wrapper)
        return failed

    return arm


@pytest.mark.parametrize("point", ["before_merge", "after_checkpoint"])
def test_cdc_crash_before_the_merge_or_after_the_checkpoint_then_exact(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    fail_once: Callable[..., list[str]],
    point: str,
) -> None:
    """The other two crash points of a stream batch (between MERGE and checkpoint: above)."""
    defs = shop()
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    key = "acme/shop/public.orders"
    before = warehouse.checkpoint(key)
    cdc_workload(env)
    if point == "before_merge":
        failed = fail_once("apply_changes", lambda target, schema, changes, checkpoint, *rest: (
            checkpoint is not None and checkpoint.key == key and not changes.is_empty))
    else:
        failed = fail_once("_save_checkpoint", lambda checkpoint: (
            checkpoint is not None and checkpoint.key == key and checkpoint.value != before), after=True)
    crashed = run_until_caught_up(defs, "acme__shop", instance)
    assert not crashed.success and failed
    moved = warehouse.checkpoint(key) != before
    assert moved == (point == "after_checkpoint")
    execute(env, "INSERT INTO public.orders VALUES (77777, 'late', 1, now(), NULL, NULL, NULL)",
            "UPDATE public.orders SET status = 'late' WHERE id = 1000")  # changes arriving before the next run
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)


def test_cdc_snapshot_partition_replayed_after_crash_is_not_duplicated(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    fail_once: Callable[..., list[str]],
) -> None:
    """A partition's rows and checkpoint commit in one transaction; the run dies before the state
    store records the partition: the next run finds the checkpoint and does not load it again."""
    defs = shop(snapshot_partition_blocks=2, snapshot_workers=1)
    first_partition = "/public.orders/0"  # key: acme/shop/snapshot/<generation>/public.orders/<partition>

    def first_partition_write(target: SinkTable, schema: Any, batches: Any, strategy: Any, checkpoint: Any = None) -> bool:
        return checkpoint is not None and "/snapshot/" in checkpoint.key and checkpoint.key.endswith(first_partition)

    failed = fail_once("write", first_partition_write, after=True)
    assert not run_until_caught_up(defs, "acme__shop", instance).success and failed
    assert warehouse.rows("orders", ["id"])  # the partition's rows landed before the crash
    cdc_workload(env)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)


def test_cdc_new_source_column_appears_mid_stream(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    """The last transaction before caught-up carries a schema change: the batch it joins (after
    the earlier ones were flushed ahead of the change) is still applied, so the run stops."""
    execute(
        env,
        "CREATE TABLE public.items (id int PRIMARY KEY, name text)",
        "INSERT INTO public.items VALUES (1, 'a')",
        "CREATE TABLE public.unpublished (n int)",
    )
    defs = project(warehouse.target, cdc_pipeline("items", ["public.items"], sink=warehouse.sink()))
    succeeded(run_until_caught_up(defs, "acme__items", instance))
    execute(
        env,
        "INSERT INTO public.items VALUES (2, 'b')",
        "ALTER TABLE public.items ADD COLUMN price numeric(10, 2), ADD COLUMN seen timestamptz",
        "INSERT INTO public.items VALUES (3, 'c', 9.99, '2024-05-01 10:00:00+00')",
        "UPDATE public.items SET price = 1.25 WHERE id = 1",
        # older rows read a constant default as PostgreSQL reports it
        "ALTER TABLE public.items ADD COLUMN qty int DEFAULT 4, ADD COLUMN tag text DEFAULT 'it''s'",
        "INSERT INTO public.items (id, name, qty) VALUES (4, 'd', 1)",
        # WAL the pipeline does not stream: the caught-up target lies past its last transaction
        "INSERT INTO public.unpublished VALUES (1)",
    )
    succeeded(run_until_caught_up(defs, "acme__items", instance))
    assert [f.name for f in warehouse.table("items").schema][-4:] == ["price", "seen", "qty", "tag"]
    columns = ["id", "name", "price", "seen", "qty", "tag"]
    rows = warehouse.rows("items", columns, live=True)
    assert [(row[0], row[4], row[5]) for row in rows] == [(1, 4, "it's"), (2, 4, "it's"), (3, 4, "it's"), (4, 1, "it's")]
    assert_same_rows(source_rows(env, "public.items", columns, "id"), rows)


def test_cdc_column_retyped_by_a_rewrite_resyncs_into_a_recreated_table(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance
) -> None:
    """ALTER COLUMN TYPE ... USING rewrites every row without streaming them: a resync recreates
    the BigQuery table with the new column type and copies the rewritten rows."""
    execute(
        env,
        "CREATE TABLE public.items (id int PRIMARY KEY, counter int)",
        "INSERT INTO public.items SELECT g, g FROM generate_series(1, 50) g",
    )
    defs = project(warehouse.target, cdc_pipeline("items", ["public.items"], sink=warehouse.sink()))
    succeeded(run_until_caught_up(defs, "acme__items", instance))
    assert {f.name: f.field_type for f in warehouse.table("items").schema}["counter"] == "INTEGER"
    execute(
        env,
        "UPDATE public.items SET counter = 5 WHERE id <= 10",  # streamed under the old type
        "ALTER TABLE public.items ALTER COLUMN counter TYPE text USING (counter::text || '!')",
        "UPDATE public.items SET counter = 'after' WHERE id > 45",
    )
    resync = {"ops": {"acme__items__resync_op": {"config": {"tables": ["public.items"], "reason": "retyped"}}}}
    succeeded(defs.resolve_job_def("acme__items__resync").execute_in_process(instance=instance, run_config=resync))
    succeeded(run_until_caught_up(defs, "acme__items", instance))  # no live run: this one resyncs first
    execute(env, "INSERT INTO public.items VALUES (51, 'new')")
    succeeded(run_until_caught_up(defs, "acme__items", instance))
    assert {f.name: f.field_type for f in warehouse.table("items").schema}["counter"] == "STRING"
    rows = warehouse.rows("items", ["id", "counter"], live=True)
    assert rows[0] == (1, "5!") and rows[-1] == (51, "new")
    assert_same_rows(source_rows(env, "public.items", ["id", "counter"], "id"), rows)


def test_cdc_table_without_key_is_refused_before_anything_is_created(
    env: str, warehouse: Warehouse, instance: dg.DagsterInstance, state_dsn: str
) -> None:
    execute(
        env,
        "CREATE TABLE public.log (line text)",
        "ALTER TABLE public.log REPLICA IDENTITY FULL",
        "INSERT INTO public.log VALUES ('x')",
        "CREATE TABLE public.stock (id int PRIMARY KEY, qty int)",
        "INSERT INTO public.stock VALUES (1, 1)",
    )
    defs = project(warehouse.target, cdc_pipeline("log", ["public.stock", "public.log"], sink=warehouse.sink()))
    result = run_until_caught_up(defs, "acme__log", instance)
    assert not result.success
    assert "public.log has no primary key (add one, or declare primary_key" in failure_message(result)
    assert_nothing_created(env, state_dsn, "acme", "log")
    with pytest.raises(NotFound):
        warehouse.client.get_dataset(warehouse.dataset)  # not even the dataset: no table of the other table


# --- the sink alone: a ChangeSet replayed after a crash -------------------------------------------

DOCS = TableSchema(
    TableName("public", "docs"),
    (Column("id", ColumnType("int64")), Column("title", ColumnType("text")), Column("body", ColumnType("text"))),
    ("id",),
)


def decoded_batch() -> TableChanges:
    """What the stream builds from pgoutput: an insert, an update with an unchanged TOASTed body,
    a key change and a delete."""
    changes = TableChanges(DOCS)
    changes.insert({"id": "3", "title": "t3", "body": "b3"}, set(), 30)
    changes.update({"id": "1", "title": "T1", "body": None}, {"body"}, None, 31)
    changes.update({"id": "20", "title": "t20", "body": "b20"}, set(), {"id": "2", "title": None, "body": None}, 32)
    changes.delete({"id": "4", "title": None, "body": None}, 33)
    return changes


def test_change_set_reapplied_after_crash_before_checkpoint(
    bigquery_sink: BigQuerySink, fail_checkpoint_once: CrashBeforeCheckpoint
) -> None:
    """Soft deletes, so tombstones must survive the replay too (truncate replays: test_sink_bigquery)."""
    target, key = SinkTable(bigquery_sink.dataset, "docs"), "acme/docs/public.docs"
    initial = TableChanges(DOCS)
    for i in (1, 2, 4):
        initial.insert({"id": str(i), "title": f"t{i}", "body": f"b{i}"}, set(), 10 + i)
    bigquery_sink.apply_changes(target, DOCS, initial.to_change_set(), Checkpoint(key, "0/20"), soft_delete=True)
    batch = decoded_batch().to_change_set()
    fail_checkpoint_once(lambda checkpoint: True)
    with pytest.raises(SimulatedCrash, match="simulated crash"):
        bigquery_sink.apply_changes(target, DOCS, batch, Checkpoint(key, "0/40"), soft_delete=True)
    assert bigquery_sink.read_checkpoint(key) == "0/20"
    view = "id, title, body, _nilus_lsn, _nilus_deleted"
    sql = f"SELECT {view} FROM `{bigquery_sink.project}.{bigquery_sink.dataset}.docs` ORDER BY id"
    first = [tuple(row.values()) for row in bigquery_sink.client.query(sql).result()]
    bigquery_sink.apply_changes(target, DOCS, batch, Checkpoint(key, "0/40"), soft_delete=True)  # the replay
    assert [tuple(row.values()) for row in bigquery_sink.client.query(sql).result()] == first
    assert bigquery_sink.read_checkpoint(key) == "0/40"
    assert [row[:3] for row in first if not row[-1]] == [(1, "T1", "b1"), (3, "t3", "b3"), (20, "t20", "b20")]
    assert [row[0] for row in first if row[-1]] == [2, 4]  # the tombstones


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tables of every chunk applied to a shadow table (a transaction applied in chunks)."""
    seen: list[str] = []
    original = ShadowTransaction.apply_chunk

    def spy(span: ShadowTransaction, target: SinkTable, *args: Any, **kwargs: Any) -> None:
        seen.append(target.name)
        original(span, target, *args, **kwargs)

    monkeypatch.setattr(ShadowTransaction, "apply_chunk", spy)
    return seen


def test_cdc_transactions_bigger_than_batch_max_rows_are_applied_in_chunks(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    chunks: list[str],
) -> None:
    """Chunks of a big transaction go to shadow tables, applied to the targets at its Commit."""
    defs = shop(batch_max_rows=5)  # the workload's transactions hold 10-30 changes each
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    cdc_workload(env)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)
    assert "orders" in chunks  # (the workload's transactions on events are small)


def big_transaction(dsn: str) -> None:
    """One transaction of ~70 changes: inserts then updates of the same rows (TOASTed notes left
    unchanged, so carried from an earlier chunk), key changes of TOASTed rows, deletes, a truncate."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO public.orders SELECT g, 'new', g, now(), NULL, '{x}', repeat('z', 3000) "
            "FROM generate_series(2000, 2019) g"
        )
        conn.execute("TRUNCATE public.events")
        conn.execute("INSERT INTO public.events VALUES (1, 'in-tx', now(), NULL), (2, 'in-tx', now(), NULL)")
        conn.execute("UPDATE public.orders SET status = 'big' WHERE id BETWEEN 2000 AND 2019")
        conn.execute("UPDATE public.orders SET id = id + 50000 WHERE id IN (10, 20, 30)")
        conn.execute("UPDATE public.orders SET status = 'moved' WHERE id = 50010")
        conn.execute("DELETE FROM public.orders WHERE id BETWEEN 2015 AND 2019 OR id BETWEEN 40 AND 45")
        conn.execute("UPDATE public.events SET kind = 'again' WHERE id = 1")


@pytest.mark.parametrize("soft_delete", [False, True])
def test_cdc_big_transaction_abandoned_leaves_targets_untouched_then_exact(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    chunks: list[str],
    fail_once: Callable[..., list[str]],
    soft_delete: bool,
) -> None:
    defs = shop(batch_max_rows=8, soft_delete=soft_delete)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    columns = [*ORDER_COLUMNS, "_nilus_lsn", "_nilus_deleted"]
    before = warehouse.rows("orders", columns), warehouse.rows("events", [*EVENT_COLUMNS, "_nilus_deleted"])
    big_transaction(env)
    failed = fail_once("_save_checkpoint", lambda checkpoint: checkpoint is not None and len(chunks) > 2)
    assert not run_until_caught_up(defs, "acme__shop", instance).success and failed
    assert (warehouse.rows("orders", columns), warehouse.rows("events", [*EVENT_COLUMNS, "_nilus_deleted"])) != before
    # the first table's MERGE landed, its checkpoint did not: the replay must change nothing there
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)
    assert len(chunks) > 4
    leftovers = [t.table_id for t in warehouse.client.list_tables(warehouse.dataset) if "_nilus_" in t.table_id]
    assert leftovers == [CHECKPOINT_TABLE]
    toasted = warehouse.rows("orders", ["id", "status", "notes"], live=True)
    assert (2000, "big", "z" * 3000) in toasted and (50010, "moved", "x" * 3000) in toasted


def test_cdc_big_transaction_cut_short_leaves_targets_untouched(
    env: str,
    warehouse: Warehouse,
    shop: Callable[..., dg.Definitions],
    instance: dg.DagsterInstance,
    chunks: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run fails after some chunks, before the Commit: the targets never saw any of it."""
    defs = shop(batch_max_rows=8)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    before = warehouse.rows("orders", ORDER_COLUMNS), warehouse.rows("events", EVENT_COLUMNS)
    big_transaction(env)
    original = ShadowTransaction.apply_chunk

    def fail_third(span: ShadowTransaction, *args: Any, **kwargs: Any) -> None:
        if len(chunks) >= 3:
            raise SimulatedCrash("simulated crash in the middle of a transaction")
        original(span, *args, **kwargs)

    monkeypatch.setattr(ShadowTransaction, "apply_chunk", fail_third)
    assert not run_until_caught_up(defs, "acme__shop", instance).success
    assert (warehouse.rows("orders", ORDER_COLUMNS), warehouse.rows("events", EVENT_COLUMNS)) == before
    monkeypatch.setattr(ShadowTransaction, "apply_chunk", original)
    succeeded(run_until_caught_up(defs, "acme__shop", instance))
    assert_replica_matches(env, warehouse)
