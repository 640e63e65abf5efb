"""A pure decoder for PostgreSQL's `pgoutput` logical replication protocol, version 1.

`decode(payload)` turns the body of one XLogData message into an immutable message object. Column
values stay in PostgreSQL's text form (`str`), or `bytes` for binary-format values, `None` for SQL
NULL and `UNCHANGED_TOAST` for a TOASTed value the server did not resend because it did not change.
Types and meaning of the values are the caller's business: the `Relation` message carries each
column's type OID and typmod, and `relation_schema()` maps them to logical column types.

This is the hot path of CDC: it avoids per-byte Python loops and decodes each value once.
Reference: https://www.postgresql.org/docs/16/protocol-logicalrep-message-formats.html
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nilus_dagster.cdc.lsn import Lsn
from nilus_dagster.schema.table import Column, TableName, TableSchema


class PgOutputError(ValueError):
    """A payload that is not a well-formed pgoutput v1 message."""


class UnchangedToast(enum.Enum):
    """Marks a TOASTed column value the server left out because the UPDATE did not change it."""

    VALUE = "u"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = UnchangedToast.VALUE

TupleValue = str | bytes | None | UnchangedToast
TupleData = tuple[TupleValue, ...]

# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: Lsn  # LSN of the transaction's commit record
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: Lsn  # LSN of the commit record
    end_lsn: Lsn  # end of the commit record: the position to confirm once the transaction is durable
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    """The transaction was replayed from another node (replication origin)."""

    commit_lsn: Lsn  # commit LSN on the origin server
    name: str


class ReplicaIdentity(enum.StrEnum):
    DEFAULT = "d"  # primary key columns
    NOTHING = "n"
    FULL = "f"  # all columns
    INDEX = "i"  # a chosen unique index


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    type_modifier: int  # typmod, -1 when none
    is_key: bool  # part of the replica identity (every column under REPLICA IDENTITY FULL)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's shape; sent before the first change to it in a session and after every DDL."""

    relation_id: int
    namespace: str  # schema name; empty string means pg_catalog
    name: str
    replica_identity: ReplicaIdentity
    columns: tuple[RelationColumn, ...]

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class TypeMessage:
    """A non-builtin data type used by a following Relation (enums, domains, composites...)."""

    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """`old` is set when the key changed ('K': key columns only, others None) or under REPLICA
    IDENTITY FULL ('O': the whole old row)."""

    relation_id: int
    new: TupleData
    old: TupleData | None = None
    old_is_key_only: bool = False


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: TupleData
    old_is_key_only: bool  # True: only key columns are filled ('K'); False: the whole row ('O')


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A message written with `pg_logical_emit_message()`."""

    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


Message = Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate | LogicalMessage

# --- decoding ---------------------------------------------------------------------------------

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_INT16 = struct.Struct(">h").unpack_from
_UINT16 = struct.Struct(">H").unpack_from
_INT32 = struct.Struct(">i").unpack_from
_UINT32 = struct.Struct(">I").unpack_from
_BEGIN = struct.Struct(">QqI").unpack_from
_COMMIT = struct.Struct(">BQQq").unpack_from
_MESSAGE_HEAD = struct.Struct(">BQ").unpack_from
_COLUMN_TAIL = struct.Struct(">Ii").unpack_from
_TRUNCATE_HEAD = struct.Struct(">iB").unpack_from

_TEXT, _BINARY, _NULL, _UNCHANGED = b"t"[0], b"b"[0], b"n"[0], b"u"[0]
_NEW, _KEY, _OLD = b"N"[0], b"K"[0], b"O"[0]
_TRUNCATE_CASCADE, _TRUNCATE_RESTART_IDENTITY = 1, 2


def pg_timestamp(microseconds: int) -> datetime:
    """A PostgreSQL wire timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return _PG_EPOCH + timedelta(microseconds=microseconds)


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def _tuple_flagged(buf: bytes, pos: int) -> tuple[TupleData, int, bool]:
    """A tuple's values, the position past it, and whether any value is unchanged TOAST or binary."""
    (count,) = _UINT16(buf, pos)
    pos += 2
    values: list[TupleValue] = []
    append = values.append
    special = False
    for _ in range(count):
        kind = buf[pos]
        if kind == _TEXT:
            (length,) = _INT32(buf, pos + 1)
            start = pos + 5
            pos = start + length
            append(buf[start:pos].decode())
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _UNCHANGED:
            append(UNCHANGED_TOAST)
            pos += 1
            special = True
        elif kind == _BINARY:
            (length,) = _INT32(buf, pos + 1)
            start = pos + 5
            pos = start + length
            append(buf[start:pos])
            special = True
        else:
            raise PgOutputError(f"unknown tuple value kind {chr(kind)!r} at offset {pos}")
    if pos > len(buf):
        raise PgOutputError("tuple data runs past the end of the message")
    return tuple(values), pos, special


