"""The net effect of one open source transaction, kept on disk: a private SQLite file each.

A transaction too big to keep in memory (cdc/spanning.py) is folded chunk by chunk by the same
collapsing code as a batch (cdc/changes.py, cdc/multiset_changes.py), but each chunk's
collapsing state falls back to this store for what earlier chunks left: per key the last entry
(and the old key a moved row carries unchanged TOASTed values from), per identical row of a
key-less table the net count. At the transaction's Commit the store holds exactly what folding the
whole transaction in memory would have held, and is read back in pieces of bounded size
(`pieces`).

The file (`nilus-spill-*` in the temporary directory, `TMPDIR`) is unlinked as soon as it is
open: a killed run leaves nothing behind, and a restart can never apply a store it did not fill
itself (the stream replays the transaction from the table checkpoints).
"""

from __future__ import annotations

import json
import marshal
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import Any

from nilus_dagster.cdc.changes import Entry, Layout, Row, TableChanges
from nilus_dagster.cdc.multiset_changes import MultisetChanges, _remapper
from nilus_dagster.schema import TableSchema

_MISSING = object()
_CACHE_KIB = 64 * 1024  # SQLite page cache per store (spills to the file beyond it)


def _key_text(key: Any) -> str:
    """A key (a text value, None, or a tuple of them) as deterministic text."""
    return json.dumps(list(key) if isinstance(key, tuple) else key)


def _key_of(text: str) -> Any:
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


class _Rows(dict):  # type: ignore[type-arg]
    """`TableChanges.rows` of one chunk: what the chunk wrote, else what the store holds."""

    def __init__(self, store: KeyedStore) -> None:
        super().__init__()
        self.store = store
        self.cleared = False

    def get(self, key: Any, default: Any = None) -> Any:
        entry = dict.get(self, key, _MISSING)
        if entry is not _MISSING:
            return entry
        return default if self.cleared else self.store.load_entry(key, default)

    def clear(self) -> None:
        super().clear()
        self.cleared = True


class _Moved(dict):  # type: ignore[type-arg]
    """`TableChanges.moved` of one chunk, falling back to the store; pops are remembered."""

    def __init__(self, store: KeyedStore) -> None:
        super().__init__()
        self.store = store
        self.cleared = False
        self.popped: set[str] = set()

    def pop(self, key: Any, default: Any = None) -> Any:
        value = dict.pop(self, key, _MISSING)
        if value is not _MISSING:
            return value
        if self.cleared:
            return default
        text = _key_text(key)
        origin = self.store.load_origin(text)
        if origin is _MISSING:
            return default
        self.popped.add(text)
        return origin

    def clear(self) -> None:
        super().clear()
        self.cleared = True


