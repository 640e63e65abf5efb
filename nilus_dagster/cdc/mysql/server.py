"""The source server of a binlog CDC pipeline: settings checks (with the fix in the message),
the binlog positions it still has, and the check that a checkpoint belongs to its binlog."""

from __future__ import annotations

import hashlib
from typing import Any

from nilus_dagster.cdc.mysql.position import BinlogPosition, gtid_state
from nilus_dagster.cdc.setup import CdcSetupError

_SETTINGS = (  # variable, required value, the fix
    ("log_bin", "1", "start the server with --log-bin (binary logging is off)"),
    ("binlog_format", "ROW", "SET GLOBAL binlog_format = 'ROW' and binlog_format = ROW in the server's my.cnf"),
    ("binlog_row_image", "FULL", "SET GLOBAL binlog_row_image = 'FULL' and binlog_row_image = FULL in my.cnf"),
    (
        "binlog_row_metadata",
        "FULL",
        "SET GLOBAL binlog_row_metadata = 'FULL' and binlog_row_metadata = FULL in my.cnf (row events must "
        "carry column names and signedness)",
    ),
)
# MariaDB 10.5+ spells REPLICATION SLAVE as REPLICATION REPLICA and REPLICATION CLIENT as BINLOG MONITOR
_PRIVILEGES = {
    "REPLICATION SLAVE": ("REPLICATION SLAVE", "REPLICATION REPLICA"),
    "REPLICATION CLIENT": ("REPLICATION CLIENT", "BINLOG MONITOR"),
}


class BinlogLost(Exception):
    """The binlog a pipeline must read from is gone or is not the one it read."""


def replica_server_id(tenant: str, pipeline: str) -> int:
    """The server id the pipeline's binlog connection registers with: stable per pipeline, in the
    upper half of the id range so it does not meet the small ids servers are usually given."""
    digest = hashlib.sha256(f"nilus/{tenant}/{pipeline}".encode()).digest()
    return 2**31 + int.from_bytes(digest[:4]) % (2**31 - 1)


def replica_name(tenant: str, pipeline: str) -> str:
    return f"nilus-{tenant}-{pipeline}"[:60]


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _one(conn: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
    with conn.cursor() as cursor:
        cursor.execute(sql, args or None)
        row = cursor.fetchone()
    if row is None:
        return None
    return _text(row[0]) if len(row) == 1 else tuple(map(_text, row))


def _rows(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    """Result rows with text values (the source connection leaves them undecoded)."""
    with conn.cursor() as cursor:
        cursor.execute(sql)
        return [tuple(map(_text, row)) for row in cursor.fetchall()]


def check_server(conn: Any, server_id: int, name: str) -> None:
    """Refuse, saying how to fix it, a server a binlog CDC pipeline cannot read exactly."""
    version = str(_one(conn, "SELECT VERSION()"))
    if "mariadb" not in version.lower():
        raise CdcSetupError(
            f"binlog CDC reads MariaDB only for now (this server is MySQL {version}): MySQL 8 GTID sets and "
            "its snapshot handover are not supported yet; use a batch pipeline for this source"
        )
    for variable, wanted, fix in _SETTINGS:
        value = str(_one(conn, f"SELECT @@GLOBAL.{variable}"))
        if value.upper() != wanted:
            raise CdcSetupError(f"{variable} is {value}, binlog CDC needs {wanted}: {fix}")
    grants = " ".join(str(row[0]).upper() for row in _rows(conn, "SHOW GRANTS"))
    if "ALL PRIVILEGES ON *.*" not in grants:
        missing = [p for p, spellings in _PRIVILEGES.items() if not any(s in grants for s in spellings)]
        if missing:
            user = _one(conn, "SELECT CURRENT_USER()")
            raise CdcSetupError(
                f"the source user {user} lacks {', '.join(missing)}: GRANT REPLICATION SLAVE, REPLICATION CLIENT "
                f"ON *.* TO {user}"
            )
    own = int(_one(conn, "SELECT @@GLOBAL.server_id"))
    if own == server_id:
        raise CdcSetupError(
            f"the source server's server_id is {own}, the id this pipeline's binlog connection uses: give the "
            "server another server_id (SET GLOBAL server_id = ...)"
        )
    try:
        hosts = _rows(conn, "SHOW SLAVE HOSTS")
    except Exception:  # noqa: BLE001 - listing replicas needs REPLICATION MASTER ADMIN: skip that part
        hosts = []
    for host in hosts:
        if int(host[0]) == server_id and str(host[1]) != name:
            raise CdcSetupError(
                f"replica {host[1]} already reads the binlog with server id {server_id}, the id of this pipeline: "
                "two replicas with one id disconnect each other; rename one of the pipelines or change that replica"
            )


def snapshot_position(conn: Any) -> BinlogPosition:
    """The binlog position consistent with the open `START TRANSACTION WITH CONSISTENT SNAPSHOT`:
    every transaction committed before it is in the snapshot, none after (MariaDB's
    `binlog_snapshot_file`/`_position`, taken under the same lock as the snapshot)."""
    status = {str(k).lower(): str(v) for k, v in _rows(conn, "SHOW STATUS LIKE 'binlog_snapshot_%'")}
    file, pos = status["binlog_snapshot_file"], int(status["binlog_snapshot_position"])
    return BinlogPosition(file, pos, gtid_at(conn, file, pos))


def current_position(conn: Any) -> BinlogPosition:
    """The end of the binlog now (what a run that stops once caught up must reach)."""
    row = _one(conn, "SHOW MASTER STATUS")
    if row is None:
        raise CdcSetupError("SHOW MASTER STATUS returned nothing: binary logging is off (start with --log-bin)")
    return BinlogPosition(str(row[0]), int(row[1]))


def gtid_at(conn: Any, file: str, pos: int) -> str:
    return str(_one(conn, "SELECT BINLOG_GTID_POS(%s, %s)", (file, pos)) or "")


def check_readable(conn: Any, position: BinlogPosition, what: str) -> None:
    """Raise BinlogLost unless the server still has `position` in its binlog, in the binlog the
    pipeline read (the GTID state there is the one recorded with the checkpoint)."""
    files = {str(row[0]) for row in _rows(conn, "SHOW BINARY LOGS")}
    if position.file not in files:
        oldest = min(files) if files else "none"
        raise BinlogLost(
            f"{what} resumes at {position.file}:{position.pos}, but the server no longer has that binlog file "
            f"(purged; oldest is {oldest}): changes since then cannot be read"
        )
    found = gtid_at(conn, position.file, position.pos)
    if gtid_state(found) != gtid_state(position.gtid):
        raise BinlogLost(
            f"{what} resumes at {position.file}:{position.pos} where the pipeline saw GTID state "
            f"{position.gtid or '(empty)'}, but the server's binlog there has {found or '(empty)'}: this is a "
            "different server or its binlog was reset (RESET MASTER)"
        )