def _tuple(buf: bytes, pos: int) -> tuple[TupleData, int]:
    values, pos, _ = _tuple_flagged(buf, pos)
    return values, pos


def _expect(buf: bytes, pos: int, marker: int, what: str) -> None:
    if buf[pos] != marker:
        raise PgOutputError(f"{what}: expected {chr(marker)!r} at offset {pos}, got {chr(buf[pos])!r}")


def _begin(buf: bytes, pos: int) -> Begin:
    final_lsn, commit_time, xid = _BEGIN(buf, pos)
    return Begin(final_lsn, pg_timestamp(commit_time), xid)


def _commit(buf: bytes, pos: int) -> Commit:
    flags, commit_lsn, end_lsn, commit_time = _COMMIT(buf, pos)
    return Commit(flags, commit_lsn, end_lsn, pg_timestamp(commit_time))


def _origin(buf: bytes, pos: int) -> Origin:
    (commit_lsn,) = struct.unpack_from(">Q", buf, pos)
    name, _ = _cstring(buf, pos + 8)
    return Origin(commit_lsn, name)


def _relation(buf: bytes, pos: int) -> Relation:
    (relation_id,) = _UINT32(buf, pos)
    namespace, pos = _cstring(buf, pos + 4)
    name, pos = _cstring(buf, pos)
    identity = ReplicaIdentity(chr(buf[pos]))
    (count,) = _INT16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column_name, pos = _cstring(buf, pos + 1)
        type_oid, typmod = _COLUMN_TAIL(buf, pos)
        pos += 8
        columns.append(RelationColumn(column_name, type_oid, typmod, bool(flags & 1)))
    return Relation(relation_id, namespace, name, identity, tuple(columns))


def _type(buf: bytes, pos: int) -> TypeMessage:
    (type_oid,) = _UINT32(buf, pos)
    namespace, pos = _cstring(buf, pos + 4)
    name, _ = _cstring(buf, pos)
    return TypeMessage(type_oid, namespace, name)


def _insert(buf: bytes, pos: int) -> Insert:
    (relation_id,) = _UINT32(buf, pos)
    if buf[pos + 4] != _NEW:
        _expect(buf, pos + 4, _NEW, "Insert")
    return Insert(relation_id, _tuple(buf, pos + 5)[0])


def _update(buf: bytes, pos: int) -> Update:
    (relation_id,) = _UINT32(buf, pos)
    pos += 4
    marker = buf[pos]
    if marker == _NEW:
        new, _ = _tuple(buf, pos + 1)
        return Update(relation_id, new)
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Update: expected 'K', 'O' or 'N' at offset {pos}, got {chr(marker)!r}")
    old, pos = _tuple(buf, pos + 1)
    _expect(buf, pos, _NEW, "Update")
    new, _ = _tuple(buf, pos + 1)
    return Update(relation_id, new, old, marker == _KEY)


def _delete(buf: bytes, pos: int) -> Delete:
    (relation_id,) = _UINT32(buf, pos)
    marker = buf[pos + 4]
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Delete: expected 'K' or 'O' at offset {pos + 4}, got {chr(marker)!r}")
    old, _ = _tuple(buf, pos + 5)
    return Delete(relation_id, old, marker == _KEY)


