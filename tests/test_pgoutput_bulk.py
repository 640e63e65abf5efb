"""`decode_many` (Arrow kernels over many payloads) gives exactly what `decode_row_change` gives for
each payload: the captured PostgreSQL 16 messages and generated row changes of every shape mixed."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from nilus_dagster.cdc.pgoutput import PgOutputError, decode_many, decode_row_change
from nilus_dagster.cdc.pgoutput.bulk import MIN_BULK_ROWS

DATA = Path(__file__).parent / "data" / "pgoutput"
_BLOB = (DATA / "messages.bin").read_bytes()
_INDEX: dict[str, list[int]] = json.loads((DATA / "index.json").read_text())
HEADER = b"w" + bytes(24)  # an XLogData header: the message starts at offset 25


def value(v: str | None) -> bytes:
    if v is None:
        return b"n"
    if v == "<toast>":
        return b"u"
    if v.startswith("<binary>"):
        raw = v[8:].encode()
        return b"b" + struct.pack(">i", len(raw)) + raw
    raw = v.encode()
    return b"t" + struct.pack(">i", len(raw)) + raw


def tuple_of(values: list[str | None]) -> bytes:
    return struct.pack(">H", len(values)) + b"".join(map(value, values))


def change(kind: bytes, relation: int, new: list[str | None] | None, old: list[str | None] | None = None,
           marker: bytes = b"K") -> bytes:
    body = kind + struct.pack(">I", relation)
    if old is not None:
        body += marker + tuple_of(old)
    if new is not None:
        body += b"N" + tuple_of(new)
    return HEADER + body


def generated(seed: int, rows: int) -> list[bytes]:
    rng = random.Random(seed)
    texts = [None, "", "plain", "é漢字 ünïcode", "x" * 300, "line\nbreak", "<toast>", "<binary>\x01\x02"]
    payloads = []
    for i in range(rows):
        values = [str(i), rng.choice(texts), f"{i / 100:.2f}", None, rng.choice(texts[:6])]
        shape = rng.random()
        if shape < 0.4:
            payloads.append(change(b"I", 1, values))
        elif shape < 0.5:
            payloads.append(change(b"I", 2, values[:3]))  # another table, fewer columns
        elif shape < 0.65:
            payloads.append(change(b"U", 1, values))
        elif shape < 0.7:
            payloads.append(change(b"U", 1, values, [str(i + 1), None, None, None, None]))  # key changed
        elif shape < 0.75:
            payloads.append(change(b"U", 1, values, values, marker=b"O"))  # REPLICA IDENTITY FULL
        elif shape < 0.85:
            payloads.append(change(b"D", 1, None, [str(i), None, None, None, None]))
        elif shape < 0.9:
            payloads.append(change(b"D", 1, None, values, marker=b"O"))
        elif shape < 0.95:
            payloads.append(HEADER + b"B" + struct.pack(">QqI", i, i, i))
        else:
            payloads.append(HEADER + b"C" + struct.pack(">BQQq", 0, i, i, i))
    return payloads


def test_matches_the_one_by_one_decoder_on_captured_messages() -> None:
    captured = [HEADER + _BLOB[offset : offset + length] for offset, length, _ in _INDEX.values()]
    payloads = captured * (MIN_BULK_ROWS // len(captured) + 2)
    assert decode_many(payloads, 25) == [decode_row_change(p, 25) for p in payloads]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_the_one_by_one_decoder_on_every_shape(seed: int) -> None:
    payloads = generated(seed, 3000)
    assert decode_many(payloads, 25) == [decode_row_change(p, 25) for p in payloads]


def test_uniform_inserts_and_deletes_only() -> None:
    inserts = [change(b"I", 7, [str(i), f"name {i}", None]) for i in range(500)]
    deletes = [change(b"D", 7, None, [str(i), None, None]) for i in range(500)]
    for payloads in (inserts, deletes, inserts + deletes):
        assert decode_many(payloads, 25) == [decode_row_change(p, 25) for p in payloads]


def outcome(decode: object) -> object:
    try:
        return decode()  # type: ignore[operator]
    except PgOutputError as error:
        return f"PgOutputError: {error}"


@pytest.mark.parametrize(
    "bad",
    [
        change(b"I", 1, ["1", "ok"])[:-1] + b"\xff",  # not UTF-8
        change(b"I", 1, ["1", "ok"])[:-2],  # truncated
        change(b"I", 1, ["1", "ok"]) + b"extra",  # trailing bytes
        change(b"I", 1, ["1"]).replace(b"t\x00\x00\x00\x01", b"t\xff\xff\xff\xff"),  # negative length
        change(b"I", 1, ["1"]).replace(b"t\x00\x00\x00\x01", b"x\x00\x00\x00\x01"),  # unknown value kind
    ],
)
def test_a_malformed_payload_among_good_ones_gets_what_the_decoder_says(bad: bytes) -> None:
    payloads = [change(b"I", 1, [str(i), "ok"]) for i in range(200)]
    payloads.insert(100, bad)
    expected = outcome(lambda: [decode_row_change(p, 25) for p in payloads])
    assert outcome(lambda: decode_many(payloads, 25)) == expected
