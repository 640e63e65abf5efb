"""Re-record the pgoutput captures used by tests/test_pgoutput.py (run by hand, not by pytest).

    python tests/data/pgoutput/record.py

Starts a throwaway cluster, runs each scenario in its own transaction, and saves the raw pgoutput
payloads (XLogData minus its 25-byte header) to `messages.bin` with `index.json` mapping each
capture's name to [offset, length, WAL start]. LSNs, OIDs and xids change on every recording: the
tests assert exact values, so update them after re-recording.
"""

from __future__ import annotations

import json
import select
import struct
import tempfile
from pathlib import Path

import psycopg

from nilus_dagster.embedded.postgres import EmbeddedPostgres

HERE = Path(__file__).parent
SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE plain (id int PRIMARY KEY, name text, amount numeric(10,2), born date);
CREATE TABLE full_row (id int, label varchar(20));
ALTER TABLE full_row REPLICA IDENTITY FULL;
CREATE TABLE toasty (id int PRIMARY KEY, big text, counter int);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE feelings (id bigint PRIMARY KEY, feeling mood, tags text[]);
CREATE PUBLICATION capture FOR ALL TABLES;
SELECT pg_replication_origin_create('upstream');
"""
# (scenario, SQL run in one transaction)
SCENARIOS: list[tuple[str, str]] = [
    ("insert", "INSERT INTO plain VALUES (1, 'Zoë', 12.50, NULL)"),
    ("update", "UPDATE plain SET name = 'Zoe' WHERE id = 1"),
    ("update_key", "UPDATE plain SET id = 2 WHERE id = 1"),
    ("delete", "DELETE FROM plain WHERE id = 2"),
    ("full_insert", "INSERT INTO full_row VALUES (7, 'before')"),
    ("full_update", "UPDATE full_row SET label = 'after' WHERE id = 7"),
    ("full_delete", "DELETE FROM full_row WHERE id = 7"),
    ("toast_insert", "INSERT INTO toasty SELECT 1, string_agg(md5(i::text), ''), 0 "
                     "FROM generate_series(1, 200) i"),
    ("toast_update", "UPDATE toasty SET counter = 1 WHERE id = 1"),
    ("truncate", "INSERT INTO plain VALUES (3, 'x', 1, '2024-02-29');"
                 "TRUNCATE plain, full_row RESTART IDENTITY CASCADE"),
    ("enum", "INSERT INTO feelings VALUES (1, 'happy', '{a,\"b c\"}')"),
    ("message", "SELECT pg_logical_emit_message(true, 'nilus', 'hello'::bytea);"
                "SELECT pg_logical_emit_message(false, 'nilus.nt', '\\x00ff'::bytea)"),
    ("origin", "SELECT pg_replication_origin_session_setup('upstream');"
               "SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-02 03:04:05+00');"
               "INSERT INTO plain VALUES (9, 'from upstream', NULL, NULL)"),
]
# The TOAST insert carries a 6 kB value: keep only its Begin/Relation/Commit.
SKIPPED_CAPTURES = {"toast_insert.2.I"}
BINARY_SCENARIO = ("binary", "INSERT INTO plain VALUES (4, 'bin', 3.25, '2024-02-29')")


def stream_payloads(conn: psycopg.Connection, count_commits: int) -> list[tuple[int, bytes]]:
    """Raw (WAL start, payload) pairs until `count_commits` Commit messages arrived."""
    pgconn = conn.pgconn
    out: list[tuple[int, bytes]] = []
    commits = 0
    while commits < count_commits:
        size, data = pgconn.get_copy_data(1)
        if size == 0:
            select.select([pgconn.socket], [], [], 5)
            pgconn.consume_input()
            continue
        buf = bytes(data)
        if buf[:1] == b"w":
            (start,) = struct.unpack_from(">Q", buf, 1)
            out.append((start, buf[25:]))
            commits += buf[25:26] == b"C"
        elif buf[:1] == b"k" and buf[-1]:
            pgconn.put_copy_data(b"r" + struct.pack(">QQQq?", 0, 0, 0, 0, False))
            pgconn.flush()
    return out


def record(
    dsn: str, options: str, scenarios: list[tuple[str, str]], slot: str
) -> list[tuple[str, int, bytes]]:
    repl = psycopg.connect(dsn, replication="database", autocommit=True)
    repl.execute(f"CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'nothing')")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _, sql in scenarios:
            with conn.transaction():
                conn.execute(sql)
    repl.execute(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({options})")
    payloads = iter(stream_payloads(repl, len(scenarios)))
    named = []
    for name, _ in scenarios:
        for index, (start, payload) in enumerate(payloads):
            named.append((f"{name}.{index}.{chr(payload[0])}", start, payload))
            if payload[:1] == b"C":
                break
    repl.close()
    return named


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = EmbeddedPostgres(Path(tmp)).start()
        try:
            dsn = cluster.dsn()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SETUP)
            text = record(dsn, "proto_version '1', publication_names 'capture', messages 'true'",
                          SCENARIOS, "capture_text")
            binary = record(dsn, "proto_version '1', publication_names 'capture', binary 'true'",
                            [BINARY_SCENARIO], "capture_binary")
        finally:
            cluster.destroy()
    blob = bytearray()
    lines = []
    for name, start, payload in [*text, *binary]:
        if name in SKIPPED_CAPTURES:
            continue
        lines.append(f'  "{name}": {json.dumps([len(blob), len(payload), start])}')
        blob += payload
    (HERE / "messages.bin").write_bytes(bytes(blob))
    (HERE / "index.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{len(lines)} captures, {len(blob)} bytes")


if __name__ == "__main__":
    main()