def _truncate(buf: bytes, pos: int) -> Truncate:
    count, options = _TRUNCATE_HEAD(buf, pos)
    relation_ids = struct.unpack_from(f">{count}I", buf, pos + 5)
    return Truncate(relation_ids, bool(options & _TRUNCATE_CASCADE), bool(options & _TRUNCATE_RESTART_IDENTITY))


def _logical_message(buf: bytes, pos: int) -> LogicalMessage:
    flags, lsn = _MESSAGE_HEAD(buf, pos)
    prefix, pos = _cstring(buf, pos + 9)
    (length,) = _INT32(buf, pos)
    return LogicalMessage(bool(flags & 1), lsn, prefix, buf[pos + 4 : pos + 4 + length])


_DECODERS: dict[int, Callable[[bytes, int], Message]] = {
    b"I"[0]: _insert,
    b"U"[0]: _update,
    b"D"[0]: _delete,
    b"B"[0]: _begin,
    b"C"[0]: _commit,
    b"R"[0]: _relation,
    b"Y"[0]: _type,
    b"T"[0]: _truncate,
    b"O"[0]: _origin,
    b"M"[0]: _logical_message,
}


def decode(payload: bytes | bytearray | memoryview, offset: int = 0) -> Message:
    """Decode one pgoutput v1 message starting at `offset` (e.g. 25, past an XLogData header)."""
    buf = payload if type(payload) is bytes else bytes(payload)
    try:
        return _DECODERS[buf[offset]](buf, offset + 1)
    except PgOutputError:
        raise
    except KeyError:
        raise PgOutputError(f"unknown pgoutput message type {chr(buf[offset])!r}") from None
    except IndexError:
        if offset >= len(buf):
            raise PgOutputError("empty pgoutput message") from None
        raise PgOutputError(f"truncated pgoutput {chr(buf[offset])!r} message") from None
    except (struct.error, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise PgOutputError(f"malformed pgoutput {chr(buf[offset])!r} message: {error}") from error


# --- row changes as plain tuples (the stream's hot path) ----------------------------------------

# `decode_row_change` returns Insert, Update and Delete as `(kind, relation_id, new, old,
# old_is_key_only, special)`: kind is the message type byte (b"I"[0], b"U"[0], b"D"[0]), `new` is
# None for a Delete, `old` None unless sent, `special` True when a tuple holds an UNCHANGED_TOAST
# or a binary value. Same checks as `decode`, without an object per message.
RowChange = tuple[int, int, TupleData | None, TupleData | None, bool, bool]
_INSERT_KIND, _UPDATE_KIND, _DELETE_KIND = b"I"[0], b"U"[0], b"D"[0]


def _insert_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    if buf[pos + 4] != _NEW:
        _expect(buf, pos + 4, _NEW, "Insert")
    new, _, special = _tuple_flagged(buf, pos + 5)
    return (_INSERT_KIND, relation_id, new, None, False, special)


def _update_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    pos += 4
    marker = buf[pos]
    if marker == _NEW:
        new, _, special = _tuple_flagged(buf, pos + 1)
        return (_UPDATE_KIND, relation_id, new, None, False, special)
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Update: expected 'K', 'O' or 'N' at offset {pos}, got {chr(marker)!r}")
    old, pos, old_special = _tuple_flagged(buf, pos + 1)
    _expect(buf, pos, _NEW, "Update")
    new, _, special = _tuple_flagged(buf, pos + 1)
    return (_UPDATE_KIND, relation_id, new, old, marker == _KEY, special or old_special)


def _delete_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    marker = buf[pos + 4]
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Delete: expected 'K' or 'O' at offset {pos + 4}, got {chr(marker)!r}")
    old, _, special = _tuple_flagged(buf, pos + 5)
    return (_DELETE_KIND, relation_id, None, old, marker == _KEY, special)


_ROW_DECODERS: dict[int, Callable[[bytes, int], RowChange]] = {
    _INSERT_KIND: _insert_row,
    _UPDATE_KIND: _update_row,
    _DELETE_KIND: _delete_row,
}


def decode_row_change(payload: bytes | bytearray | memoryview, offset: int = 0) -> Message | RowChange:
    """Like `decode`, but Insert, Update and Delete come as `RowChange` tuples (see above)."""
    buf = payload if type(payload) is bytes else bytes(payload)
    try:
        row_decoder = _ROW_DECODERS.get(buf[offset])
    except IndexError:
        raise PgOutputError("empty pgoutput message") from None
    if row_decoder is None:
        return decode(buf, offset)
    try:
        return row_decoder(buf, offset + 1)
    except PgOutputError:
        raise
    except IndexError:
        raise PgOutputError(f"truncated pgoutput {chr(buf[offset])!r} message") from None
    except (struct.error, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise PgOutputError(f"malformed pgoutput {chr(buf[offset])!r} message: {error}") from error


# --- types ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgTypeInfo:
    """What `column_type()` needs to know about a type OID: `pg_type.typname`, its array element's
    typname, and whether it is an enum."""

    name: str
    element_name: str | None = None
    is_enum: bool = False


_SCALAR_TYPES = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 23: "int4", 25: "text",
    26: "oid", 114: "json", 142: "xml", 600: "point", 650: "cidr", 700: "float4", 701: "float8",
    774: "macaddr8", 790: "money", 829: "macaddr", 869: "inet", 1042: "bpchar", 1043: "varchar",
    1082: "date", 1083: "time", 1114: "timestamp", 1184: "timestamptz", 1186: "interval",
    1266: "timetz", 1560: "bit", 1562: "varbit", 1700: "numeric", 2950: "uuid", 3220: "pg_lsn",
    3614: "tsvector", 3802: "jsonb", 3904: "int4range", 3906: "numrange", 3908: "tsrange",
    3910: "tstzrange", 3912: "daterange", 3926: "int8range",
}  # fmt: skip
_ARRAY_TYPES = {
    1000: "bool", 1001: "bytea", 1003: "name", 1005: "int2", 1007: "int4", 1009: "text",
    1014: "bpchar", 1015: "varchar", 1016: "int8", 1021: "float4", 1022: "float8", 1028: "oid",
    199: "json", 3807: "jsonb", 2951: "uuid", 1182: "date", 1183: "time", 1115: "timestamp",
    1185: "timestamptz", 1187: "interval", 1231: "numeric", 1041: "inet", 651: "cidr",
}  # fmt: skip

# The standard types' OIDs are fixed by PostgreSQL; anything else comes from a pg_type lookup.
BUILTIN_TYPES: Mapping[int, PgTypeInfo] = {
    **{oid: PgTypeInfo(name) for oid, name in _SCALAR_TYPES.items()},
    **{oid: PgTypeInfo(f"_{element}", element) for oid, element in _ARRAY_TYPES.items()},
}


def relation_schema(relation: Relation, types: Mapping[int, PgTypeInfo] = BUILTIN_TYPES) -> TableSchema:
    """The logical schema a Relation message describes.

    The primary key is the replica identity key when it is the primary key or an index; under
    REPLICA IDENTITY FULL or NOTHING it is left empty (every column is flagged, or none is) and the
    caller should take the key from the catalog. Raises KeyError naming the column whose type OID
    is not in `types`.
    """
    # Imported here: the sources.postgres package pulls in the batch reader, which the decoder and
    # the replication stream do not need.
    from nilus_dagster.sources.postgres.types import column_type

    columns = []
    for c in relation.columns:
        info = types.get(c.type_oid)
        if info is None:
            raise KeyError(
                f"column '{c.name}' of {relation.namespace}.{relation.name} has type OID {c.type_oid}, "
                "which is not in the type map: look it up in pg_type first"
            )
        logical = column_type(info.name, c.type_modifier, element_type_name=info.element_name, is_enum=info.is_enum)
        columns.append(Column(c.name, logical, source_type=info.name))
    keyed = relation.replica_identity in (ReplicaIdentity.DEFAULT, ReplicaIdentity.INDEX)
    return TableSchema(
        TableName(relation.namespace or "pg_catalog", relation.name),
        tuple(columns),
        relation.key_columns if keyed else (),
    )
