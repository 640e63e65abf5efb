"""Replaying dead-letter entries once their cause is fixed (the sink column widened, the
`on_error`/type mapping changed, the source row corrected).

Why not the stored row. An entry holds the row as of its commit LSN; later changes of the same key
may have been applied since (or the row deleted), so writing the stored row could put an old value
back. A replay writes the *current* source row of each entry's key instead (or deletes the key
when the source no longer has it), and it does so on the CDC run's stream thread, between two
polls (cdc/run_replay.py): no sink write of the stream can interleave with it.

Why that is exact. At that point the sink table holds the source's state up to the table's
checkpoint P (every whole transaction received is applied; its rows carry `_nilus_lsn` <= P) but
for the dead-lettered rows. The replayed rows are read now, so they reflect at least P, and they
are written with `_nilus_lsn = P`: the sink's LSN guard lets them replace the row (<= P), and every
change committed after P (the stream applies, or re-delivers after a restart, each of them, with
its own LSN > P) still lands on top of it. Once the stream passes the moment of the read the key
holds exactly the source's row, whatever happened to it in between. A key-less table cannot be
replayed this way (an entry cannot name its current row): resync it instead.

An entry whose current row still has a value the sink cannot take stays in the queue (the
request fails naming it); the others are acknowledged with the request (state/dlq_replays.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import tuple_row

from nilus_dagster.cdc.changes import TableChanges
from nilus_dagster.cdc.poison import Changes, drop_poison, find_poison
from nilus_dagster.sinks.base import ChangeSet, Sink
from nilus_dagster.sources.postgres.reader import _output_settings
from nilus_dagster.sources.postgres.text_codec import ValueDecodeError

if TYPE_CHECKING:
    import psycopg

    from nilus_dagster.cdc.applier import StreamTable
    from nilus_dagster.state.dead_letters import DeadLetter

_ORDINAL = "_nilus_ord"
_FOUND = "_nilus_found"
_KEYS_PER_QUERY = 500


@dataclass
class ReplayOutcome:
    """What a replay did for one table."""

    replayed: list[int] = field(default_factory=list)  # entry ids written (to acknowledge)
    refused: list[str] = field(default_factory=list)  # why the other entries stay
    refused_ids: set[int] = field(default_factory=set)
    upserted: int = 0
    deleted: int = 0


def replay_table_entries(
    conn: psycopg.Connection[Any], sink: Sink, table: StreamTable, entries: list[DeadLetter], *, soft_delete: bool
) -> ReplayOutcome:
    """Write the current source rows of the entries' keys to the sink (see the module docstring)."""
    outcome = ReplayOutcome()
    name = table.source.name
    key_columns = table.schema.primary_key
    if not key_columns:
        outcome.refused.append(
            f"{name} has no primary key: its dead-letter entries cannot be matched to a current row; "
            "resync the table instead"
        )
        return outcome
    by_key: dict[tuple[str, ...], list[DeadLetter]] = {}
    for entry in entries:
        key = entry.row_key if isinstance(entry.row_key, list) else [entry.row_key]
        if len(key) != len(key_columns) or any(v is None for v in key):
            outcome.refused.append(f"entry {entry.id}: its key {key} does not match {name}'s key {list(key_columns)}")
            continue
        by_key.setdefault(tuple(key), []).append(entry)
    keys = list(by_key)
    changes = TableChanges(table.schema)
    lsn = table.applied_lsn
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        chunk = keys[start:start + _KEYS_PER_QUERY]
        for ordinal, row in _current_rows(conn, table, chunk):
            if row is None:
                changes.delete(dict(zip(key_columns, chunk[ordinal], strict=True)), lsn)
            else:
                changes.insert(row, set(), lsn, op="U")
    by_change_key = dict(zip(_change_keys(key_columns, keys), keys, strict=True))
    change_set = _without_poison(changes, by_change_key, by_key, outcome)
    if change_set is not None and not change_set.is_empty:
        sink.apply_changes(table.target, changes.schema, change_set, None, soft_delete=soft_delete)
        outcome.upserted, outcome.deleted = change_set.upserts.num_rows, change_set.deletes.num_rows
    outcome.replayed = [e.id for group in by_key.values() for e in group if e.id not in outcome.refused_ids]
    return outcome


