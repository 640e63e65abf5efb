"""The SQL text the BigQuery sink runs: batch MERGE/replace/append, the CDC MERGE, checkpoints.

Table arguments are already-quoted references (`` `project.dataset.table` ``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.cloud import bigquery

from nilus_dagster.schema import TableSchema
from nilus_dagster.sinks.base import (
    DELETED_COLUMN,
    LSN_COLUMN,
    OP_COLUMN,
    SYNCED_AT_COLUMN,
    UNCHANGED_COLUMN,
    old_key_column,
)
from nilus_dagster.sinks.bigquery.files import MOVED_OP
from nilus_dagster.sinks.bigquery_types import TOASTABLE_KINDS

ROW_NUMBER = "_nilus_row"  # staged row order for the batch MERGE (the last row per key wins)
PRESENT = "_nilus_present"  # in a transaction's shadow table: FALSE once the key is deleted (spanning.py)
_FOUND = "_nilus_found"


def quote(name: str) -> str:
    return f"`{name}`"


def table_ref(table: bigquery.Table) -> str:
    return f"`{table.project}.{table.dataset_id}.{table.table_id}`"


def _columns(names: Iterable[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{quote(n)}" for n in names)


def _key_match(keys: Sequence[str], left: str = "T", right: str = "S") -> str:
    return " AND ".join(f"{left}.{quote(k)} = {right}.{quote(k)}" for k in keys)


def _latest_per_key(stage: str, keys: Sequence[str], order_by: str, where: str = "TRUE") -> str:
    partition = _columns(keys)
    return (
        f"(SELECT * FROM {stage} WHERE {where} "
        f"QUALIFY ROW_NUMBER() OVER (PARTITION BY {partition} ORDER BY {quote(order_by)} DESC) = 1)"
    )


def batch_merge_sql(target: str, stage: str, schema: TableSchema) -> str:
    """Upsert the staged rows by primary key; the last staged row per key wins."""
    keys, names = schema.primary_key, schema.column_names
    updates = ", ".join(f"{quote(n)} = S.{quote(n)}" for n in names if n not in keys)
    matched = f"WHEN MATCHED THEN UPDATE SET {updates} " if updates else ""
    return (
        f"MERGE {target} T USING {_latest_per_key(stage, keys, ROW_NUMBER)} S ON {_key_match(keys)} "
        f"{matched}WHEN NOT MATCHED THEN INSERT ({_columns(names)}) VALUES ({_columns(names, 'S.')})"
    )


def cdc_merge_sql(
    target: str,
    stage: str,
    schema: TableSchema,
    *,
    soft_delete: bool,
    truncate_before: int | None = None,
    moved: bool = False,
    shadow: bool = False,
) -> str:
    """One MERGE applying staged changes newer than each row; unchanged TOASTed values are kept.

    Only columns PostgreSQL can TOAST get the `IF(... IN UNNEST(...))` guard, which keeps the
    statement compact for wide tables. With `truncate_before` (the batch's first LSN) the same
    statement also removes the rows the batch does not touch and that are older than the batch.
    With `moved` the stage also holds moved rows (see `carry_source`). With `shadow` the target is
    a transaction's shadow table (spanning.py): a change at the row's own LSN (an earlier chunk of
    the same transaction) is applied again, and a delete marks the row absent.
    """
    keys = schema.primary_key
    lsn, op = quote(LSN_COLUMN), quote(OP_COLUMN)
    newer = f"(T.{lsn} IS NULL OR S.{lsn} {'>=' if shadow else '>'} T.{lsn})"
    unchanged = f"S.{quote(UNCHANGED_COLUMN)}"

    def new_value(name: str, kind: str) -> str:
        if kind in TOASTABLE_KINDS:
            return f"IF('{name}' IN UNNEST({unchanged}), T.{quote(name)}, S.{quote(name)})"
        return f"S.{quote(name)}"

    updates = [f"{quote(c.name)} = {new_value(c.name, c.type.kind)}" for c in schema.columns if c.name not in keys]
    now = "CURRENT_TIMESTAMP()"
    updates += [f"{lsn} = S.{lsn}", f"{op} = S.{op}", f"{quote(SYNCED_AT_COLUMN)} = {now}"]
    updates.append(f"{quote(DELETED_COLUMN)} = FALSE")
    delete = f"{_soft_delete()}, {lsn} = S.{lsn}" if soft_delete else "DELETE"
    inserted = [*schema.column_names, LSN_COLUMN, OP_COLUMN, SYNCED_AT_COLUMN, DELETED_COLUMN]
    values = f"{_columns([*schema.column_names, LSN_COLUMN, OP_COLUMN], 'S.')}, {now}, FALSE"
    if shadow:
        updates.append(f"{quote(PRESENT)} = TRUE")
        inserted.append(PRESENT)
        values += ", TRUE"
        if not soft_delete:
            delete = f"UPDATE SET {quote(PRESENT)} = FALSE, {lsn} = S.{lsn}, {op} = 'D'"
    source = carry_source(target, stage, schema) if moved else _latest_per_key(stage, keys, LSN_COLUMN)
    merge = (
        f"MERGE {target} T USING {source} S ON {_key_match(keys)} "
        f"WHEN MATCHED AND S.{op} = 'D' AND {newer} THEN {delete} "
        f"WHEN MATCHED AND {newer} THEN UPDATE SET {', '.join(updates)} "
        f"WHEN NOT MATCHED AND S.{op} != 'D' THEN INSERT ({_columns(inserted)}) VALUES ({values})"
    )
    if truncate_before is None:
        return merge
    return merge + _truncate_clause(truncate_before, soft_delete=soft_delete)


def _truncate_clause(truncate_before: int | None, *, soft_delete: bool) -> str:
    """The MERGE clause that removes the rows a batch does not touch (older than `truncate_before`)."""
    lsn = quote(LSN_COLUMN)
    older = "TRUE" if truncate_before is None else f"(T.{lsn} IS NULL OR T.{lsn} < {int(truncate_before)})"
    truncated = _soft_delete() if soft_delete else "DELETE"
    if soft_delete:
        older += f" AND NOT IFNULL(T.{quote(DELETED_COLUMN)}, FALSE)"
    return f" WHEN NOT MATCHED BY SOURCE AND {older} THEN {truncated}"


def shadow_seed_sql(
    shadow: str, target: str, stage: str, schema: TableSchema, names: Sequence[str], *, moved: bool
) -> str:
    """Copy into the shadow the target's rows at the staged keys (and at the old keys of moved rows)
    that the shadow does not hold yet."""
    keys = schema.primary_key
    touched = f"EXISTS (SELECT 1 FROM {stage} S WHERE {_key_match(keys, 'R', 'S')})"
    if moved:
        old_match = " AND ".join(f"R.{quote(k)} = M.{quote(old_key_column(k))}" for k in keys)
        touched += f" OR EXISTS (SELECT 1 FROM {stage} M WHERE M.{quote(OP_COLUMN)} = '{MOVED_OP}' AND {old_match})"
    return (
        f"INSERT INTO {shadow} ({_columns([*names, PRESENT])}) SELECT {_columns(names, 'R.')}, TRUE FROM {target} R "
        f"WHERE ({touched}) AND NOT EXISTS (SELECT 1 FROM {shadow} H WHERE {_key_match(keys, 'R', 'H')})"
    )


def shadow_truncate_sql(shadow: str, *, soft_delete: bool) -> str:
    """A truncate inside the transaction: every row the shadow holds is gone (or soft-deleted)."""
    if soft_delete:
        return truncate_sql(shadow, soft_delete=True)
    return f"UPDATE {shadow} SET {quote(PRESENT)} = FALSE WHERE TRUE"


def shadow_apply_sql(
    target: str,
    shadow: str,
    names: Sequence[str],
    keys: Sequence[str],
    *,
    soft_delete: bool,
    truncated: bool,
) -> str:
    """The transaction's net effect: each shadow row replaces the target's row at its key (an
    absent one deletes it); with a truncate, the target's other rows go (they all predate the
    transaction: every row it wrote has its key in the shadow). A replay recomputes the same
    shadow rows from the target it left, so applying them again changes nothing."""
    updates = ", ".join(f"{quote(n)} = S.{quote(n)}" for n in names if n not in keys)
    present = f"S.{quote(PRESENT)}"
    return (
        f"MERGE {target} T USING {shadow} S ON {_key_match(keys)} "
        f"WHEN MATCHED AND NOT {present} THEN DELETE "
        f"WHEN MATCHED THEN UPDATE SET {updates} "
        f"WHEN NOT MATCHED AND {present} THEN INSERT ({_columns(names)}) VALUES ({_columns(names, 'S.')})"
    ) + (_truncate_clause(None, soft_delete=soft_delete) if truncated else "")


def carry_source(target: str, stage: str, schema: TableSchema) -> str:
    """The staged changes with TOASTed values carried across key changes.

    A moved row (op 'M': new key, `_nilus_old_<key>`, `_nilus_unchanged`) fills those columns of
    the upsert at its new key from the target's row at the old key, read before the MERGE changes
    anything (a MERGE source sees the table as it was). Carried columns leave the upsert's
    `_nilus_unchanged`. On a replay the old row is gone: nothing is carried, the columns stay
    unchanged, and the row at the new key (already as new as the upsert) is not touched.
    """
    keys, op, unchanged = schema.primary_key, quote(OP_COLUMN), quote(UNCHANGED_COLUMN)
    carried = [c.name for c in schema.columns if c.type.kind in TOASTABLE_KINDS and c.name not in keys]
    found, moved_unchanged = f"_o.{_FOUND}", f"_m.{unchanged}"
    replaced = [
        f"IF({found} AND '{name}' IN UNNEST({moved_unchanged}), _o.{quote(name)}, _s.{quote(name)}) AS {quote(name)}"
        for name in carried
    ]
    kept = f"ARRAY(SELECT u FROM UNNEST(_s.{unchanged}) AS u WHERE u NOT IN UNNEST({moved_unchanged}))"
    replaced.append(f"IF({found}, {kept}, _s.{unchanged}) AS {unchanged}")
    latest = _latest_per_key(stage, keys, LSN_COLUMN, where=f"{op} != '{MOVED_OP}'")
    old_match = " AND ".join(f"_o.{quote(k)} = _m.{quote(old_key_column(k))}" for k in keys)
    return (
        f"(SELECT _s.* REPLACE ({', '.join(replaced)}) FROM {latest} _s "
        f"LEFT JOIN (SELECT * FROM {stage} WHERE {op} = '{MOVED_OP}') _m "
        f"ON {_key_match(keys, '_s', '_m')} AND _s.{op} != 'D' "
        f"LEFT JOIN (SELECT {_columns([*keys, *carried])}, TRUE AS {_FOUND} FROM {target}) _o ON {old_match})"
    )


def uncarriable_sql(target: str, stage: str, schema: TableSchema) -> str:
    """How many moved rows find neither their old row nor an already-applied row at the new key
    (their TOASTed values are nowhere to be read)."""
    keys, op, lsn = schema.primary_key, quote(OP_COLUMN), quote(LSN_COLUMN)
    old_match = " AND ".join(f"O.{quote(k)} = M.{quote(old_key_column(k))}" for k in keys)
    first = quote(keys[0])
    return (
        f"SELECT COUNT(*) AS n FROM {stage} M "
        f"JOIN {stage} U ON {_key_match(keys, 'U', 'M')} AND U.{op} IN ('I', 'U') "
        f"LEFT JOIN {target} O ON {old_match} "
        f"LEFT JOIN {target} N ON {_key_match(keys, 'N', 'M')} "
        f"WHERE M.{op} = '{MOVED_OP}' AND O.{first} IS NULL AND (N.{first} IS NULL OR N.{lsn} < U.{lsn})"
    )


def _soft_delete() -> str:
    return (
        f"UPDATE SET {quote(DELETED_COLUMN)} = TRUE, {quote(OP_COLUMN)} = 'D', "
        f"{quote(SYNCED_AT_COLUMN)} = CURRENT_TIMESTAMP()"
    )


def truncate_sql(target: str, *, soft_delete: bool) -> str:
    """A truncate with no other change in its batch: delete (or soft-delete) every row."""
    if not soft_delete:
        return f"DELETE FROM {target} WHERE TRUE"
    return f"UPDATE {target} {_soft_delete().removeprefix('UPDATE ')} WHERE TRUE"


def replace_sql(target: str, stage: str, names: Sequence[str]) -> str:
    """Swap the table's rows for the staged ones in one transaction: readers never see a half table."""
    columns = _columns(names)
    return (
        f"BEGIN TRANSACTION; DELETE FROM {target} WHERE TRUE; "
        f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {stage}; COMMIT TRANSACTION;"
    )


