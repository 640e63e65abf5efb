"""Measurements, the throwaway cluster and the generated rows shared by the benchmarks."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from nilus_dagster.embedded.postgres import BIN_DIR, EmbeddedPostgres

SOURCE_DB = "bench"
STATE_DB = "state"

# The 5 columns of both benchmark tables: id bigint, text, numeric(12,2), timestamptz, int.
COLUMNS_DDL = "id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), created_at timestamptz, qty int"
ROWS_SELECT = (
    "SELECT g, 'customer-' || g || '-' || md5(g::text), (g %% 10000000) / 100.0, "
    "timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', (g %% 1000)::int "
    "FROM generate_series(%s::bigint, %s::bigint) g"
)


@dataclass(frozen=True)
class Measurement:
    """One timed run: `units` events or rows moved in `seconds`."""

    side: str
    phase: str
    seconds: float
    units: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.units / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        extra = f"  ({self.note})" if self.note else ""
        amount = f"{self.units:>10,} in {self.seconds:7.2f} s"
        return f"  {self.phase:<9} {self.side:<15} {amount} = {self.rate:>11,.0f}/s{extra}"

    def as_json(self) -> dict[str, Any]:
        return {**self.__dict__, "rate": round(self.rate, 1)}


def median_rate(measurements: list[Measurement], side: str, phase: str | None = None) -> float:
    rates = [m.rate for m in measurements if m.side == side and (phase is None or m.phase == phase)]
    return statistics.median(rates) if rates else 0.0


def ratio_line(name: str, ours: float, theirs: float, goal: float, *, against: str) -> tuple[str, bool]:
    """`ours/theirs` against a goal, as a printable line and whether the goal is met."""
    value = ours / theirs if theirs else 0.0
    met = value >= goal
    verdict = "MET" if met else "MISSED"
    return f"  {name:<28} {value:5.2f}x {against:<16} (goal >= {goal:g}x: {verdict})", met


class Timer:
    """`with Timer() as t: ...; t.seconds` (perf_counter)."""

    seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


@dataclass
class Cluster:
    """The benchmark's PostgreSQL 16 (wal_level=logical): a source and a state-store database."""

    pg: EmbeddedPostgres

    def dsn(self, database: str = SOURCE_DB) -> str:
        return self.pg.dsn(database)

    @property
    def port(self) -> int:
        return self.pg.port

    def connect(self, database: str = SOURCE_DB) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(database), autocommit=True)

    @staticmethod
    def binary(name: str) -> Path:
        return BIN_DIR / name


@contextmanager
def throwaway_cluster() -> Iterator[Cluster]:
    """Start a fresh cluster in a temp dir; stop and delete it on exit."""
    pg = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="nilus-bench-pg-")))
    try:
        pg.start()
        with psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn:
            for database in (SOURCE_DB, STATE_DB):
                conn.execute(f"CREATE DATABASE {database}")
        yield Cluster(pg)
    finally:
        pg.destroy()


def current_lsn(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def fill(conn: psycopg.Connection[Any], table: str, first: int, last: int, transactions: int) -> int:
    """Insert ids first..last in `transactions` transactions; returns the rows inserted."""
    bounds = split(first, last, transactions)
    inserted = 0
    for low, high in bounds:
        with conn.transaction():
            inserted += conn.execute(f"INSERT INTO {table} {ROWS_SELECT}", (low, high)).rowcount
    return inserted


def split(first: int, last: int, parts: int) -> list[tuple[int, int]]:
    """`first..last` in `parts` contiguous inclusive ranges (fewer if there are fewer ids)."""
    total = last - first + 1
    parts = max(1, min(parts, total))
    size = -(-total // parts)
    return [(low, min(low + size - 1, last)) for low in range(first, last + 1, size)]
