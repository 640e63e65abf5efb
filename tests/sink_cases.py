"""The behaviour every SQL sink must show, written once and run against each sink.

A sink's test module subclasses `SinkContract` and provides the `harness` fixture: how to build the
sink and how to read its table back as canonical Python values.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from nilus_dagster.schema import Column, ColumnType, TableName, TableSchema, arrow_schema
from nilus_dagster.sinks import (
    ChangeSet,
    Checkpoint,
    Sink,
    SinkError,
    SinkTable,
    UnsupportedColumnType,
    WriteStrategy,
)
from nilus_dagster.sinks.base import (
    COUNT_COLUMN,
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    old_key_column,
)

T = ColumnType
TARGET = SinkTable("analytics", "orders")
UTC = dt.UTC


@dataclass
class SinkHarness:
    """How a test module drives one sink."""

    make: Callable[[], Sink]
    # Rows of `target` ordered by `order_by`: {column: value} with the driver's Python values.
    fetch: Callable[[SinkTable, str], list[dict[str, Any]]]
    unsupported: Column  # a column this sink cannot hold
    unreachable: Callable[[], Sink]  # a sink whose connection cannot work; its DSN has password "s3cret"


def table_schema(*columns: Column, key: tuple[str, ...] = ("id",)) -> TableSchema:
    return TableSchema(TableName("public", "orders"), columns, key)


def col(name: str, kind: str, **kw: Any) -> Column:
    return Column(name, T(kind, **kw))  # type: ignore[arg-type]


ALL_TYPES = table_schema(
    Column("id", T("int64"), nullable=False),
    col("flag", "bool"),
    col("small", "int16"),
    col("medium", "int32"),
    col("f32", "float32"),
    col("f64", "float64"),
    col("amount", "decimal", precision=38, scale=9),
    col("price", "decimal", precision=10, scale=2),
    col("note", "text"),
    col("doc", "json"),
    col("ref", "uuid"),
    col("blob", "bytes"),
    col("day", "date"),
    col("at_time", "time"),
    col("local_ts", "timestamp"),
    col("utc_ts", "timestamptz"),
    col("span", "interval"),
    Column("ints", T("list", element=T("int32"))),
    Column("tags", T("list", element=T("text"))),
    Column("amounts", T("list", element=T("decimal", precision=12, scale=3))),
    Column("stamps", T("list", element=T("timestamptz"))),
    Column("blobs", T("list", element=T("bytes"))),
)

MAX_38_9 = Decimal("99999999999999999999999999999.999999999")
ALL_TYPES_ROWS: list[dict[str, Any]] = [
    {
        "id": 1,
        "flag": True,
        "small": 32767,
        "medium": 2147483647,
        "f32": 0.1,
        "f64": 1e300,
        "amount": MAX_38_9,
        "price": Decimal("12345678.90"),
        "note": 'quote " comma , newline\n\\.\nbackslash \\ tab\t ünïcode 🚀 NULL',
        "doc": '{"a": [1, null, "x\\"y"], "b": {"c": true}}',
        "ref": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "blob": b"\x00\x01\xff\x00",
        "day": dt.date(2024, 2, 29),
        "at_time": dt.time(23, 59, 59, 999999),
        "local_ts": dt.datetime(2024, 3, 31, 2, 30, 0, 123456),
        "utc_ts": dt.datetime(2024, 3, 31, 1, 30, 0, 654321, tzinfo=UTC),
        "span": pa.MonthDayNano([14, -3, 3_723_000_004_000]),
        "ints": [1, None, -2147483648],
        "tags": ["a", None, "", 'q"u,o{t}e\\', "NULL"],
        "amounts": [Decimal("123456789.123"), None],
        "stamps": [dt.datetime(2000, 1, 1, tzinfo=UTC), None],
        "blobs": [b"\x00", None, b""],
    },
    {
        "id": 2,
        "flag": False,
        "small": -32768,
        "medium": -2147483648,
        "f32": float("-inf"),
        "f64": float("nan"),
        "amount": Decimal("-99999999999999999999999999999.999999999"),
        "price": Decimal("-0.01"),
        "note": "",
        "doc": '"just a string"',
        "ref": "00000000-0000-0000-0000-000000000000",
        "blob": b"",
        "day": dt.date(1, 1, 1),
        "at_time": dt.time(0, 0),
        "local_ts": dt.datetime(9999, 12, 31, 23, 59, 59),
        "utc_ts": dt.datetime(1970, 1, 1, tzinfo=UTC),
        "span": pa.MonthDayNano([0, 0, 0]),
        "ints": [],
        "tags": [],
        "amounts": [],
        "stamps": [],
        "blobs": [],
    },
    {"id": 3, **{c: None for c in ALL_TYPES.column_names if c != "id"}},
    {
        "id": 4,
        "amount": Decimal("0.000000001"),
        "f64": -0.0,
        "doc": "null",
        "span": pa.MonthDayNano([-1, 0, -1000]),
    },
]


def batches_of(schema: TableSchema, rows: Sequence[dict[str, Any]], size: int = 2) -> list[pa.RecordBatch]:
    table = pa.Table.from_pylist(
        [{c: r.get(c) for c in schema.column_names} for r in rows], arrow_schema(schema)
    )
    return table.to_batches(max_chunksize=size)


def canonical(column_type: ColumnType, value: Any) -> Any:
    """One comparable spelling per logical type, whatever the driver returned."""
    if value is None:
        return None
    kind = column_type.kind
    if kind == "list":
        assert column_type.element is not None
        return [canonical(column_type.element, v) for v in value]
    if kind in ("float32", "float64"):
        number = struct.unpack("f", struct.pack("f", value))[0] if kind == "float32" else value
        return "nan" if math.isnan(number) else number
    if kind == "json":
        return json.loads(value) if isinstance(value, str) else value
    if kind == "uuid":
        return str(uuid.UUID(bytes=value) if isinstance(value, bytes) else uuid.UUID(str(value)))
    if kind == "interval" and isinstance(value, pa.MonthDayNano):
        return (value.months, value.days, value.nanoseconds // 1000)
    if kind == "decimal":
        return Decimal(value)
    if kind == "bytes":
        return bytes(value)
    return value


def canonical_rows(schema: TableSchema, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c.name: canonical(c.type, row.get(c.name)) for c in schema.columns} for row in rows]


def upserts_of(schema: TableSchema, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """ChangeSet upserts: rows with `_nilus_lsn`, `_nilus_op` and optional `_nilus_unchanged`."""
    fields = [
        *arrow_schema(schema),
        pa.field(LSN_COLUMN, pa.int64()),
        pa.field(OP_COLUMN, pa.string()),
        pa.field(UNCHANGED_COLUMN, pa.list_(pa.string())),
    ]
    names = [*schema.column_names, LSN_COLUMN, OP_COLUMN, UNCHANGED_COLUMN]
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], pa.schema(fields))


def deletes_of(schema: TableSchema, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Key columns and `_nilus_lsn`; a key-less table's deletes are whole rows with `_nilus_count`."""
    key = list(schema.primary_key) or schema.column_names
    fields = [*(arrow_schema(schema).field(k) for k in key), pa.field(LSN_COLUMN, pa.int64())]
    if not schema.primary_key:
        fields.append(pa.field(COUNT_COLUMN, pa.int64()))
        rows = [{COUNT_COLUMN: 1, **r} for r in rows]
    names = [f.name for f in fields]
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], pa.schema(fields))


