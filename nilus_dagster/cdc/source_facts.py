"""What a schema change did to the rows PostgreSQL already had, judged from the source catalog.

pgoutput announces a schema change with a Relation message but never sends the rows it touched:
a column added with a constant default reads as that default in every older row (PostgreSQL keeps
it as the column's "missing value"), a table rewrite (a volatile default, ALTER COLUMN TYPE ...
USING) changes every row silently, a rename moves values under a new name. The catalog tells them
apart: a rewrite gives the table a new `relfilenode`, a rename keeps the column's `attnum`, a new
column gets a new `attnum` and, for a constant default, `atthasmissing`.

The facts are recorded with each schema in the schema history and compared at the next change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.schema.evolution import SchemaDiff


@dataclass(frozen=True)
class TableFacts:
    """Catalog facts about a source table at one moment."""

    storage: tuple[int, ...]  # relfilenodes of the table, or of a partitioned table's leaves
    attnums: dict[str, int]
    defaults: frozenset[str] = frozenset()  # columns with a default expression
    missing: dict[str, str] = field(default_factory=dict)  # column → text value older rows report

    def restricted_to(self, schema: TableSchema) -> TableFacts:
        """The facts of the columns `schema` has: the catalog may already hold later changes."""
        names = set(schema.column_names)
        attnums = {n: a for n, a in self.attnums.items() if n in names}
        return TableFacts(self.storage, attnums, self.defaults, self.missing)

    def to_json(self) -> dict[str, Any]:
        return {"storage": list(self.storage), "attnums": self.attnums}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TableFacts | None:
        if not data or "storage" not in data:
            return None
        return cls(tuple(int(n) for n in data["storage"]), {k: int(v) for k, v in data.get("attnums", {}).items()})


def read_table_facts(conn: psycopg.Connection[Any], table: TableName) -> TableFacts | None:
    """The table's facts now, or None when it is gone."""
    regclass = sql.Identifier(table.schema, table.name).as_string(conn)
    storage = conn.execute(
        "SELECT c.relfilenode FROM pg_class c WHERE c.oid = to_regclass(%s) AND c.relkind <> 'p' "
        "UNION SELECT c.relfilenode FROM pg_partition_tree(to_regclass(%s)) t JOIN pg_class c ON c.oid = t.relid "
        "WHERE t.isleaf ORDER BY 1",
        (regclass, regclass),
    ).fetchall()
    if not storage:
        return None
    columns = conn.execute(
        "SELECT attname, attnum, atthasdef, atthasmissing, attmissingval::text FROM pg_attribute "
        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
        (regclass,),
    ).fetchall()
    missing = {name: _only_element(text) for name, _, _, has_missing, text in columns if has_missing and text}
    return TableFacts(
        storage=tuple(int(r[0]) for r in storage),
        attnums={name: int(attnum) for name, attnum, _, _, _ in columns},
        defaults=frozenset(name for name, _, has_default, _, _ in columns if has_default),
        missing=missing,
    )


def _only_element(array_text: str) -> str:
    """The single element of a one-element array literal (`{5}`, `{"a b"}`) as its text value."""
    inner = array_text[1:-1]
    if not inner.startswith('"'):
        return inner
    out, escaped = [], False
    for char in inner[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        else:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True)
class ChangeVerdict:
    """What to do with the rows the sink already had: fill added columns, or re-read the table."""

    fill: dict[str, str | None]  # added column → the text value older rows report (None: NULL)
    resync_reason: str | None = None


def judge_schema_change(before: TableFacts | None, now: TableFacts | None, diff: SchemaDiff) -> ChangeVerdict:
    """Decide whether the older rows can be brought in line in place, or the table must be re-read."""
    if now is None:
        return ChangeVerdict({}, "the table's catalog entry could not be read")
    if before is not None and before.storage != now.storage:
        return ChangeVerdict({}, "the table was rewritten (its rows changed without being streamed)")
    if before is None and (diff.widened or diff.retyped):
        return ChangeVerdict({}, "a column type changed and the table's history is unknown")
    if before is not None:
        moved = [n for n, attnum in now.attnums.items() if n in before.attnums and before.attnums[n] != attnum]
        newest = max(before.attnums.values(), default=0)
        renamed = [c.name for c in diff.added if now.attnums.get(c.name, 0) <= newest]
        if moved or renamed:
            return ChangeVerdict({}, f"columns were renamed ({', '.join(moved + renamed)})")
    elif diff.added and diff.dropped:
        return ChangeVerdict({}, "columns were dropped and added at once (a rename?)")
    fill: dict[str, str | None] = {}
    for column in diff.added:
        if column.name in now.missing:
            fill[column.name] = now.missing[column.name]
        elif column.name in now.defaults and before is None:
            return ChangeVerdict({}, f"column {column.name} was added with a default that rewrote the table")
        else:
            fill[column.name] = None
    return ChangeVerdict(fill)