class KeyedStore:
    """The spilled `TableChanges` of a table with a primary key."""

    def __init__(self, db: sqlite3.Connection, number: int) -> None:
        self.db = db
        self.rows_table, self.moved_table = f"r{number}", f"m{number}"
        db.execute(f"CREATE TABLE {self.rows_table} (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID")
        db.execute(f"CREATE TABLE {self.moved_table} (k TEXT PRIMARY KEY, origin TEXT) WITHOUT ROWID")
        self.truncate = False
        self.layouts: list[Layout] = []
        self._layout_ids: dict[Layout, int] = {}

    def changes(self, schema: TableSchema) -> TableChanges:
        """Collapsing state for one chunk, on top of what the store holds."""
        changes = TableChanges(schema)
        changes.rows = _Rows(self)
        changes.moved = _Moved(self)
        return changes

    def load_entry(self, key: Any, default: Any) -> Any:
        found = self.db.execute(f"SELECT v FROM {self.rows_table} WHERE k = ?", (_key_text(key),)).fetchone()
        return default if found is None else self._entry(found[0])

    def load_origin(self, text: str) -> Any:
        found = self.db.execute(f"SELECT origin FROM {self.moved_table} WHERE k = ?", (text,)).fetchone()
        return _MISSING if found is None else _key_of(found[0])

    def write(self, changes: TableChanges) -> None:
        """Store what one chunk folded (its entries replace the stored ones of the same key)."""
        rows, moved = changes.rows, changes.moved  # (plain dicts: the table's first write)
        if changes.truncate:  # a truncate: nothing before it counts
            self.db.execute(f"DELETE FROM {self.rows_table}")
            self.db.execute(f"DELETE FROM {self.moved_table}")
            self.truncate = True
        popped = moved.popped if isinstance(moved, _Moved) else ()
        self.db.executemany(f"DELETE FROM {self.moved_table} WHERE k = ?", [(k,) for k in popped])
        ids: dict[int, int] = {}

        def layout_id(layout: Layout) -> int:
            found = ids.get(id(layout))
            if found is None:
                found = ids[id(layout)] = self._layout_id(layout)
            return found

        dumps = marshal.dumps
        self.db.executemany(
            f"INSERT OR REPLACE INTO {self.rows_table} VALUES (?, ?)",
            ((_key_text(k), dumps((op, lsn, row, unchanged, layout_id(layout))))
             for k, (op, lsn, row, unchanged, layout) in dict.items(rows)),
        )
        self.db.executemany(
            f"INSERT OR REPLACE INTO {self.moved_table} VALUES (?, ?)",
            ((_key_text(k), _key_text(origin)) for k, origin in dict.items(moved)),
        )

    def schema_changed(self, schema: TableSchema, fill: dict[str, str | None]) -> None:
        """Columns added (with these values for older rows) inside the transaction: entries
        written before the change read them (other columns map by name)."""
        if not fill:
            return
        changed = []
        for text, value in self.db.execute(f"SELECT k, v FROM {self.rows_table}"):
            op, lsn, row, unchanged, layout = self._entry(value)
            missing = [c for c in fill if c not in layout]
            if op == "D" or not missing:
                continue
            filled = (op, lsn, (*row, *(fill[c] for c in missing)), unchanged, self._layout_id((*layout, *missing)))
            changed.append((text, marshal.dumps(filled)))
        self.db.executemany(f"UPDATE {self.rows_table} SET v = ? WHERE k = ?", [(v, k) for k, v in changed])

    def pieces(self, schema: TableSchema, size: int) -> Iterator[TableChanges]:
        """The stored net effect as TableChanges of at most `size` keys; the first carries the
        truncate, and every moved row (they read the sink rows at their old keys, which later
        pieces may change) comes in the first."""
        moved = self.db.execute(
            f"SELECT r.k, r.v, m.origin FROM {self.moved_table} m JOIN {self.rows_table} r ON r.k = m.k"
        ).fetchall()
        first = TableChanges(schema, truncate=self.truncate)
        for text, value, origin in moved:
            key = _key_of(text)
            first.rows[key] = self._entry(value)
            first.moved[key] = _key_of(origin)
        rest = self.db.execute(
            f"SELECT k, v FROM {self.rows_table} WHERE k NOT IN (SELECT k FROM {self.moved_table})"
        )
        pending: TableChanges | None = first
        while True:
            batch = rest.fetchmany(size)
            if not batch:
                break
            piece = TableChanges(schema)
            piece.rows = {_key_of(text): self._entry(value) for text, value in batch}
            if pending is not None and not pending.rows:
                piece.truncate = pending.truncate
            elif pending is not None:
                yield _counted(pending)
            pending = None
            yield _counted(piece)
        if pending is not None:
            yield _counted(pending)

    def _entry(self, value: bytes) -> Entry:
        op, lsn, row, unchanged, layout = marshal.loads(value)  # noqa: S302 (written by this process)
        return op, lsn, row, unchanged, self.layouts[layout]

    def _layout_id(self, layout: Layout) -> int:
        found = self._layout_ids.get(layout)
        if found is None:
            found = self._layout_ids[layout] = len(self.layouts)
            self.layouts.append(layout)
        return found


