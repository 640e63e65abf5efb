"""The pgoutput decoder against payloads captured from PostgreSQL 16 (tests/data/pgoutput/record.py).

Exact values (LSNs, OIDs, xids, times) are those of the recording.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from nilus_dagster.cdc.lsn import format_lsn, parse_lsn
from nilus_dagster.cdc.pgoutput import (
    BUILTIN_TYPES,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    PgOutputError,
    PgTypeInfo,
    Relation,
    RelationColumn,
    ReplicaIdentity,
    Truncate,
    TypeMessage,
    Update,
    decode,
    decode_row_change,
    relation_schema,
)
from nilus_dagster.schema.table import ColumnType, TableName

DATA = Path(__file__).parent / "data" / "pgoutput"
_BLOB = (DATA / "messages.bin").read_bytes()
_INDEX: dict[str, list[int]] = json.loads((DATA / "index.json").read_text())

PLAIN, FULL_ROW, TOASTY, FEELINGS, MOOD = 16391, 16398, 16401, 16408, 16385
PLAIN_COLUMNS = (
    RelationColumn("id", 23, -1, True),
    RelationColumn("name", 25, -1, False),
    RelationColumn("amount", 1700, 655366, False),  # numeric(10,2)
    RelationColumn("born", 1082, -1, False),
)


def captured(name: str) -> bytes:
    offset, length, _ = _INDEX[name]
    return _BLOB[offset : offset + length]


def at(hour_minute_second_micro: tuple[int, int, int, int]) -> datetime:
    h, m, s, us = hour_minute_second_micro
    return datetime(2026, 11, 23, h, m, s, us, tzinfo=UTC)


def test_every_capture_decodes_to_the_message_type_in_its_name() -> None:
    kinds = {"B": Begin, "C": Commit, "O": Origin, "R": Relation, "Y": TypeMessage, "I": Insert,
             "U": Update, "D": Delete, "T": Truncate, "M": LogicalMessage}  # fmt: skip
    assert {name.rsplit(".", 1)[1] for name in _INDEX} == set(kinds)
    for name in _INDEX:
        assert isinstance(decode(captured(name)), kinds[name.rsplit(".", 1)[1]]), name


def test_begin_relation_insert_commit() -> None:
    assert decode(captured("insert.0.B")) == Begin(21571576, at((18, 19, 27, 760606)), 731)
    assert decode(captured("insert.1.R")) == Relation(
        PLAIN, "public", "plain", ReplicaIdentity.DEFAULT, PLAIN_COLUMNS
    )
    # Non-ASCII text is decoded once, as UTF-8; SQL NULL is None.
    assert decode(captured("insert.2.I")) == Insert(PLAIN, ("1", "Zoë", "12.50", None))
    assert decode(captured("insert.3.C")) == Commit(0, 21571576, 21571624, at((18, 19, 27, 760606)))


def test_update_without_key_change_has_no_old_tuple() -> None:
    assert decode(captured("update.1.U")) == Update(PLAIN, ("1", "Zoe", "12.50", None))


def test_update_changing_the_key_carries_the_old_key() -> None:
    update = decode(captured("update_key.1.U"))
    assert update == Update(PLAIN, ("2", "Zoe", "12.50", None), ("1", None, None, None), True)


def test_delete_with_default_identity_carries_the_key_only() -> None:
    assert decode(captured("delete.1.D")) == Delete(PLAIN, ("2", None, None, None), True)


def test_replica_identity_full_sends_whole_old_rows() -> None:
    relation = decode(captured("full_insert.1.R"))
    assert relation == Relation(
        FULL_ROW, "public", "full_row", ReplicaIdentity.FULL,
        (RelationColumn("id", 23, -1, True), RelationColumn("label", 1043, 24, True)),
    )  # fmt: skip
    assert decode(captured("full_update.1.U")) == Update(FULL_ROW, ("7", "after"), ("7", "before"), False)
    assert decode(captured("full_delete.1.D")) == Delete(FULL_ROW, ("7", "after"), False)


def test_unchanged_toast_value_is_marked_not_null() -> None:
    assert decode(captured("toast_insert.1.R")).columns[1] == RelationColumn("big", 25, -1, False)
    update = decode(captured("toast_update.1.U"))
    assert update == Update(TOASTY, ("1", UNCHANGED_TOAST, "1"))
    assert update.new[1] is UNCHANGED_TOAST and update.new[1] is not None


def test_truncate_of_two_tables_with_options() -> None:
    assert decode(captured("truncate.1.I")) == Insert(PLAIN, ("3", "x", "1.00", "2024-02-29"))
    truncate = decode(captured("truncate.4.T"))
    assert truncate == Truncate((PLAIN, FULL_ROW), cascade=True, restart_identity=True)
    assert decode(captured("truncate.5.C")) == Commit(0, 21583792, 21584216, at((18, 19, 27, 768751)))


def test_type_message_precedes_a_relation_using_an_enum() -> None:
    assert decode(captured("enum.1.Y")) == TypeMessage(MOOD, "public", "mood")
    relation = decode(captured("enum.2.R"))
    assert relation.columns == (
        RelationColumn("id", 20, -1, True),
        RelationColumn("feeling", MOOD, -1, False),
        RelationColumn("tags", 1009, -1, False),
    )
    assert decode(captured("enum.3.I")) == Insert(FEELINGS, ("1", "happy", '{a,"b c"}'))


def test_logical_messages_transactional_and_not() -> None:
    assert decode(captured("message.0.M")) == LogicalMessage(False, 21584656, "nilus.nt", b"\x00\xff")
    assert decode(captured("message.2.M")) == LogicalMessage(True, 21584592, "nilus", b"hello")


def test_origin_of_a_replayed_transaction() -> None:
    replayed_at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert decode(captured("origin.0.B")) == Begin(21584944, replayed_at, 743)
    assert decode(captured("origin.1.O")) == Origin(parse_lsn("0/ABCDEF"), "upstream")
    assert decode(captured("origin.4.C")) == Commit(0, 21584944, 21585016, replayed_at)


def test_binary_values_stay_bytes() -> None:
    insert = decode(captured("binary.2.I"))
    assert insert == Insert(
        PLAIN, (b"\x00\x00\x00\x04", b"bin", b"\x00\x02\x00\x00\x00\x00\x00\x02\x00\x03\t\xc4", b'\x00\x00"y')
    )


def test_decode_accepts_memoryview_and_offset() -> None:
    payload = captured("insert.2.I")
    framed = b"w" + bytes(24) + payload  # an XLogData header in front
    assert decode(memoryview(framed), 25) == decode(payload)


def test_messages_are_immutable() -> None:
    insert = decode(captured("insert.2.I"))
    with pytest.raises(AttributeError):
        insert.relation_id = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"", "empty"),
        (b"Z\x00", "unknown pgoutput message type 'Z'"),
        (b"I" + struct.pack(">I", 1) + b"X", "Insert: expected 'N'"),
        (b"I" + struct.pack(">IcH", 1, b"N", 1) + b"q", "unknown tuple value kind 'q'"),
        (b"I" + struct.pack(">IcHci", 1, b"N", 1, b"t", 10) + b"ab", "runs past the end"),
        (b"I" + struct.pack(">IcHci", 1, b"N", 1, b"t", -2) + b"ab", "negative value length -2"),
        (b"I" + struct.pack(">IcHci", 1, b"N", 1, b"t", 2) + b"abc", "1 unexpected bytes after the tuple"),
        (b"D" + struct.pack(">IcHc", 1, b"K", 1, b"n") + b"\x00", "1 unexpected bytes after the tuple"),
        (b"U" + struct.pack(">IcHc", 1, b"N", 1, b"n") + b"??", "2 unexpected bytes after the tuple"),
        (b"D" + struct.pack(">I", 1) + b"N", "Delete: expected 'K' or 'O'"),
        (b"B\x00\x00", "malformed pgoutput 'B'"),
    ],
)
def test_malformed_payloads_raise_pgoutput_error(payload: bytes, error: str) -> None:
    """A message that is not exactly what the protocol says is refused, never read as something else,
    by the message decoder and by the stream's row decoder alike."""
    with pytest.raises(PgOutputError, match=error):
        decode(payload)
    if payload[:1] in (b"I", b"U", b"D"):
        with pytest.raises(PgOutputError, match=error):
            decode_row_change(payload)


