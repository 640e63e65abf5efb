"""The replication stream against a live PostgreSQL 16 (wal_level=logical)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from nilus_dagster.cdc.lsn import Lsn, parse_lsn
from nilus_dagster.cdc.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    PgTypeInfo,
    Relation,
    Update,
)
from nilus_dagster.cdc.pipeline import caught_up_target
from nilus_dagster.cdc.replication import (
    ReplicationConnection,
    ReplicationError,
    ReplicationStream,
    SlotInUse,
    SlotLost,
    SystemMismatch,
    drop_slot,
    ensure_same_system,
    fetch_type_info,
    slot_exists,
    slot_status,
    system_identifier,
)

SLOT = "nilus_test"
PUBLICATION = "nilus_pub"


@pytest.fixture
def db(source_db: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to a source with table `items` in publication `nilus_pub`."""
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE items")
        yield conn
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = current_database() AND active_pid IS NOT NULL"
        )
        for _ in range(50):
            if not conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE database = current_database() AND active"
            ).fetchone():
                break
            time.sleep(0.05)
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = current_database()"
        )


@pytest.fixture
def replication(source_db: str) -> Iterator[Callable[[], ReplicationConnection]]:
    """Opens replication connections and closes them after the test."""
    opened: list[ReplicationConnection] = []

    def connect() -> ReplicationConnection:
        opened.append(ReplicationConnection.connect(source_db))
        return opened[-1]

    yield connect
    for conn in opened:
        conn.close()


def read_transactions(
    stream: ReplicationStream, count: int, timeout_s: float = 10
) -> list[tuple[Lsn, Message]]:
    """Poll until `count` Commit messages arrived."""
    messages: list[tuple[Lsn, Message]] = []
    deadline = time.monotonic() + timeout_s
    while sum(isinstance(m, Commit) for _, m in messages) < count:
        assert time.monotonic() < deadline, f"timed out; got {messages}"
        messages += stream.poll(0.2)
    return messages


def wait_for(condition: Callable[[], bool], stream: ReplicationStream | None = None) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        if stream is not None:
            assert stream.poll(0.05) == []
        else:
            time.sleep(0.05)


def test_identify_system_and_system_identifier(db: psycopg.Connection, replication) -> None:
    info = replication().identify_system()
    assert info.system_identifier == system_identifier(db)
    assert info.dbname == db.info.dbname
    assert info.timeline == 1 and info.xlogpos > 0
    ensure_same_system(db, info.system_identifier)
    with pytest.raises(SystemMismatch, match="re-snapshot"):
        ensure_same_system(db, "42")


def test_exported_snapshot_sees_exactly_the_rows_before_the_slot(
    db: psycopg.Connection, source_db: str, replication
) -> None:
    db.execute("INSERT INTO items SELECT i, 'before' FROM generate_series(1, 3) i")
    conn = replication()
    slot = conn.create_slot(SLOT, export_snapshot=True)
    assert slot.slot_name == SLOT and slot.snapshot_name
    db.execute("INSERT INTO items VALUES (4, 'after'), (5, 'after')")

    with psycopg.connect(source_db) as reader:
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute(f"SET TRANSACTION SNAPSHOT '{slot.snapshot_name}'")
        assert reader.execute("SELECT id FROM items ORDER BY id").fetchall() == [(1,), (2,), (3,)]
        reader.rollback()

    conn.release_snapshot()
    with psycopg.connect(source_db) as reader, pytest.raises(psycopg.Error, match="invalid snapshot"):
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute(f"SET TRANSACTION SNAPSHOT '{slot.snapshot_name}'")

    # The stream from the consistent point holds exactly what the snapshot does not.
    stream = conn.start(SLOT, [PUBLICATION], slot.consistent_point)
    inserts = [m.new for _, m in read_transactions(stream, 1) if isinstance(m, Insert)]
    assert inserts == [("4", "after"), ("5", "after")]


def test_stream_delivers_changes_in_order_with_lsns_and_transactions(
    db: psycopg.Connection, replication
) -> None:
    conn = replication()
    slot = conn.create_slot(SLOT, export_snapshot=False)
    assert slot.snapshot_name is None
    with db.transaction():
        db.execute("INSERT INTO items VALUES (1, 'one'), (2, NULL)")
    with db.transaction():
        db.execute("UPDATE items SET name = 'uno' WHERE id = 1")
        db.execute("DELETE FROM items WHERE id = 2")

    stream = conn.start(SLOT, [PUBLICATION])
    received = read_transactions(stream, 2)
    messages = [m for _, m in received]
    assert [type(m) for m in messages] == [
        Begin, Relation, Insert, Insert, Commit, Begin, Update, Delete, Commit
    ]
    relation = messages[1]
    assert (relation.namespace, relation.name, relation.key_columns) == ("public", "items", ("id",))
    assert messages[2].new == ("1", "one") and messages[3].new == ("2", None)
    assert messages[6].new == ("1", "uno") and messages[7].old == ("2", None)

    first_begin, first_commit = messages[0], messages[4]
    second_begin, second_commit = messages[5], messages[8]
    assert first_begin.final_lsn == first_commit.commit_lsn < first_commit.end_lsn
    assert second_begin.final_lsn == second_commit.commit_lsn > first_commit.end_lsn
    assert first_begin.xid + 1 == second_begin.xid
    # Changes carry their record's WAL position, increasing; a Commit carries its end position.
    change_lsns = [lsn for lsn, m in received if isinstance(m, Insert | Update | Delete)]
    assert change_lsns == sorted(change_lsns) and change_lsns[0] >= slot.consistent_point
    assert received[4][0] == first_commit.end_lsn and received[8][0] == second_commit.end_lsn
    assert received[1][0] == 0  # Relation messages describe, they have no WAL position
    assert stream.received_lsn >= second_commit.end_lsn


