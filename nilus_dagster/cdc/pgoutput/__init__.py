"""A pure decoder for PostgreSQL's `pgoutput` logical replication protocol, version 1.

`decode(payload)` turns the body of one XLogData message into an immutable message object
(`wire.py`); `decode_row_change` gives row changes as plain tuples, the stream's hot path
(`rows.py`), and `decode_many` the same for many payloads at once, their values parsed by Arrow
kernels (`bulk.py`). Column values stay in PostgreSQL's text form (`messages.py`). Types and
meaning of the values are the caller's business: the `Relation` message carries each column's
type OID and typmod, and `relation_schema()` maps them to logical column types (`type_map.py`).
"""

from nilus_dagster.cdc.pgoutput.bulk import decode_many
from nilus_dagster.cdc.pgoutput.messages import (
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgOutputError,
    Relation,
    RelationColumn,
    ReplicaIdentity,
    Truncate,
    TupleData,
    TupleValue,
    TypeMessage,
    UnchangedToast,
    Update,
)
from nilus_dagster.cdc.pgoutput.rows import RowChange, decode_row_change
from nilus_dagster.cdc.pgoutput.type_map import BUILTIN_TYPES, PgTypeInfo, relation_schema
from nilus_dagster.cdc.pgoutput.wire import decode, pg_timestamp

__all__ = [
    "BUILTIN_TYPES",
    "UNCHANGED_TOAST",
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "PgOutputError",
    "PgTypeInfo",
    "Relation",
    "RelationColumn",
    "ReplicaIdentity",
    "RowChange",
    "Truncate",
    "TupleData",
    "TupleValue",
    "TypeMessage",
    "UnchangedToast",
    "Update",
    "decode",
    "decode_many",
    "decode_row_change",
    "pg_timestamp",
    "relation_schema",
]