def test_relation_schema_maps_types_and_key() -> None:
    schema = relation_schema(decode(captured("insert.1.R")))
    assert schema.table == TableName("public", "plain")
    assert [(c.name, c.type) for c in schema.columns] == [
        ("id", ColumnType("int32")),
        ("name", ColumnType("text")),
        ("amount", ColumnType("decimal", precision=10, scale=2)),
        ("born", ColumnType("date")),
    ]
    assert schema.primary_key == ("id",)
    # Under REPLICA IDENTITY FULL every column is flagged: that is not a primary key.
    assert relation_schema(decode(captured("full_insert.1.R"))).primary_key == ()


def test_relation_schema_needs_custom_types_looked_up() -> None:
    relation = decode(captured("enum.2.R"))
    with pytest.raises(KeyError, match="feeling"):
        relation_schema(relation)
    types = {**BUILTIN_TYPES, MOOD: PgTypeInfo("mood", is_enum=True)}
    schema = relation_schema(relation, types)
    assert [c.type for c in schema.columns] == [
        ColumnType("int64"), ColumnType("text"), ColumnType("list", element=ColumnType("text"))
    ]


def test_builtin_type_table_matches_pg_type(source_db: str) -> None:
    with psycopg.connect(source_db) as conn:
        rows = conn.execute(
            "SELECT t.oid, t.typname, e.typname FROM pg_type t "
            "LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A' WHERE t.oid = ANY(%s)",
            [list(BUILTIN_TYPES)],
        ).fetchall()
    assert {oid: PgTypeInfo(name, element) for oid, name, element in rows} == dict(BUILTIN_TYPES)


@pytest.mark.parametrize(
    ("text", "value"),
    [("0/0", 0), ("16/B374D848", 0x16B374D848), ("0/ABCDEF", 0xABCDEF), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


@pytest.mark.parametrize("text", ["", "16", "16/", "1/2/3", "G/0", "123456789/0"])
def test_lsn_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn(text)