def test_confirm_flushed_moves_the_slot_only_to_what_was_confirmed(
    db: psycopg.Connection, replication
) -> None:
    conn = replication()
    slot = conn.create_slot(SLOT, export_snapshot=False)
    db.execute("INSERT INTO items VALUES (1, 'a')")
    db.execute("INSERT INTO items VALUES (2, 'b')")
    stream = conn.start(SLOT, [PUBLICATION], status_interval_s=0.05)  # many periodic updates
    commits = [m for _, m in read_transactions(stream, 2) if isinstance(m, Commit)]
    status = slot_status(db, SLOT)
    assert status.exists and status.active and status.wal_status == "reserved"
    assert status.confirmed_flush_lsn == slot.consistent_point  # nothing confirmed yet

    stream.confirm_flushed(commits[0].end_lsn, send=True)
    wait_for(lambda: slot_status(db, SLOT).confirmed_flush_lsn == commits[0].end_lsn, stream)
    for _ in range(10):  # periodic updates keep reporting the confirmed position, never more
        assert stream.poll(0.05) == []
    assert slot_status(db, SLOT).confirmed_flush_lsn == commits[0].end_lsn
    stream.confirm_flushed(commits[0].commit_lsn)  # going back is ignored
    assert stream.confirmed_lsn == commits[0].end_lsn

    stream.confirm_flushed(commits[1].end_lsn)  # sent by the next periodic update
    wait_for(lambda: slot_status(db, SLOT).confirmed_flush_lsn == commits[1].end_lsn, stream)
    assert slot_status(db, SLOT).retained_wal_bytes >= 0


def test_restart_replays_only_what_was_not_confirmed(db: psycopg.Connection, replication) -> None:
    conn = replication()
    conn.create_slot(SLOT, export_snapshot=False)
    for i in range(3):
        db.execute("INSERT INTO items VALUES (%s, 'x')", [i])
    stream = conn.start(SLOT, [PUBLICATION])
    commits = [m for _, m in read_transactions(stream, 3) if isinstance(m, Commit)]
    stream.confirm_flushed(commits[0].end_lsn, send=True)
    wait_for(lambda: slot_status(db, SLOT).confirmed_flush_lsn == commits[0].end_lsn, stream)
    conn.close()
    wait_for(lambda: not slot_status(db, SLOT).active)

    def inserted_ids(start_lsn: Lsn) -> list[str]:
        again = replication()
        stream = again.start(SLOT, [PUBLICATION], start_lsn)
        ids = [m.new[0] for _, m in read_transactions(stream, 2) if isinstance(m, Insert)]
        assert stream.poll(0.3) == []
        again.close()
        wait_for(lambda: not slot_status(db, SLOT).active)
        return ids

    assert inserted_ids(0) == ["1", "2"]  # resume at the slot's confirmed position
    assert inserted_ids(commits[0].end_lsn) == ["1", "2"]
    assert inserted_ids(commits[0].commit_lsn) == ["1", "2"]  # an older start cannot rewind the slot


def test_poll_returns_promptly_when_idle_and_reports_caught_up(db: psycopg.Connection, replication) -> None:
    conn = replication()
    conn.create_slot(SLOT, export_snapshot=False)
    stream = conn.start(SLOT, [PUBLICATION])
    started = time.monotonic()
    assert stream.poll(0.2) == []
    assert 0.15 < time.monotonic() - started < 1.0

    db.execute("CREATE TABLE other (id int)")  # WAL outside the publication
    db.execute("INSERT INTO other SELECT generate_series(1, 100)")
    position = parse_lsn(db.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])
    stream.send_status(reply_requested=True)  # the server answers with a keepalive

    def caught_up() -> bool:
        return stream.caught_up_lsn is not None and stream.caught_up_lsn >= position

    deadline = time.monotonic() + 10
    while not caught_up():
        assert time.monotonic() < deadline
        assert stream.poll(0.1) == []
        stream.send_status(reply_requested=True)
    assert stream.confirmed_lsn == 0  # the caller decides whether to confirm it