def moved_of(schema: TableSchema, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """ChangeSet.moved: new key, old key (`_nilus_old_<k>`), `_nilus_lsn`, `_nilus_unchanged`."""
    key_fields = [arrow_schema(schema).field(k) for k in schema.primary_key]
    fields = [
        *key_fields,
        *(pa.field(old_key_column(f.name), f.type) for f in key_fields),
        pa.field(LSN_COLUMN, pa.int64()),
        pa.field(UNCHANGED_COLUMN, pa.list_(pa.string())),
    ]
    names = [f.name for f in fields]
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], pa.schema(fields))


def change_set(schema: TableSchema, upserts=(), deletes=(), truncate: bool = False, moved=()) -> ChangeSet:
    return ChangeSet(
        upserts_of(schema, upserts), deletes_of(schema, deletes), truncate, moved_of(schema, moved) if moved else None
    )


SIMPLE = table_schema(Column("id", T("int64"), nullable=False), col("name", "text"), col("qty", "int32"))
KEYLESS = table_schema(col("name", "text"), col("qty", "int32"), key=())
WIDE = table_schema(Column("id", T("int64"), nullable=False), col("big", "text"), col("small", "int32"))


class SinkContract:
    """Tests shared by every SQL sink; subclasses provide the `harness` fixture."""

    @pytest.fixture
    def sink(self, harness: SinkHarness) -> Iterator[Sink]:
        sink = harness.make()
        yield sink
        sink.close()

    def rows(self, harness: SinkHarness, schema: TableSchema, order_by: str = "id") -> list[dict[str, Any]]:
        return canonical_rows(schema, harness.fetch(TARGET, order_by))

    def load(self, sink: Sink, schema: TableSchema, rows, strategy=WriteStrategy.APPEND, checkpoint=None):
        sink.prepare_table(TARGET, schema)
        return sink.write(TARGET, schema, batches_of(schema, rows), strategy, checkpoint)

    # -- batch writes ---------------------------------------------------------------------------

    def test_every_type_round_trips(self, sink: Sink, harness: SinkHarness) -> None:
        result = self.load(sink, ALL_TYPES, ALL_TYPES_ROWS)
        assert result.rows == len(ALL_TYPES_ROWS)
        assert result.bytes > 0
        assert self.rows(harness, ALL_TYPES) == canonical_rows(ALL_TYPES, ALL_TYPES_ROWS)

    def test_append_replace_merge(self, sink: Sink, harness: SinkHarness) -> None:
        self.load(sink, SIMPLE, [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}])
        self.load(sink, SIMPLE, [{"id": 3, "name": "c", "qty": 3}])
        assert [r["id"] for r in self.rows(harness, SIMPLE)] == [1, 2, 3]

        self.load(
            sink,
            SIMPLE,
            [{"id": 2, "name": "B", "qty": None}, {"id": 4, "name": "d", "qty": 4}],
            WriteStrategy.MERGE,
        )
        assert self.rows(harness, SIMPLE) == [
            {"id": 1, "name": "a", "qty": 1},
            {"id": 2, "name": "B", "qty": None},
            {"id": 3, "name": "c", "qty": 3},
            {"id": 4, "name": "d", "qty": 4},
        ]
        result = self.load(sink, SIMPLE, [{"id": 9, "name": "z", "qty": 9}], WriteStrategy.REPLACE)
        assert result.rows == 1
        assert self.rows(harness, SIMPLE) == [{"id": 9, "name": "z", "qty": 9}]
        self.load(sink, SIMPLE, [], WriteStrategy.REPLACE)
        assert self.rows(harness, SIMPLE) == []

    def test_merge_needs_a_primary_key(self, sink: Sink) -> None:
        with pytest.raises(SinkError, match="primary key"):
            self.load(sink, KEYLESS, [{"name": "a", "qty": 1}], WriteStrategy.MERGE)

    def test_big_write_in_many_batches(self, sink: Sink, harness: SinkHarness) -> None:
        rows = [{"id": i, "name": f"n{i}", "qty": i % 7} for i in range(250_000)]
        sink.prepare_table(TARGET, SIMPLE)
        result = sink.write(TARGET, SIMPLE, batches_of(SIMPLE, rows, size=60_000), WriteStrategy.APPEND)
        assert result.rows == 250_000
        fetched = harness.fetch(TARGET, "id")
        assert len(fetched) == 250_000
        assert fetched[-1] == {"id": 249_999, "name": "n249999", "qty": 249_999 % 7}

    @pytest.mark.parametrize("strategy", list(WriteStrategy))
    def test_failing_iterator_changes_nothing(self, sink: Sink, harness: SinkHarness, strategy) -> None:
        before = [{"id": 1, "name": "a", "qty": 1}]
        self.load(sink, SIMPLE, before, checkpoint=Checkpoint("k", "v1"))

        def broken() -> Iterator[pa.RecordBatch]:
            yield from batches_of(
                SIMPLE, [{"id": 10, "name": "x", "qty": 0}, {"id": 11, "name": "y", "qty": 0}], 1
            )
            raise RuntimeError("source went away")

        with pytest.raises(RuntimeError, match="source went away"):
            sink.write(TARGET, SIMPLE, broken(), strategy, Checkpoint("k", "v2"))
        assert self.rows(harness, SIMPLE) == before
        assert sink.read_checkpoint("k") == "v1"
        # The sink stays usable after the failure.
        self.load(sink, SIMPLE, [{"id": 5, "name": "e", "qty": 5}], checkpoint=Checkpoint("k", "v3"))
        assert sink.read_checkpoint("k") == "v3"

    def test_readers_see_old_rows_during_replace(self, sink: Sink, harness: SinkHarness) -> None:
        self.load(sink, SIMPLE, [{"id": 1, "name": "a", "qty": 1}, {"id": 2, "name": "b", "qty": 2}])
        seen_mid_write: list[list[dict[str, Any]]] = []

        def slow() -> Iterator[pa.RecordBatch]:
            for i, batch in enumerate(
                batches_of(SIMPLE, [{"id": n, "name": "new", "qty": n} for n in range(5)], 1)
            ):
                if i == 3:
                    seen_mid_write.append(self.rows(harness, SIMPLE))
                yield batch

        sink.write(TARGET, SIMPLE, slow(), WriteStrategy.REPLACE)
        assert [r["id"] for r in seen_mid_write[0]] == [1, 2]
        assert [r["id"] for r in self.rows(harness, SIMPLE)] == [0, 1, 2, 3, 4]

    def test_checkpoint_round_trip(self, sink: Sink) -> None:
        assert sink.read_checkpoint("acme/p/public.orders") is None
        self.load(sink, SIMPLE, [{"id": 1}], checkpoint=Checkpoint("acme/p/public.orders", "2024-01-01"))
        assert sink.read_checkpoint("acme/p/public.orders") == "2024-01-01"
        self.load(sink, SIMPLE, [{"id": 2}], checkpoint=Checkpoint("acme/p/public.orders", "2024-01-02"))
        assert sink.read_checkpoint("acme/p/public.orders") == "2024-01-02"
        assert sink.read_checkpoint("other") is None

    def test_schema_evolution_adds_columns(self, sink: Sink, harness: SinkHarness) -> None:
        self.load(sink, SIMPLE, [{"id": 1, "name": "a", "qty": 1}])
        evolved = table_schema(*SIMPLE.columns, col("color", "text"), col("tags", "list", element=T("text")))
        assert sink.prepare_table(TARGET, evolved) == ["color", "tags"]
        assert sink.prepare_table(TARGET, evolved) == []
        sink.write(
            TARGET,
            evolved,
            batches_of(evolved, [{"id": 2, "color": "red", "tags": ["x"]}]),
            WriteStrategy.APPEND,
        )
        assert self.rows(harness, evolved) == [
            {"id": 1, "name": "a", "qty": 1, "color": None, "tags": None},
            {"id": 2, "name": None, "qty": None, "color": "red", "tags": ["x"]},
        ]
        # A column the source dropped stays in the sink; new rows get NULL there.
        sink.write(TARGET, SIMPLE, batches_of(SIMPLE, [{"id": 3, "name": "c"}]), WriteStrategy.APPEND)
        assert self.rows(harness, evolved)[-1] == {
            "id": 3,
            "name": "c",
            "qty": None,
            "color": None,
            "tags": None,
        }

    def test_unsupported_column_is_named_before_data_moves(self, sink: Sink, harness: SinkHarness) -> None:
        schema = table_schema(Column("id", T("int64")), harness.unsupported)
        with pytest.raises(UnsupportedColumnType, match=f"'{harness.unsupported.name}'"):
            sink.prepare_table(TARGET, schema)
        with pytest.raises(UnsupportedColumnType, match=f"'{harness.unsupported.name}'"):
            sink.write(TARGET, schema, iter(()), WriteStrategy.APPEND)
        with pytest.raises(Exception):  # noqa: B017 - the table must not exist
            harness.fetch(TARGET, "id")

    def test_unreachable_sink_names_it_without_password(self, harness: SinkHarness) -> None:
        sink = harness.unreachable()
        with pytest.raises(SinkError) as error:
            sink.prepare_table(TARGET, SIMPLE)
        assert sink.name in str(error.value)
        assert "s3cret" not in str(error.value)

    # -- CDC ------------------------------------------------------------------------------------

    def cdc_rows(
        self, harness: SinkHarness, schema: TableSchema, order_by: str = "id"
    ) -> list[dict[str, Any]]:
        """Rows with the metadata columns, minus `_nilus_synced_at` (checked separately)."""
        out = []
        for raw in harness.fetch(TARGET, order_by):
            row = {c.name: canonical(c.type, raw[c.name]) for c in schema.columns}
            row.update({k: raw[k] for k in (LSN_COLUMN, OP_COLUMN, DELETED_COLUMN)})
            assert raw[SYNCED_AT_COLUMN] is not None
            out.append(row)
        return out

    def test_apply_inserts_updates_deletes(self, sink: Sink, harness: SinkHarness) -> None:
        sink.prepare_table(TARGET, SIMPLE, cdc=True)
        first = change_set(
            SIMPLE,
            upserts=[
                {"id": 1, "name": "a", "qty": 1, LSN_COLUMN: 10, OP_COLUMN: "I"},
                {"id": 2, "name": "b", "qty": 2, LSN_COLUMN: 11, OP_COLUMN: "I"},
                {"id": 3, "name": "c", "qty": 3, LSN_COLUMN: 12, OP_COLUMN: "I"},
            ],
        )
        result = sink.apply_changes(TARGET, SIMPLE, first, Checkpoint("slot", "12"))
        assert result.rows == 3
        second = change_set(
            SIMPLE,
            upserts=[
                {"id": 2, "name": "B", "qty": None, LSN_COLUMN: 20, OP_COLUMN: "U"},
                {"id": 4, "name": "d", "qty": 4, LSN_COLUMN: 21, OP_COLUMN: "I"},
            ],
            deletes=[{"id": 1, LSN_COLUMN: 22}, {"id": 99, LSN_COLUMN: 22}],
        )
        sink.apply_changes(TARGET, SIMPLE, second, Checkpoint("slot", "22"))
        assert self.cdc_rows(harness, SIMPLE) == [
            {"id": 2, "name": "B", "qty": None, LSN_COLUMN: 20, OP_COLUMN: "U", DELETED_COLUMN: False},
            {"id": 3, "name": "c", "qty": 3, LSN_COLUMN: 12, OP_COLUMN: "I", DELETED_COLUMN: False},
            {"id": 4, "name": "d", "qty": 4, LSN_COLUMN: 21, OP_COLUMN: "I", DELETED_COLUMN: False},
        ]
        assert sink.read_checkpoint("slot") == "22"

        # Re-applying the same ChangeSet (a crash before the offset was acked) changes nothing.
        before = self.cdc_rows(harness, SIMPLE)
        sink.apply_changes(TARGET, SIMPLE, second, Checkpoint("slot", "22"))
        assert self.cdc_rows(harness, SIMPLE) == before

    def test_apply_creates_the_cdc_table(self, sink: Sink, harness: SinkHarness) -> None:
        changes = change_set(
            ALL_TYPES, upserts=[{**r, LSN_COLUMN: 5, OP_COLUMN: "I"} for r in ALL_TYPES_ROWS]
        )
        sink.apply_changes(TARGET, ALL_TYPES, changes, None)
        rows = self.cdc_rows(harness, ALL_TYPES)
        assert [{c: r[c] for c in ALL_TYPES.column_names} for r in rows] == canonical_rows(
            ALL_TYPES, ALL_TYPES_ROWS
        )
        deletes = change_set(ALL_TYPES, deletes=[{"id": 1, LSN_COLUMN: 6}])
        sink.apply_changes(TARGET, ALL_TYPES, deletes, None)
        assert [r["id"] for r in self.cdc_rows(harness, ALL_TYPES)] == [2, 3, 4]

    def test_apply_keeps_unchanged_toasted_values(self, sink: Sink, harness: SinkHarness) -> None:
        big = "x" * 10_000
        sink.apply_changes(
            TARGET,
            WIDE,
            change_set(
                WIDE,
                upserts=[
                    {"id": 1, "big": big, "small": 1, LSN_COLUMN: 1, OP_COLUMN: "I"},
                    {"id": 2, "big": big + "2", "small": 2, LSN_COLUMN: 1, OP_COLUMN: "I"},
                ],
            ),
            None,
        )
        update = change_set(
            WIDE,
            upserts=[
                {"id": 1, "big": None, "small": 10, LSN_COLUMN: 2, OP_COLUMN: "U", UNCHANGED_COLUMN: ["big"]},
                {"id": 2, "big": "new", "small": 20, LSN_COLUMN: 2, OP_COLUMN: "U", UNCHANGED_COLUMN: None},
            ],
        )
        sink.apply_changes(TARGET, WIDE, update, None)
        sink.apply_changes(TARGET, WIDE, update, None)
        assert [(r["id"], r["big"], r["small"], r[LSN_COLUMN]) for r in self.cdc_rows(harness, WIDE)] == [
            (1, big, 10, 2),
            (2, "new", 20, 2),
        ]

    def test_apply_soft_delete(self, sink: Sink, harness: SinkHarness) -> None:
        insert = change_set(
            SIMPLE,
            upserts=[{"id": i, "name": str(i), "qty": i, LSN_COLUMN: 1, OP_COLUMN: "I"} for i in (1, 2)],
        )
        sink.apply_changes(TARGET, SIMPLE, insert, None, soft_delete=True)
        delete = change_set(SIMPLE, deletes=[{"id": 1, LSN_COLUMN: 5}])
        for _ in range(2):
            sink.apply_changes(TARGET, SIMPLE, delete, Checkpoint("slot", "5"), soft_delete=True)
        assert self.cdc_rows(harness, SIMPLE) == [
            {"id": 1, "name": "1", "qty": 1, LSN_COLUMN: 5, OP_COLUMN: "D", DELETED_COLUMN: True},
            {"id": 2, "name": "2", "qty": 2, LSN_COLUMN: 1, OP_COLUMN: "I", DELETED_COLUMN: False},
        ]
        revive = change_set(
            SIMPLE, upserts=[{"id": 1, "name": "back", "qty": 1, LSN_COLUMN: 6, OP_COLUMN: "I"}]
        )
        sink.apply_changes(TARGET, SIMPLE, revive, None, soft_delete=True)
        assert self.cdc_rows(harness, SIMPLE)[0][DELETED_COLUMN] is False

    def test_apply_truncate_then_changes(self, sink: Sink, harness: SinkHarness) -> None:
        sink.apply_changes(
            TARGET,
            SIMPLE,
            change_set(
                SIMPLE,
                upserts=[{"id": i, "name": "old", "qty": i, LSN_COLUMN: 1, OP_COLUMN: "I"} for i in range(3)],
            ),
            None,
        )
        after = change_set(
            SIMPLE, truncate=True, upserts=[{"id": 7, "name": "new", "qty": 7, LSN_COLUMN: 9, OP_COLUMN: "I"}]
        )
        for _ in range(2):
            sink.apply_changes(TARGET, SIMPLE, after, Checkpoint("slot", "9"))
        assert [(r["id"], r["name"]) for r in self.cdc_rows(harness, SIMPLE)] == [(7, "new")]

    def test_apply_keyless_table_is_a_multiset(self, sink: Sink, harness: SinkHarness) -> None:
        # Three identical inserts are three rows; NULLs match NULLs.
        rows = [{"name": "a", "qty": 1}] * 3 + [{"name": "a", "qty": None}] * 2 + [{"name": "b", "qty": 2}]
        insert = change_set(KEYLESS, upserts=[{**r, LSN_COLUMN: 1, OP_COLUMN: "I"} for r in rows])
        sink.apply_changes(TARGET, KEYLESS, insert, Checkpoint("slot", "1"))

        def live() -> list[tuple[str, int | None]]:
            out = [(r["name"], r["qty"]) for r in self.cdc_rows(harness, KEYLESS, "name") if not r[DELETED_COLUMN]]
            return sorted(out, key=lambda r: (r[0], r[1] if r[1] is not None else -1))

        assert live() == [("a", None), ("a", None), ("a", 1), ("a", 1), ("a", 1), ("b", 2)]
        # Deleting one of identical rows removes exactly one; an update is delete(old) + insert(new).
        change = change_set(
            KEYLESS,
            deletes=[{"name": "a", "qty": 1, LSN_COLUMN: 2, COUNT_COLUMN: 2}, {"name": "a", "qty": None, LSN_COLUMN: 2}],
            upserts=[{"name": "a", "qty": 5, LSN_COLUMN: 2, OP_COLUMN: "U"}] * 2,
        )
        sink.apply_changes(TARGET, KEYLESS, change, Checkpoint("slot", "2"))
        assert live() == [("a", None), ("a", 1), ("a", 5), ("a", 5), ("b", 2)]
        # Asking for more copies than the sink holds removes only those it holds.
        sink.apply_changes(
            TARGET, KEYLESS, change_set(KEYLESS, deletes=[{"name": "a", "qty": 5, LSN_COLUMN: 3, COUNT_COLUMN: 9}]), None
        )
        assert live() == [("a", None), ("a", 1), ("b", 2)]

    def test_apply_keyless_soft_delete_marks_exactly_n(self, sink: Sink, harness: SinkHarness) -> None:
        insert = change_set(KEYLESS, upserts=[{"name": "a", "qty": 1, LSN_COLUMN: 1, OP_COLUMN: "I"}] * 3)
        sink.apply_changes(TARGET, KEYLESS, insert, None, soft_delete=True)
        for lsn in (2, 3):
            delete = change_set(KEYLESS, deletes=[{"name": "a", "qty": 1, LSN_COLUMN: lsn}])
            sink.apply_changes(TARGET, KEYLESS, delete, None, soft_delete=True)
        rows = self.cdc_rows(harness, KEYLESS, "name")
        assert sorted((r[DELETED_COLUMN], r[LSN_COLUMN], r[OP_COLUMN]) for r in rows) == [
            (False, 1, "I"),
            (True, 2, "D"),
            (True, 3, "D"),
        ]

    def test_apply_key_change_carries_unchanged_toasted_value(self, sink: Sink, harness: SinkHarness) -> None:
        big = "y" * 10_000
        rows = [{"id": i, "big": f"{big}{i}", "small": i, LSN_COLUMN: 1, OP_COLUMN: "I"} for i in (1, 2)]
        sink.apply_changes(TARGET, WIDE, change_set(WIDE, upserts=rows), None)
        # id 1 → 10 (big unchanged), id 2 → 20 (big unchanged): the old rows are not in this batch.
        moved = change_set(
            WIDE,
            deletes=[{"id": 1, LSN_COLUMN: 5}, {"id": 2, LSN_COLUMN: 5}],
            upserts=[
                {"id": 10, "big": None, "small": 11, LSN_COLUMN: 5, OP_COLUMN: "U", UNCHANGED_COLUMN: ["big"]},
                {"id": 20, "big": None, "small": 21, LSN_COLUMN: 5, OP_COLUMN: "U", UNCHANGED_COLUMN: ["big"]},
            ],
            moved=[
                {"id": 10, old_key_column("id"): 1, LSN_COLUMN: 5, UNCHANGED_COLUMN: ["big"]},
                {"id": 20, old_key_column("id"): 2, LSN_COLUMN: 5, UNCHANGED_COLUMN: ["big"]},
            ],
        )
        sink.apply_changes(TARGET, WIDE, moved, Checkpoint("slot", "5"))
        assert [(r["id"], r["big"], r["small"]) for r in self.cdc_rows(harness, WIDE)] == [
            (10, f"{big}1", 11),
            (20, f"{big}2", 21),
        ]

    def test_apply_failure_changes_nothing(self, sink: Sink, harness: SinkHarness) -> None:
        docs = table_schema(Column("id", T("int64"), nullable=False), col("doc", "json"))
        sink.apply_changes(
            TARGET,
            docs,
            change_set(docs, upserts=[{"id": 1, "doc": "{}", LSN_COLUMN: 1, OP_COLUMN: "I"}]),
            Checkpoint("slot", "1"),
        )
        bad = change_set(
            docs,
            truncate=True,
            deletes=[{"id": 1, LSN_COLUMN: 2}],
            upserts=[
                {"id": 2, "doc": "[1]", LSN_COLUMN: 2, OP_COLUMN: "I"},
                {"id": 3, "doc": "{not json", LSN_COLUMN: 2, OP_COLUMN: "I"},
            ],
        )
        with pytest.raises(SinkError, match=sink.name):
            sink.apply_changes(TARGET, docs, bad, Checkpoint("slot", "2"))
        assert [(r["id"], r["doc"]) for r in self.cdc_rows(harness, docs)] == [(1, {})]
        assert sink.read_checkpoint("slot") == "1"
