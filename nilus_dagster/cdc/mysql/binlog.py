"""The MariaDB binlog as whole transactions of row changes (`mysql-replication` speaks the
protocol; this module groups its events and judges the statements it cannot apply).

A transaction ends at its XID event (or a `COMMIT` query, for non-transactional tables); a DDL
statement is its own transaction. Its end position (the offset after its last event, with the
GTID state there) is what a table's checkpoint holds once it is applied. A stream that reaches
the end of the binlog stops (non-blocking dump): an unfinished transaction is dropped and read
again from its start by the next read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, RotateEvent, XAPrepareEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from nilus_dagster.cdc.mysql import time2
from nilus_dagster.cdc.mysql.position import BinlogPosition, advance_gtid
from nilus_dagster.schema import TableName
from nilus_dagster.sources.mysql.connection import parse_dsn

_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE\s+SAVEPOINT|XA\s)", re.IGNORECASE)
_NAME = r"(?:`(?:[^`]|``)+`|[\w$]+)"
_TRUNCATE = re.compile(rf"^\s*TRUNCATE\s+(?:TABLE\s+)?(?P<name>{_NAME}(?:\.{_NAME})?)\s*;?\s*$", re.IGNORECASE)
_DROP_DATABASE = re.compile(r"^\s*DROP\s+(?:DATABASE|SCHEMA)\s+(?:IF\s+EXISTS\s+)?(?P<name>`(?:[^`]|``)+`|[\w$]+)",
                            re.IGNORECASE)
time2.install()  # the library's negative TIME decoding is wrong (cdc/mysql/time2.py)

_BEGIN = re.compile(r"^\s*BEGIN\b", re.IGNORECASE)
_COMMIT = re.compile(r"^\s*COMMIT\b", re.IGNORECASE)
_XA = re.compile(r"^\s*XA\s", re.IGNORECASE)
_IDENTIFIER = re.compile(r"`((?:[^`]|``)+)`|([\w$]+)")


class StatementRefused(Exception):
    """A statement in the binlog changes a streamed table in a way the stream cannot apply exactly."""


@dataclass
class RowChange:
    kind: str  # "I", "U" or "D"
    table: TableName
    new: dict[str, Any] | None
    old: dict[str, Any] | None
    # why the library read a column as None ("null", "empty set", "out of date range"...), per side
    new_none: dict[str, str] = field(default_factory=dict)
    old_none: dict[str, str] = field(default_factory=dict)


@dataclass
class Transaction:
    end: BinlogPosition
    commit_time: datetime | None
    changes: list[RowChange] = field(default_factory=list)
    truncated: list[TableName] = field(default_factory=list)  # tables truncated (a statement of its own)


def connection_settings(dsn: str) -> dict[str, Any]:
    """pymysql keyword arguments of the source DSN (its TLS settings included), as the batch reader
    logs in (sources/mysql/connection.py)."""
    return {**parse_dsn("source", dsn).login(), "charset": "utf8mb4"}


def _identifier(text: str) -> str:
    return text[1:-1].replace("``", "`") if text.startswith("`") else text


def _qualified(text: str, default_schema: str) -> TableName:
    parts = [_identifier(m.group(0)) for m in _IDENTIFIER.finditer(text)]
    return TableName(parts[0], parts[1]) if len(parts) == 2 else TableName(default_schema, parts[0])


def statement_effect(query: str, default_schema: str, tracked: set[TableName]) -> TableName | None:
    """The tracked table a non-row statement truncates (None: it concerns no tracked table).

    Raises StatementRefused for any other statement that names a tracked table (ALTER, RENAME,
    DROP, a statement-format INSERT...): its rows are not in the binlog as row events, or the
    table's columns changed under the stream."""
    if _CONTROL.match(query):
        return None
    truncate = _TRUNCATE.match(query)
    if truncate is not None:
        table = _qualified(truncate.group("name"), default_schema)
        return table if table in tracked else None
    drop = _DROP_DATABASE.match(query)
    if drop is not None and _identifier(drop.group("name")).lower() in {t.schema.lower() for t in tracked}:
        raise StatementRefused(f"the source database {_identifier(drop.group('name'))} was dropped: {query[:200]}")
    words = {_identifier(m.group(0)).lower() for m in _IDENTIFIER.finditer(query)}
    named = sorted(t.qualified for t in tracked if t.name.lower() in words)
    if named:
        raise StatementRefused(
            f"a statement on {', '.join(named)} cannot be streamed (binlog CDC applies row changes and TRUNCATE; "
            f"schema changes and statement-format writes are refused): {query[:300]}"
        )
    return None