def test_caught_up_target_lies_past_every_commit_already_returned(db: psycopg.Connection) -> None:
    """The test cluster commits with synchronous_commit = off: a commit returns before its WAL is
    written, yet the target lies past it, and is flushed (the walsender can read up to it)."""
    for i in range(20):
        db.execute("INSERT INTO items VALUES (%s, 'x')", (i,))
        committed = parse_lsn(db.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        target = caught_up_target(db)
        flushed = parse_lsn(db.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])
        assert committed <= target <= flushed


def test_logical_messages_are_streamed_on_request(db: psycopg.Connection, replication) -> None:
    conn = replication()
    conn.create_slot(SLOT, export_snapshot=False)
    db.execute("SELECT pg_logical_emit_message(true, 'nilus.watermark', 'w1')")
    db.execute("INSERT INTO items VALUES (1, 'x')")
    stream = conn.start(SLOT, [PUBLICATION], logical_messages=True)
    messages = [m for _, m in read_transactions(stream, 2)]
    emitted = [m for m in messages if isinstance(m, LogicalMessage)]
    assert [(m.prefix, m.content, m.transactional) for m in emitted] == [("nilus.watermark", b"w1", True)]


def test_missing_slot_raises_slot_lost(db: psycopg.Connection, replication) -> None:
    with pytest.raises(SlotLost, match="does not exist"):
        replication().start("no_such_slot", [PUBLICATION])


def test_slot_dropped_while_streaming_raises_slot_lost(db: psycopg.Connection, replication) -> None:
    conn = replication()
    conn.create_slot(SLOT, export_snapshot=False)
    stream = conn.start(SLOT, [PUBLICATION])
    assert stream.poll(0.1) == []
    pid = db.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [SLOT]).fetchone()[0]
    db.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_for(lambda: not slot_status(db, SLOT).active)
    assert drop_slot(db, SLOT) is True
    with pytest.raises(SlotLost, match="was dropped"):
        for _ in range(50):
            stream.poll(0.1)


def test_terminated_connection_with_slot_kept_is_not_slot_lost(db: psycopg.Connection, replication) -> None:
    conn = replication()
    conn.create_slot(SLOT, export_snapshot=False)
    stream = conn.start(SLOT, [PUBLICATION])
    db.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
    )
    with pytest.raises(ReplicationError, match="lost") as raised:
        for _ in range(50):
            stream.poll(0.1)
    assert not isinstance(raised.value, SlotLost)


def test_second_consumer_gets_slot_in_use(db: psycopg.Connection, replication) -> None:
    first = replication()
    first.create_slot(SLOT, export_snapshot=False)
    first.start(SLOT, [PUBLICATION])
    with pytest.raises(SlotInUse):
        replication().start(SLOT, [PUBLICATION])


def test_slot_helpers(db: psycopg.Connection, replication) -> None:
    assert slot_status(db, SLOT).exists is False
    with pytest.raises(SlotLost):
        drop_slot(db, SLOT, missing_ok=False)
    replication().create_slot(SLOT, export_snapshot=False)
    status = slot_status(db, SLOT)
    assert status.exists and not status.active and status.restart_lsn is not None
    assert status.retained_wal_bytes is not None and status.retained_wal_bytes >= 0
    with pytest.raises(ReplicationError, match="already exists"):
        replication().create_slot(SLOT, export_snapshot=False)
    assert drop_slot(db, SLOT) is True and drop_slot(db, SLOT) is False
    assert not slot_exists(db, SLOT)


def test_invalid_names_are_rejected_before_reaching_the_server(replication) -> None:
    conn = replication()
    with pytest.raises(ValueError, match="slot name"):
        conn.create_slot("Bad-Name", export_snapshot=False)
    with pytest.raises(ValueError, match="publication"):
        conn.start("ok", ["pub'; DROP"])


def test_fetch_type_info_for_enums_and_arrays(db: psycopg.Connection) -> None:
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    mood, moods = db.execute("SELECT 'mood'::regtype::oid, '_mood'::regtype::oid").fetchone()
    assert fetch_type_info(db, [mood, moods, mood]) == {
        mood: PgTypeInfo("mood", None, True),
        moods: PgTypeInfo("_mood", "mood", False),
    }
    assert fetch_type_info(db, []) == {}


def test_slot_invalidated_by_wal_limit_raises_slot_lost(db: psycopg.Connection, replication) -> None:
    replication().create_slot(SLOT, export_snapshot=False)
    db.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    db.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 30
        while slot_status(db, SLOT).wal_status != "lost":
            assert time.monotonic() < deadline, slot_status(db, SLOT)
            db.execute("INSERT INTO items SELECT i, 'x' FROM generate_series(1, 1000) i ON CONFLICT DO NOTHING")
            db.execute("SELECT pg_switch_wal()")
            db.execute("CHECKPOINT")
    finally:
        db.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        db.execute("SELECT pg_reload_conf()")
    with pytest.raises(SlotLost, match="cannot be used"):
        replication().start(SLOT, [PUBLICATION])
