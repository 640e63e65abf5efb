"""pgoutput v1 message objects and the values their tuples carry.

Column values stay in PostgreSQL's text form (`str`), or `bytes` for binary-format values, `None` for SQL
NULL and `UNCHANGED_TOAST` for a TOASTed value the server did not resend because it did not change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from nilus_dagster.cdc.lsn import Lsn


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