class BinlogReader:
    """Reads whole transactions from a position to the current end of the binlog."""

    def __init__(self, dsn: str, server_id: int, name: str, tracked: set[TableName]) -> None:
        self.settings = connection_settings(dsn)
        self.server_id = server_id
        self.name = name
        self.tracked = tracked
        self._schemas = sorted({t.schema for t in tracked})
        self.reached: BinlogPosition | None = None  # where the last read found the end of the binlog

    def read(self, start: BinlogPosition) -> Iterator[Transaction]:
        """Transactions that end after `start`, in binlog order, until the end of the binlog."""
        reader = BinLogStreamReader(
            connection_settings=dict(self.settings),
            server_id=self.server_id,
            blocking=False,
            resume_stream=True,
            log_file=start.file,
            log_pos=start.pos,
            # file+position dump (the library's MariaDB mode would start from a GTID state instead)
            is_mariadb=False,
            only_schemas=self._schemas,
            only_events=[MariadbGtidEvent, XidEvent, QueryEvent, RotateEvent, XAPrepareEvent,
                         WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
            report_slave={"hostname": self.name, "username": "", "password": "", "port": 0},
            enable_logging=False,
        )
        self.reached = None
        try:
            yield from self._transactions(reader, start)
            if reader.log_file is not None and reader.log_pos is not None:
                self.reached = BinlogPosition(reader.log_file, reader.log_pos)
        finally:
            reader.close()

    def _transactions(self, reader: BinLogStreamReader, start: BinlogPosition) -> Iterator[Transaction]:
        state, gtid = start.gtid, ""
        changes: list[RowChange] = []
        grouped = False  # inside BEGIN ... COMMIT/XID (else a statement is a transaction of its own)
        for event in reader:
            if isinstance(event, MariadbGtidEvent):
                gtid, changes, grouped = event.gtid, [], False
            elif isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
                table = TableName(event.schema, event.table)
                if table in self.tracked:
                    changes.extend(_row_changes(event, table))
            elif isinstance(event, XidEvent):
                state = advance_gtid(state, gtid) if gtid else state
                yield self._end(reader, event, state, changes)
                gtid, changes, grouped = "", [], False
            elif isinstance(event, XAPrepareEvent):
                if changes:
                    raise StatementRefused(f"an XA transaction ({gtid}) changes a streamed table: XA is not supported")
            elif isinstance(event, QueryEvent):
                query = event.query if isinstance(event.query, str) else event.query.decode()
                if _BEGIN.match(query):
                    grouped = True
                    continue
                if _XA.match(query) and changes:
                    raise StatementRefused(f"an XA transaction ({gtid}) changes a streamed table: XA is not supported")
                schema = event.schema.decode() if isinstance(event.schema, bytes) else str(event.schema or "")
                truncated = statement_effect(query, schema, self.tracked)
                if grouped and truncated is None and not _COMMIT.match(query):
                    continue  # a statement inside the transaction that touches no streamed table
                state = advance_gtid(state, gtid) if gtid else state
                transaction = self._end(reader, event, state, changes)
                transaction.truncated = [truncated] if truncated is not None else []
                gtid, changes, grouped = "", [], False
                yield transaction

    @staticmethod
    def _end(reader: BinLogStreamReader, event: Any, state: str, changes: list[RowChange]) -> Transaction:
        when = datetime.fromtimestamp(event.timestamp, UTC) if event.timestamp else None
        return Transaction(BinlogPosition(reader.log_file, reader.log_pos, state), when, changes)


def _row_changes(event: Any, table: TableName) -> Iterator[RowChange]:
    if isinstance(event, WriteRowsEvent):
        for row in event.rows:
            yield RowChange("I", table, row["values"], None, row.get("none_sources") or {})
    elif isinstance(event, UpdateRowsEvent):
        for row in event.rows:
            yield RowChange("U", table, row["after_values"], row["before_values"], row.get("after_none_sources") or {},
                            row.get("before_none_sources") or {})
    else:
        for row in event.rows:
            yield RowChange("D", table, None, row["values"], old_none=row.get("none_sources") or {})
