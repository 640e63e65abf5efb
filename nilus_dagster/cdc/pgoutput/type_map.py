"""Type OIDs of a Relation's columns → logical column types (`relation_schema`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nilus_dagster.cdc.pgoutput.messages import Relation, ReplicaIdentity
from nilus_dagster.schema.table import Column, TableName, TableSchema


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