def append_sql(target: str, stage: str | None, names: Sequence[str], checkpoints: str, *, guarded: bool) -> str:
    """Insert the staged rows and set the checkpoint `@key` to `@value` in one transaction.

    `guarded`: only while the checkpoint still holds `@previous`. A replay of the same mark range,
    or a load that read from a mark another run has since moved on from, then changes nothing
    (the caller reads the checkpoint afterwards to tell which).
    """
    columns = _columns(names)
    insert = f"INSERT INTO {target} ({columns}) SELECT {columns} FROM {stage}; " if stage else ""
    body = (
        f"{insert}DELETE FROM {checkpoints} WHERE key = @key; "
        f"INSERT INTO {checkpoints} (key, value, updated_at) VALUES (@key, @value, CURRENT_TIMESTAMP()); "
    )
    if guarded:
        guard = f"(SELECT value FROM {checkpoints} WHERE key = @key) IS NOT DISTINCT FROM @previous"
        body = f"IF {guard} THEN {body}END IF; "
    return f"BEGIN TRANSACTION; {body}COMMIT TRANSACTION;"


def checkpoint_merge_sql(checkpoints: str) -> str:
    """Set the checkpoint `@key` to `@value`."""
    return (
        f"MERGE {checkpoints} T USING (SELECT @key AS key, @value AS value) S ON T.key = S.key "
        "WHEN MATCHED THEN UPDATE SET value = S.value, updated_at = CURRENT_TIMESTAMP() "
        "WHEN NOT MATCHED THEN INSERT (key, value, updated_at) VALUES (S.key, S.value, CURRENT_TIMESTAMP())"
    )