class MultisetStore:
    """The spilled net counts of a table without a primary key (rows in `columns` order)."""

    def __init__(self, db: sqlite3.Connection, number: int, columns: tuple[str, ...]) -> None:
        self.db = db
        self.table = f"c{number}"
        self.columns = columns
        self.truncate = False
        self._create(self.table)

    def _create(self, table: str) -> None:
        self.db.execute(f"CREATE TABLE {table} (k TEXT PRIMARY KEY, n INTEGER, lsn INTEGER, op TEXT) WITHOUT ROWID")

    def changes(self, schema: TableSchema) -> MultisetChanges:
        return MultisetChanges(schema)

    def write(self, changes: MultisetChanges) -> None:
        """Add one chunk's net counts (a truncate in it drops what came before)."""
        if changes.truncate:
            self.db.execute(f"DELETE FROM {self.table}")
            self.truncate = True
        self.relayout(tuple(changes.schema.column_names), {})
        self._add((_key_text(row), count, lsn, op) for row, (count, lsn, op) in changes.counts.items())

    def _add(self, rows: Any) -> None:
        self.db.executemany(
            f"INSERT INTO {self.table} VALUES (?, ?, ?, ?) ON CONFLICT (k) DO UPDATE SET n = n + excluded.n, "
            "lsn = excluded.lsn, op = CASE WHEN excluded.op = 'D' THEN op ELSE excluded.op END",
            rows,
        )

    def relayout(self, columns: tuple[str, ...], fill: dict[str, str | None]) -> None:
        """The table's columns changed: stored rows map onto the new ones by name (an added
        column reads its `fill` value, else NULL), netted again."""
        if columns == self.columns:
            return
        missing = [c for c in fill if c not in self.columns]
        remap = _remapper((*self.columns, *missing), columns)
        old, values = self.table, tuple(fill[c] for c in missing)
        self.table = f"{old}_"
        self._create(self.table)
        self.columns = columns
        self._add(
            (_key_text(remap((*_key_of(text), *values))), n, lsn, op)
            for text, n, lsn, op in self.db.execute(f"SELECT k, n, lsn, op FROM {old}")
        )
        self.db.execute(f"DROP TABLE {old}")

    def schema_changed(self, schema: TableSchema, fill: dict[str, str | None]) -> None:
        self.relayout(tuple(schema.column_names), fill)

    def pieces(self, schema: TableSchema, size: int) -> Iterator[MultisetChanges]:
        """The net counts as MultisetChanges of at most `size` copies each (a count beyond that is
        split: removing or adding copies in parts gives the same rows)."""
        self.relayout(tuple(schema.column_names), {})
        piece, copies, truncate = MultisetChanges(schema, truncate=self.truncate), 0, self.truncate
        for text, n, lsn, op in self.db.execute(f"SELECT k, n, lsn, op FROM {self.table} WHERE n <> 0"):
            row: Row = _key_of(text)
            while n:
                part = max(-size, min(size, n))
                if copies and copies + abs(part) > size:
                    yield _counted(piece)
                    piece, copies = MultisetChanges(schema), 0
                piece.counts[row] = [part, lsn, op]
                copies += abs(part)
                n -= part
        if copies or truncate:
            yield _counted(piece)


def _counted(changes: Any) -> Any:
    changes.events = len(changes.rows) if isinstance(changes, TableChanges) else len(changes.counts)
    return changes


Store = KeyedStore | MultisetStore


class SpillStore:
    """One open source transaction's spilled net effect, per table."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="nilus-spill-", suffix=".sqlite")
        os.close(fd)
        try:
            self.db = sqlite3.connect(path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode = OFF")  # opens the file: no other file is ever needed
        finally:
            os.unlink(path)
        self.db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("BEGIN")  # never committed to anything that outlives the connection
        self.tables: dict[Any, Store] = {}
        self._created = 0

    def store(self, name: Any, schema: TableSchema) -> Store:
        store = self.tables.get(name)
        if store is None:
            self._created += 1
            number = self._created
            store = KeyedStore(self.db, number) if schema.primary_key else MultisetStore(
                self.db, number, tuple(schema.column_names)
            )
            self.tables[name] = store
        return store

    def discard(self, name: Any) -> None:
        """Forget a table's spilled changes (it is held: none of this transaction may reach it)."""
        self.tables.pop(name, None)

    def close(self) -> None:
        self.db.close()