def _change_keys(key_columns: tuple[str, ...], keys: list[tuple[str, ...]]) -> list[Any]:
    """The keys as TableChanges spells them (the value for a one-column key, else a tuple)."""
    return [k[0] if len(key_columns) == 1 else k for k in keys]


def _without_poison(
    changes: Changes,
    by_change_key: dict[Any, tuple[str, ...]],
    by_key: dict[tuple[str, ...], list[DeadLetter]],
    outcome: ReplayOutcome,
) -> ChangeSet | None:
    """The change set; rows whose current values the sink still cannot take are left out and named."""
    try:
        return changes.to_change_set()
    except ValueDecodeError:
        pass
    poison = find_poison(changes)
    for row in poison:
        key = by_change_key.get(row.entry, tuple(str(v) for v in row.key))
        ids = [e.id for e in by_key.get(key, [])]
        outcome.refused_ids.update(ids)
        outcome.refused.append(f"entries {ids} (key {list(key)}): the current row still cannot be taken: {row.message}")
    drop_poison(changes, poison)
    return changes.to_change_set()


def _current_rows(
    conn: psycopg.Connection[Any], table: StreamTable, keys: list[tuple[str, ...]]
) -> list[tuple[int, dict[str, str | None] | None]]:
    """(ordinal in `keys`, the current row as PostgreSQL text values, or None when gone), read as
    the stream sees values (the reader's output settings, COPY text format: the output functions)."""
    schema = table.schema
    name = table.source.name
    key_columns = list(schema.primary_key)
    types = _key_types(conn, name.schema, name.name, key_columns)
    values = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join([sql.Literal(i), *(sql.Literal(v) for v in key)]))
        for i, key in enumerate(keys)
    )
    join = sql.SQL(" AND ").join(
        sql.SQL("t.{c} = CAST(k.{c} AS {type})").format(c=sql.Identifier(c), type=sql.SQL(types[c]))
        for c in key_columns
    )
    query = sql.SQL(
        "COPY (SELECT k.{ord}, t.ctid IS NOT NULL, {cols} FROM (VALUES {values}) AS k({ord}, {keys}) "
        "LEFT JOIN {table} AS t ON {join}) TO STDOUT"
    ).format(
        ord=sql.Identifier(_ORDINAL),
        cols=sql.SQL(", ").join(sql.Identifier("t", c) for c in schema.column_names),
        values=values,
        keys=sql.SQL(", ").join(map(sql.Identifier, key_columns)),
        table=sql.Identifier(name.schema, name.name),
        join=join,
    )
    found: list[tuple[int, dict[str, str | None] | None]] = []
    with conn.transaction(), _output_settings(conn), conn.cursor() as cur, cur.copy(query) as copy:
        for ordinal, present, *row in copy.rows():
            found.append((int(ordinal), dict(zip(schema.column_names, row, strict=True)) if present == "t" else None))
    return found


def _key_types(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[str]) -> dict[str, str]:
    """The key columns' SQL types (format_type), to cast the key texts back."""
    rows = conn.cursor(row_factory=tuple_row).execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "WHERE a.attrelid = format('%%I.%%I', %s::text, %s::text)::regclass AND a.attname = ANY(%s) "
        "AND NOT a.attisdropped",
        (schema, table, columns),
    ).fetchall()
    types = {r[0]: r[1] for r in rows}
    missing = [c for c in columns if c not in types]
    if missing:
        raise ValueError(f"{schema}.{table} has no key column {', '.join(missing)} any more")
    return types
