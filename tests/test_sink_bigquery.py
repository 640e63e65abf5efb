"""BigQuerySink against the local-bigquery emulator (no mocks), plus one opt-in live test.

The emulator is installed and started by `bigquery_emulator.py` (the first run builds its venv,
~40 s; later runs reuse it). The live test runs only with `pytest -m bigquery_live` and these
environment variables:

- `NILUS_BIGQUERY_PROJECT`: a project where the credentials may create datasets and run jobs;
- `NILUS_BIGQUERY_LOCATION`: optional, default `US`;
- `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key file (else Application Default
  Credentials). The test creates and drops a dataset `nilus_live_<random>`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest
from google.api_core import exceptions as api_errors
from google.cloud import bigquery

from nilus_dagster.schema import Column, ColumnType, TableName, TableSchema, arrow_schema
from nilus_dagster.sinks.base import (
    CHECKPOINT_TABLE,
    LSN_COLUMN,
    OP_COLUMN,
    UNCHANGED_COLUMN,
    ChangeSet,
    Checkpoint,
    MarkCheckpoint,
    SinkError,
    SinkTable,
    UnsupportedColumnType,
    WriteStrategy,
    old_key_column,
)
from nilus_dagster.sinks.bigquery import (
    BigQuerySink,
    BigQueryTableOptions,
    ColumnTimePartitioning,
    IngestionTimePartitioning,
    IntegerRangePartitioning,
    cdc_merge_sql,
    is_transient,
    table_options_from_spec,
)
from nilus_dagster.sinks.bigquery_types import bigquery_field, iso_duration
from nilus_dagster.spec.pipelines import BigQueryTableOptions as SpecTableOptions

# --- helpers ------------------------------------------------------------------------------------


def col(name: str, kind: str, **kwargs: Any) -> Column:
    element = kwargs.pop("element", None)
    return Column(name, ColumnType(kind, element=ColumnType(element) if element else None, **kwargs))  # type: ignore[arg-type]


def table_schema(name: str, columns: list[Column], key: tuple[str, ...] = ("id",)) -> TableSchema:
    return TableSchema(TableName("public", name), tuple(columns), key)


def batch(schema: TableSchema, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=arrow_schema(schema))


def change_set(
    schema: TableSchema,
    upserts: list[dict[str, Any]] = (),  # type: ignore[assignment]
    deletes: list[dict[str, Any]] = (),  # type: ignore[assignment]
    *,
    truncate: bool = False,
    moved: list[dict[str, Any]] | None = None,
) -> ChangeSet:
    upsert_schema = arrow_schema(schema).append(pa.field(LSN_COLUMN, pa.int64()))
    upsert_schema = upsert_schema.append(pa.field(OP_COLUMN, pa.string()))
    upsert_schema = upsert_schema.append(pa.field(UNCHANGED_COLUMN, pa.list_(pa.string())))
    key_fields = [arrow_schema(schema).field(k) for k in schema.primary_key]
    delete_schema = pa.schema([*key_fields, pa.field(LSN_COLUMN, pa.int64())])
    return ChangeSet(
        upserts=pa.Table.from_pylist(list(upserts), schema=upsert_schema),
        deletes=pa.Table.from_pylist(list(deletes), schema=delete_schema),
        truncate=truncate,
        moved=pa.Table.from_pylist(moved, schema=moved_schema(schema)) if moved is not None else None,
    )


def moved_schema(schema: TableSchema) -> pa.Schema:
    """ChangeSet.moved: the new key, the old key as `_nilus_old_<key>`, `_nilus_unchanged`."""
    key_fields = [arrow_schema(schema).field(k) for k in schema.primary_key]
    old_fields = [f.with_name(old_key_column(f.name)) for f in key_fields]
    return pa.schema([*key_fields, *old_fields, pa.field(UNCHANGED_COLUMN, pa.list_(pa.string()))])


def read_rows(sink: BigQuerySink, name: str, columns: str = "*") -> list[dict[str, Any]]:
    sql = f"SELECT {columns} FROM `{sink.project}.{sink.dataset}.{name}` ORDER BY id"
    return [dict(row) for row in sink.client.query(sql).result()]


def target(sink: BigQuerySink, name: str) -> SinkTable:
    return SinkTable(sink.dataset, name)


# --- every type round-trips ---------------------------------------------------------------------

ALL_TYPES = table_schema(
    "all_types",
    [
        col("id", "int64"),
        col("flag", "bool"),
        col("small", "int16"),
        col("medium", "int32"),
        col("real", "float32"),
        col("double", "float64"),
        col("money", "decimal", precision=12, scale=2),
        col("big", "decimal", precision=30, scale=12),  # s > 9: BIGNUMERIC
        col("free", "decimal"),  # unconstrained: decimal(38,9)
        col("label", "text"),
        col("doc", "json"),
        col("ident", "uuid"),
        col("blob", "bytes"),
        col("day", "date"),
        col("clock", "time"),
        col("local", "timestamp"),
        col("instant", "timestamptz"),
        col("span", "interval"),
        col("tags", "list", element="text"),
        col("scores", "list", element="int64"),
    ],
)
ALL_TYPES_ROWS = [
    {
        "id": 1,
        "flag": True,
        "small": -32768,
        "medium": 2147483647,
        "real": 1.5,
        "double": 1e300,
        "money": Decimal("9999999999.99"),
        "big": Decimal("123456789012345678.123456789012"),
        "free": Decimal("12345678901234567890123456789.123456789"),
        "label": "héllo ✓",
        "doc": '{"a": [1, 2, {"b": null}], "c": "d"}',
        "ident": "5f0c6a9e-3b1a-4c1e-9d7e-1f2a3b4c5d6e",
        "blob": b"\x00\xffbin",
        "day": dt.date(2024, 2, 29),
        "clock": dt.time(23, 59, 59, 999999),
        "local": dt.datetime(1999, 12, 31, 23, 59, 59, 123456),
        "instant": dt.datetime(2024, 3, 31, 1, 30, 0, 1, tzinfo=dt.UTC),
        "span": pa.scalar((14, 3, 14_706_789_000_000), pa.month_day_nano_interval()).as_py(),
        "tags": ["a", "b"],
        "scores": [3, 1, 2],
    },
    {"id": 2, "tags": None, "scores": []},  # every other value NULL
]


def expected_row(row: dict[str, Any]) -> dict[str, Any]:
    """What BigQuery gives back for an input row: the documented conversions, nothing else."""
    out = {c.name: row.get(c.name) for c in ALL_TYPES.columns}
    out["doc"] = json.loads(out["doc"]) if out["doc"] else None
    span = out["span"]
    out["span"] = iso_duration(span.months, span.days, span.nanoseconds) if span else None
    out["tags"] = out["tags"] or []  # BigQuery stores a NULL array as empty
    return out


def check_all_types_round_trip(sink: BigQuerySink) -> None:
    result = sink.write(
        target(sink, "all_types"), ALL_TYPES, [batch(ALL_TYPES, ALL_TYPES_ROWS)], WriteStrategy.APPEND
    )
    assert result.rows == 2
    rows = read_rows(sink, "all_types")
    for got, wanted in zip(rows, map(expected_row, ALL_TYPES_ROWS), strict=True):
        for name, value in wanted.items():
            assert got[name] == value, f"column {name}: {got[name]!r} != {value!r}"


def test_every_type_round_trips(bigquery_sink: BigQuerySink) -> None:
    check_all_types_round_trip(bigquery_sink)
    table = bigquery_sink.client.get_table(f"{bigquery_sink.project}.{bigquery_sink.dataset}.all_types")
    types = {f.name: (f.field_type, f.mode) for f in table.schema}
    assert types["big"][0] == "BIGNUMERIC" and types["money"][0] == "NUMERIC"
    assert (
        types["doc"][0] == "JSON" and types["local"][0] == "DATETIME" and types["instant"][0] == "TIMESTAMP"
    )
    assert types["tags"] == ("STRING", "REPEATED") and types["span"][0] == "STRING"


def test_interval_text_is_iso_8601() -> None:
    assert iso_duration(14, 3, 14_706_789_000_000) == "P1Y2M3DT4H5M6.789S"
    assert iso_duration(-1, 0, -1_500_000_000) == "P-1MT-1.5S"
    assert iso_duration(0, 0, 0) == "PT0S"


@pytest.mark.parametrize(
    ("precision", "scale", "bigquery_type"),
    [
        (38, 9, "NUMERIC"),
        (29, 0, "NUMERIC"),
        (10, 10, "BIGNUMERIC"),
        (76, 38, "BIGNUMERIC"),
        (40, 2, "BIGNUMERIC"),
    ],
)
def test_decimal_maps_to_numeric_or_bignumeric(precision: int, scale: int, bigquery_type: str) -> None:
    field = bigquery_field(col("n", "decimal", precision=precision, scale=scale), "public.t")
    assert (field.field_type, field.precision, field.scale) == (bigquery_type, precision, scale)


@pytest.mark.parametrize(("precision", "scale"), [(77, 38), (50, 39), (10, -2)])
def test_decimal_beyond_bignumeric_is_refused_naming_the_column(precision: int, scale: int) -> None:
    with pytest.raises(UnsupportedColumnType, match="'amount'"):
        bigquery_field(col("amount", "decimal", precision=precision, scale=scale), "public.t")


def test_array_with_null_element_fails_naming_column_and_row(bigquery_sink: BigQuerySink) -> None:
    schema = table_schema("arrays", [col("id", "int64"), col("tags", "list", element="text")])
    rows = [{"id": 1, "tags": ["a"]}, {"id": 2, "tags": ["b", None]}]
    with pytest.raises(SinkError, match=r"'tags' of public.arrays: row 1 .*NULL element"):
        bigquery_sink.write(
            target(bigquery_sink, "arrays"), schema, [batch(schema, rows)], WriteStrategy.APPEND
        )


def test_arrays_of_arrays_are_refused() -> None:
    nested = Column("m", ColumnType("list", element=ColumnType("list", element=ColumnType("int64"))))
    with pytest.raises(UnsupportedColumnType, match="'m'"):
        bigquery_field(nested, "public.t")


# --- batch strategies ---------------------------------------------------------------------------

ITEMS = table_schema("items", [col("id", "int64"), col("name", "text"), col("qty", "int32")])


def write_items(sink: BigQuerySink, rows: list[dict[str, Any]], strategy: WriteStrategy, **kw: Any) -> None:
    sink.write(target(sink, "items"), ITEMS, [batch(ITEMS, rows)], strategy, **kw)


def test_append_then_replace(bigquery_sink: BigQuerySink) -> None:
    write_items(bigquery_sink, [{"id": 1, "name": "a", "qty": 1}], WriteStrategy.APPEND)
    write_items(bigquery_sink, [{"id": 2, "name": "b", "qty": 2}], WriteStrategy.APPEND)
    assert [r["id"] for r in read_rows(bigquery_sink, "items")] == [1, 2]
    write_items(bigquery_sink, [{"id": 3, "name": "c", "qty": 3}], WriteStrategy.REPLACE)
    assert read_rows(bigquery_sink, "items") == [{"id": 3, "name": "c", "qty": 3}]
    bigquery_sink.write(target(bigquery_sink, "items"), ITEMS, [], WriteStrategy.REPLACE)
    assert read_rows(bigquery_sink, "items") == []


def test_merge_upserts_by_key_and_last_row_wins(bigquery_sink: BigQuerySink) -> None:
    write_items(bigquery_sink, [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}], "merge")  # type: ignore[arg-type]
    rows = [
        {"id": 2, "name": "B", "qty": 20},
        {"id": 3, "name": "c", "qty": 3},
        {"id": 2, "name": "B2", "qty": 21},
    ]
    result = bigquery_sink.write(target(bigquery_sink, "items"), ITEMS, [batch(ITEMS, rows)], WriteStrategy.MERGE)
    assert result.inserted == 1  # id 3 (from the MERGE's DML statistics); id 2 was updated
    assert read_rows(bigquery_sink, "items") == [
        {"id": 1, "name": "a", "qty": 1},
        {"id": 2, "name": "B2", "qty": 21},
        {"id": 3, "name": "c", "qty": 3},
    ]


def test_merge_without_primary_key_is_refused(bigquery_sink: BigQuerySink) -> None:
    keyless = table_schema("keyless", [col("id", "int64")], key=())
    with pytest.raises(SinkError, match="no primary key"):
        bigquery_sink.write(target(bigquery_sink, "keyless"), keyless, [], WriteStrategy.MERGE)


def test_append_replay_with_same_checkpoint_adds_nothing(bigquery_sink: BigQuerySink) -> None:
    check_append_replay_adds_nothing(bigquery_sink)


def check_append_replay_adds_nothing(bigquery_sink: BigQuerySink) -> None:
    checkpoint = MarkCheckpoint("acme/items_sync/public.items", "2024-01-01T00:00:00")
    rows = [{"id": 1, "name": "a", "qty": 1}]
    write_items(bigquery_sink, rows, WriteStrategy.APPEND, checkpoint=checkpoint)
    write_items(bigquery_sink, rows, WriteStrategy.APPEND, checkpoint=checkpoint)  # crash replay
    assert len(read_rows(bigquery_sink, "items")) == 1
    assert bigquery_sink.read_checkpoint(checkpoint.key) == checkpoint.value
    following = MarkCheckpoint(checkpoint.key, "next", previous=checkpoint.value)
    write_items(bigquery_sink, rows, WriteStrategy.APPEND, checkpoint=following)
    assert len(read_rows(bigquery_sink, "items")) == 2
    assert bigquery_sink.read_checkpoint(checkpoint.key) == "next"
    assert bigquery_sink.read_checkpoint("unknown") is None


def test_append_replay_of_a_wider_range_is_refused_and_adds_nothing(bigquery_sink: BigQuerySink) -> None:
    check_append_from_a_stale_mark_is_refused(bigquery_sink)


def check_append_from_a_stale_mark_is_refused(bigquery_sink: BigQuerySink) -> None:
    """A run that read from the old mark while an earlier run's transaction committed meanwhile
    (more rows arrived, so its range differs): nothing lands twice, the next run goes on from the mark."""
    key = "acme/items_sync/public.items"
    write_items(bigquery_sink, [{"id": 1, "name": "a", "qty": 1}], WriteStrategy.APPEND, checkpoint=MarkCheckpoint(key, "1"))
    late = [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}]
    with pytest.raises(SinkError, match=r"did not append .*checkpoint acme/items_sync/public.items is '1', not None"):
        write_items(bigquery_sink, late, WriteStrategy.APPEND, checkpoint=MarkCheckpoint(key, "2"))
    assert [r["id"] for r in read_rows(bigquery_sink, "items")] == [1]
    write_items(bigquery_sink, late[1:], WriteStrategy.APPEND, checkpoint=MarkCheckpoint(key, "2", previous="1"))
    assert [r["id"] for r in read_rows(bigquery_sink, "items")] == [1, 2]
    tables = {t.table_id for t in bigquery_sink.client.list_tables(bigquery_sink.dataset)}
    assert "items" in tables and not [t for t in tables if t.startswith("_nilus_stage_")]  # no staging table left


def test_schema_evolution_adds_columns_and_tolerates_dropped_ones(bigquery_sink: BigQuerySink) -> None:
    items = target(bigquery_sink, "items")
    assert bigquery_sink.prepare_table(items, ITEMS) == []
    write_items(bigquery_sink, [{"id": 1, "name": "a", "qty": 1}], WriteStrategy.APPEND)
    wider = table_schema("items", [*ITEMS.columns, col("price", "decimal", precision=10, scale=2)])
    assert bigquery_sink.prepare_table(items, wider) == ["price"]
    narrower = table_schema("items", [col("id", "int64"), col("price", "decimal", precision=10, scale=2)])
    result = bigquery_sink.write(
        items, narrower, [batch(narrower, [{"id": 2, "price": Decimal("9.99")}])], "append"
    )  # type: ignore[arg-type]
    assert result.added_columns == []
    for strategy in (WriteStrategy.MERGE, WriteStrategy.REPLACE):
        bigquery_sink.write(
            items, narrower, [batch(narrower, [{"id": 2, "price": Decimal("1.25")}])], strategy
        )
    assert read_rows(bigquery_sink, "items") == [
        {"id": 2, "name": None, "qty": None, "price": Decimal("1.25")}
    ]


def test_column_type_conflict_is_reported_naming_the_column(bigquery_sink: BigQuerySink) -> None:
    client = bigquery_sink.client
    client.create_dataset(bigquery_sink.dataset)
    ref = f"{bigquery_sink.project}.{bigquery_sink.dataset}.clash"
    schema = [bigquery.SchemaField("id", "INT64"), bigquery.SchemaField("name", "INT64")]
    client.create_table(bigquery.Table(ref, schema=schema))
    clash = table_schema("clash", [col("id", "int64"), col("name", "text")])
    with pytest.raises(SinkError, match=r"appending to nilus_\w+\.clash .*source column name"):
        bigquery_sink.write(
            target(bigquery_sink, "clash"), clash, [batch(clash, [{"id": 1, "name": "x"}])], "append"
        )  # type: ignore[arg-type]


def test_transient_errors_are_retried_others_not() -> None:
    assert is_transient(api_errors.ServiceUnavailable("down"))
    assert is_transient(api_errors.Forbidden("slow down", errors=[{"reason": "rateLimitExceeded"}]))
    assert is_transient(api_errors.BadRequest("Could not serialize access due to concurrent update"))
    assert not is_transient(api_errors.Forbidden("denied", errors=[{"reason": "accessDenied"}]))
    assert not is_transient(api_errors.BadRequest("bad", errors=[{"reason": "invalid"}]))


# --- table options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            BigQueryTableOptions(ColumnTimePartitioning("ts", "MONTH"), ("id",), {"team": "data"}),
            ("MONTH", "ts", None, ["id"], {"team": "data"}),
        ),
        (BigQueryTableOptions(IngestionTimePartitioning("HOUR")), ("HOUR", None, None, None, {})),
        (
            BigQueryTableOptions(IntegerRangePartitioning("id", 0, 1000, 10), ("name", "id")),
            (None, None, (0, 1000, 10), ["name", "id"], {}),
        ),
    ],
)
def test_table_options_apply_at_creation(
    bigquery_client: bigquery.Client, options: BigQueryTableOptions, expected: tuple[Any, ...]
) -> None:
    dataset = f"nilus_{uuid.uuid4().hex[:10]}"
    sink = BigQuerySink(
        bigquery_client.project, dataset=dataset, client=bigquery_client, options_by_table={"events": options}
    )
    schema = table_schema("events", [col("id", "int64"), col("name", "text"), col("ts", "timestamptz")])
    try:
        sink.prepare_table(SinkTable(dataset, "events"), schema)
        table = bigquery_client.get_table(f"{bigquery_client.project}.{dataset}.events")
        time_part, ranges = table.time_partitioning, table.range_partitioning
        got = (
            time_part.type_ if time_part else None,
            time_part.field if time_part else None,
            (ranges.range_.start, ranges.range_.end, ranges.range_.interval) if ranges else None,
            table.clustering_fields,
            table.labels,
        )
        assert got == expected
    finally:
        bigquery_client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)


def test_table_options_from_pipeline_yaml() -> None:
    spec = SpecTableOptions(
        partition_by="ts", partition_granularity="MONTH", clustering=["id"], labels={"a": "b"}
    )
    assert table_options_from_spec(spec) == BigQueryTableOptions(
        ColumnTimePartitioning("ts", "MONTH"), ("id",), {"a": "b"}
    )
    ranged = SpecTableOptions(partition_by="id", partition_range=(0, 100, 10))
    assert table_options_from_spec(ranged).partitioning == IntegerRangePartitioning("id", 0, 100, 10)
    hourly = SpecTableOptions(ingestion_time_partitioning=True, partition_granularity="HOUR")
    assert table_options_from_spec(hourly).partitioning == IngestionTimePartitioning("HOUR")


def test_clustering_is_limited_to_four_columns() -> None:
    with pytest.raises(ValueError, match="at most 4"):
        BigQueryTableOptions(clustering=("a", "b", "c", "d", "e"))


# --- CDC ----------------------------------------------------------------------------------------

DOCS = table_schema(
    "docs", [col("id", "int64"), col("title", "text"), col("body", "text"), col("n", "int32")]
)
CDC_VIEW = "id, title, body, n, _nilus_lsn, _nilus_op, _nilus_deleted"


def doc(
    id_: int, lsn: int, op: str = "I", unchanged: list[str] | None = None, **values: Any
) -> dict[str, Any]:
    return {"id": id_, LSN_COLUMN: lsn, OP_COLUMN: op, UNCHANGED_COLUMN: unchanged, **values}


def apply(sink: BigQuerySink, changes: ChangeSet, lsn: int | None = None, **kw: Any) -> None:
    checkpoint = Checkpoint("acme/docs_cdc", str(lsn)) if lsn is not None else None
    sink.apply_changes(target(sink, "docs"), DOCS, changes, checkpoint, **kw)


def cdc_rows(sink: BigQuerySink) -> list[tuple[Any, ...]]:
    return [tuple(r.values()) for r in read_rows(sink, "docs", CDC_VIEW)]


def check_cdc_scenario(sink: BigQuerySink) -> None:
    inserts = change_set(
        DOCS,
        [
            doc(1, 10, title="t1", body="b1", n=1),
            doc(2, 11, title="t2", body="b2", n=2),
            doc(3, 12, title="t3"),
        ],
    )
    apply(sink, inserts, 12)
    update_and_delete = change_set(
        DOCS,
        [doc(1, 20, "U", ["body"], title="T1", body=None, n=10)],  # body TOASTed, unchanged
        [{"id": 2, LSN_COLUMN: 21}],
    )
    apply(sink, update_and_delete, 21)
    apply(sink, update_and_delete, 21)  # replay after a crash before the checkpoint
    assert cdc_rows(sink) == [(1, "T1", "b1", 10, 20, "U", False), (3, "t3", None, None, 12, "I", False)]
    assert sink.read_checkpoint("acme/docs_cdc") == "21"


def test_cdc_insert_update_delete_unchanged_toast_and_replay(bigquery_sink: BigQuerySink) -> None:
    check_cdc_scenario(bigquery_sink)


def test_cdc_ignores_changes_older_than_the_row(bigquery_sink: BigQuerySink) -> None:
    apply(bigquery_sink, change_set(DOCS, [doc(1, 50, title="new")]))
    apply(bigquery_sink, change_set(DOCS, [doc(1, 40, "U", title="old")], [{"id": 1, LSN_COLUMN: 45}]))
    assert cdc_rows(bigquery_sink) == [(1, "new", None, None, 50, "I", False)]


def test_cdc_soft_delete_keeps_a_tombstone_and_reinsert_revives(bigquery_sink: BigQuerySink) -> None:
    apply(bigquery_sink, change_set(DOCS, [doc(1, 10, title="a"), doc(2, 11, title="b")]), soft_delete=True)
    apply(bigquery_sink, change_set(DOCS, deletes=[{"id": 1, LSN_COLUMN: 20}]), soft_delete=True)
    assert cdc_rows(bigquery_sink) == [
        (1, "a", None, None, 20, "D", True),
        (2, "b", None, None, 11, "I", False),
    ]
    apply(bigquery_sink, change_set(DOCS, [doc(1, 30, title="again")]), soft_delete=True)
    assert cdc_rows(bigquery_sink)[0] == (1, "again", None, None, 30, "I", False)


@pytest.mark.parametrize("soft_delete", [False, True])
def test_cdc_truncate_then_changes_is_replay_safe(bigquery_sink: BigQuerySink, soft_delete: bool) -> None:
    apply(
        bigquery_sink,
        change_set(DOCS, [doc(1, 10, title="a"), doc(2, 11, title="b")]),
        soft_delete=soft_delete,
    )
    after_truncate = change_set(DOCS, [doc(3, 30, title="c")], truncate=True)
    apply(bigquery_sink, after_truncate, 30, soft_delete=soft_delete)
    apply(bigquery_sink, after_truncate, 30, soft_delete=soft_delete)  # replay
    live = [r for r in cdc_rows(bigquery_sink) if not r[-1]]
    assert live == [(3, "c", None, None, 30, "I", False)]
    assert len(cdc_rows(bigquery_sink)) == (3 if soft_delete else 1)
    apply(bigquery_sink, change_set(DOCS, truncate=True), soft_delete=soft_delete)  # truncate alone
    assert [r for r in cdc_rows(bigquery_sink) if not r[-1]] == []


def test_cdc_wide_table_merge(bigquery_sink: BigQuerySink) -> None:
    width = 300
    wide = table_schema(
        "docs", [col("id", "int64"), *(col(f"column_number_{i:04d}", "text") for i in range(width))]
    )
    values = {f"column_number_{i:04d}": f"v{i}" for i in range(width)}
    sql = cdc_merge_sql("`p.d.t`", "`p.d.s`", wide, soft_delete=False)
    assert len(sql) < 200 * width  # compact: well under BigQuery's 1 MB query text limit at 1,000 columns
    sink_target = target(bigquery_sink, "docs")
    bigquery_sink.apply_changes(sink_target, wide, change_set(wide, [doc(1, 1, **values)]), None)
    unchanged = [f"column_number_{i:04d}" for i in range(0, width, 2)]
    update = {name: ("new" if name not in unchanged else None) for name in values}
    bigquery_sink.apply_changes(
        sink_target, wide, change_set(wide, [doc(1, 2, "U", unchanged, **update)]), None
    )
    row = read_rows(bigquery_sink, "docs")[0]
    assert all(row[name] == (values[name] if name in unchanged else "new") for name in values)


def test_cdc_without_primary_key_is_refused(bigquery_sink: BigQuerySink) -> None:
    keyless = table_schema("docs", list(DOCS.columns), key=())
    with pytest.raises(SinkError, match="no primary key"):
        bigquery_sink.apply_changes(target(bigquery_sink, "docs"), keyless, change_set(DOCS), None)


@pytest.mark.parametrize("soft_delete", [False, True])
def test_cdc_key_change_carries_unchanged_toast_and_replays(bigquery_sink: BigQuerySink, soft_delete: bool) -> None:
    check_key_change_carries_toast(bigquery_sink, soft_delete)


def check_key_change_carries_toast(bigquery_sink: BigQuerySink, soft_delete: bool) -> None:
    apply(
        bigquery_sink,
        change_set(DOCS, [doc(1, 10, title="t1", body="long body", n=1), doc(2, 11, title="t2", body="b2", n=2)]),
        soft_delete=soft_delete,
    )
    moved = change_set(
        DOCS,
        [doc(100, 20, "U", ["body"], title="T100", body=None, n=5), doc(2, 21, "U", ["body"], title="T2", n=3)],
        [{"id": 1, LSN_COLUMN: 20}],
        moved=[{"id": 100, old_key_column("id"): 1, UNCHANGED_COLUMN: ["body"]}],
    )
    apply(bigquery_sink, moved, 21, soft_delete=soft_delete)
    first = cdc_rows(bigquery_sink)
    apply(bigquery_sink, moved, 21, soft_delete=soft_delete)  # replay: the old row is gone (or a tombstone)
    assert cdc_rows(bigquery_sink) == first
    live = [row[:4] for row in first if not row[-1]]
    assert live == [(2, "T2", "b2", 3), (100, "T100", "long body", 5)]
    assert [row[0] for row in first if row[-1]] == ([1] if soft_delete else [])


def test_cdc_key_change_without_the_old_row_is_refused(bigquery_sink: BigQuerySink) -> None:
    apply(bigquery_sink, change_set(DOCS, [doc(2, 11, title="t2", body="b2")]))
    orphan = change_set(
        DOCS,
        [doc(100, 20, "U", ["body"], title="T100"), doc(3, 20, title="t3")],
        moved=[{"id": 100, old_key_column("id"): 1, UNCHANGED_COLUMN: ["body"]}],
    )
    with pytest.raises(SinkError, match="no row at the old key"):
        apply(bigquery_sink, orphan, 20)
    assert cdc_rows(bigquery_sink) == [(2, "t2", "b2", None, 11, "I", False)]  # nothing applied


# --- real BigQuery (opt-in) ---------------------------------------------------------------------


@pytest.fixture
def live_sink() -> Iterator[BigQuerySink]:
    project = os.environ.get("NILUS_BIGQUERY_PROJECT")
    if not project:
        pytest.skip("set NILUS_BIGQUERY_PROJECT (and credentials) to run against real BigQuery")
    key_env = "GOOGLE_APPLICATION_CREDENTIALS" if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") else None
    dataset = f"nilus_live_{uuid.uuid4().hex[:10]}"
    location = os.environ.get("NILUS_BIGQUERY_LOCATION", "US")
    sink = BigQuerySink(project, dataset=dataset, location=location, credentials_env=key_env)
    try:
        yield sink
    finally:
        sink.client.delete_dataset(f"{project}.{dataset}", delete_contents=True, not_found_ok=True)
        sink.close()


def empty(sink: BigQuerySink, *tables: str) -> None:
    for name in tables:
        sink.client.query(f"DELETE FROM `{sink.project}.{sink.dataset}.{name}` WHERE TRUE").result()


@pytest.mark.bigquery_live
def test_live_round_trip_and_cdc(live_sink: BigQuerySink) -> None:
    """Everything the emulator shows, on real BigQuery, plus what it cannot: NUMERIC precision kept
    and widened in place, BIGNUMERIC beyond 38 digits."""
    check_all_types_round_trip(live_sink)
    check_append_replay_adds_nothing(live_sink)
    empty(live_sink, "items", CHECKPOINT_TABLE)
    check_append_from_a_stale_mark_is_refused(live_sink)
    check_cdc_scenario(live_sink)
    empty(live_sink, "docs")
    check_key_change_carries_toast(live_sink, soft_delete=False)
    wide = table_schema(
        "wide",
        [col("id", "int64"), col("amount", "decimal", precision=50, scale=12), col("money", "decimal", precision=12, scale=2)],
    )
    value = Decimal("12345678901234567890123456789012345678.123456789012")  # 50 digits: BIGNUMERIC(50, 12)
    rows = [{"id": 1, "amount": value, "money": Decimal("9999999999.99")}]
    live_sink.write(target(live_sink, "wide"), wide, [batch(wide, rows)], WriteStrategy.APPEND)
    assert read_rows(live_sink, "wide") == rows
    live_sink.widen_columns(target(live_sink, "wide"), [col("money", "decimal", precision=20, scale=2)])
    fields = {f.name: (f.field_type, f.precision, f.scale) for f in live_sink.client.get_table(
        f"{live_sink.project}.{live_sink.dataset}.wide").schema}
    assert fields["amount"] == ("BIGNUMERIC", 50, 12) and fields["money"] == ("NUMERIC", 20, 2)
    widened = table_schema("wide", [*wide.columns[:2], col("money", "decimal", precision=20, scale=2)])
    bigger = {"id": 2, "amount": None, "money": Decimal("123456789012345678.99")}
    live_sink.write(target(live_sink, "wide"), widened, [batch(widened, [bigger])], WriteStrategy.APPEND)
    assert read_rows(live_sink, "wide") == [*rows, bigger]


def test_widening_within_one_bigquery_type_leaves_the_table_alone(bigquery_sink: BigQuerySink) -> None:
    """int16 → int32 is INT64 either way: no DDL. (NUMERIC precision changes need real BigQuery:
    the emulator keeps every NUMERIC as DECIMAL(38,9) and refuses the ALTER.)"""
    narrow = table_schema("widen", [col("id", "int64"), col("small", "int16")])
    bigquery_sink.prepare_table(target(bigquery_sink, "widen"), narrow)
    bigquery_sink.write(target(bigquery_sink, "widen"), narrow, [batch(narrow, [{"id": 1, "small": 7}])], WriteStrategy.APPEND)
    bigquery_sink.widen_columns(target(bigquery_sink, "widen"), [col("small", "int32")])
    wide = table_schema("widen", [col("id", "int64"), col("small", "int32")])
    bigquery_sink.write(target(bigquery_sink, "widen"), wide, [batch(wide, [{"id": 2, "small": 100000}])], WriteStrategy.APPEND)
    assert sorted((r["id"], r["small"]) for r in read_rows(bigquery_sink, "widen")) == [(1, 7), (2, 100000)]
