"""Change data capture from PostgreSQL: LSNs, the pgoutput decoder and the replication stream."""

from nilus_dagster.cdc.lsn import INVALID_LSN, Lsn, format_lsn, parse_lsn
from nilus_dagster.cdc.pgoutput import (
    BUILTIN_TYPES,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgOutputError,
    PgTypeInfo,
    Relation,
    RelationColumn,
    ReplicaIdentity,
    Truncate,
    TupleData,
    TypeMessage,
    Update,
    decode,
    relation_schema,
)
from nilus_dagster.cdc.replication import (
    ReplicationConnection,
    ReplicationError,
    ReplicationStream,
    ServerClosed,
    SlotInfo,
    SlotInUse,
    SlotLost,
    SlotStatus,
    SystemInfo,
    SystemMismatch,
    drop_slot,
    ensure_same_system,
    fetch_type_info,
    slot_exists,
    slot_status,
    system_identifier,
)

__all__ = [
    "BUILTIN_TYPES", "INVALID_LSN", "UNCHANGED_TOAST", "Begin", "Commit", "Delete", "Insert",
    "LogicalMessage", "Lsn", "Message", "Origin", "PgOutputError", "PgTypeInfo", "Relation",
    "RelationColumn", "ReplicaIdentity", "ReplicationConnection", "ReplicationError",
    "ReplicationStream", "ServerClosed", "SlotInUse", "SlotInfo", "SlotLost", "SlotStatus",
    "SystemInfo", "SystemMismatch", "Truncate", "TupleData", "TypeMessage", "Update", "decode",
    "drop_slot", "ensure_same_system", "fetch_type_info", "format_lsn", "parse_lsn",
    "relation_schema", "slot_exists", "slot_status", "system_identifier",
]
