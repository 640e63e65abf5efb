"""CDC throughput: our engine into DuckDB (and into PostgreSQL) vs `pg_recvlogical` (pgoutput)
reading the same changes.

Each round truncates the table, lets a fresh pipeline per sink create its slot (snapshot of the
empty table) and creates a slot for `pg_recvlogical` right after, then for each phase (insert,
mixed) writes the changes once and lets every reader consume them from its own slot, in the
round's order. Rounds rotate the order.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import psycopg

from cdcbench.common import COLUMNS_DDL, SOURCE_DB, Cluster, Measurement, Timer, current_lsn, fill, split
from cdcbench.timed_sink import TimedSink
from nilus_dagster.cdc.pipeline import CdcPipelineConfig, CdcTableConfig, run_cdc_pipeline
from nilus_dagster.schema import TableName
from nilus_dagster.sinks.base import SinkTable
from nilus_dagster.sinks.duckdb import DuckDBSink
from nilus_dagster.sinks.postgres import PostgresSink
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

TABLE = "public.cdc_events"
PUBLICATION = "bench_cdc_pub"
TARGET = SinkTable("bench", "cdc_events")
OURS, OURS_PG, RECVLOGICAL = "nilus-cdc", "nilus-cdc-pg", "pg_recvlogical"
SINK_DB = "sink"  # the PostgreSQL sink's database, in the same cluster

Profile = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Workload:
    """1 insert phase and 1 mixed phase (updates of rows/2, deletes of rows/5) over ids 1..rows."""

    rows: int
    insert_transactions: int = 4
    update_transactions: int = 5
    delete_transactions: int = 2

    def insert(self, conn: psycopg.Connection[Any]) -> int:
        return fill(conn, TABLE, 1, self.rows, self.insert_transactions)

    def mixed(self, conn: psycopg.Connection[Any]) -> int:
        events = 0
        for low, high in split(1, self.rows // 2, self.update_transactions):
            with conn.transaction():
                events += conn.execute(
                    f"UPDATE {TABLE} SET qty = qty + 1, amount = amount + 0.5 WHERE id BETWEEN %s AND %s", (low, high)
                ).rowcount
        for low, high in split(self.rows - self.rows // 5 + 1, self.rows, self.delete_transactions):
            with conn.transaction():
                events += conn.execute(f"DELETE FROM {TABLE} WHERE id BETWEEN %s AND %s", (low, high)).rowcount
        return events

    @property
    def remaining_rows(self) -> int:
        return self.rows - self.rows // 5


def prepare_source(cluster: Cluster) -> None:
    with cluster.connect() as conn:
        conn.execute(f"CREATE TABLE {TABLE} ({COLUMNS_DDL})")
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
    with cluster.connect("postgres") as conn:
        conn.execute(f"CREATE DATABASE {SINK_DB}")


def pipeline_config(cluster: Cluster, name: str) -> CdcPipelineConfig:
    return CdcPipelineConfig(
        key=PipelineKey("bench", name, f"nilus:v1:{name}:bench"),
        source_connection="bench",
        source_dsn=cluster.dsn(),
        tables=(CdcTableConfig(TableName.parse(TABLE), TARGET),),
        publication_name=PUBLICATION,
    )


def run_ours(
    side: str, config: CdcPipelineConfig, sink: Any, store: StateStore, phase: str, expected: int, run_id: str
) -> Measurement:
    timed, cpu_start = TimedSink(sink), time.process_time()
    with Timer() as timer:
        result = run_cdc_pipeline(config, timed, store, run_id=run_id, stop_at_caught_up=True)  # type: ignore[arg-type]
    cpu = time.process_time() - cpu_start
    stats = result.stats
    if stats.events_total != expected:
        raise AssertionError(f"our CDC applied {stats.events_total} events in {phase}, expected {expected}")
    note = f"{stats.batches} batches; in sink {timed.total:.1f}s; process CPU {cpu:.1f}s"
    return Measurement(side, phase, timer.seconds, stats.events_total, note)


def run_recvlogical(cluster: Cluster, slot: str, end_lsn: str, phase: str, events: int) -> Measurement:
    command = [
        str(cluster.binary("pg_recvlogical")),
        "-d", f"host=127.0.0.1 port={cluster.port} user=postgres dbname={SOURCE_DB}",
        f"--slot={slot}", "--plugin=pgoutput", "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
        "--start", f"--endpos={end_lsn}", "--no-loop", "-f", "/dev/null",
    ]  # fmt: skip
    with Timer() as timer:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({done.returncode}): {done.stderr.strip()}")
    return Measurement(RECVLOGICAL, phase, timer.seconds, events, "same slot position")


def run_round(
    cluster: Cluster,
    store: StateStore,
    workload: Workload,
    round_no: int,
    order: tuple[str, ...],
    workdir: Path,
    profile: Profile | None = None,
) -> list[Measurement]:
    """One round: fresh slots, then each phase written once and read by each side in `order`.

    With `profile`, each phase of our sides runs inside `profile(phase)` (e.g. pyinstrument).
    """
    duckdb_path = workdir / f"cdc{round_no}.duckdb"
    ours = {
        side: (pipeline_config(cluster, f"{name}{round_no}"), sink)
        for side, name, sink in (
            (OURS, "cdc", DuckDBSink(duckdb_path)),
            (OURS_PG, "cdcpg", PostgresSink(cluster.dsn(SINK_DB))),
        )
        if side in order
    }
    recv_slot = f"bench_recv_{round_no}"
    measurements: list[Measurement] = []
    with cluster.connect() as conn, cluster.connect(SINK_DB) as sink_conn:
        conn.execute(f"TRUNCATE {TABLE}")
        sink_conn.execute(f"DROP TABLE IF EXISTS {TARGET.qualified}")
        for side, (config, sink) in ours.items():  # creates our slots
            run_cdc_pipeline(config, sink, store, run_id=f"{side}-{round_no}-setup", stop_at_caught_up=True)
        if RECVLOGICAL in order:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (recv_slot,))
        try:
            for phase, write in (("insert", workload.insert), ("mixed", workload.mixed)):
                events = write(conn)
                end_lsn = current_lsn(conn)
                for side in order:
                    if side in ours:
                        config, sink = ours[side]
                        with profile(f"{side}-{phase}") if profile else nullcontext():
                            measured = run_ours(side, config, sink, store, phase, events, f"{side}-{round_no}-{phase}")
                    else:
                        measured = run_recvlogical(cluster, recv_slot, end_lsn, phase, events)
                    print(f"  round {round_no}:{measured.line()[1:]}", flush=True)
                    measurements.append(measured)
            if OURS in ours:
                check_sink(duckdb_path, workload.remaining_rows)
            if OURS_PG in ours:
                check_count(sink_conn.execute(f"SELECT count(*) FROM {TARGET.qualified}").fetchone(), workload)
        finally:
            for slot in [config.slot(SOURCE_DB) for config, _ in ours.values()] + [recv_slot]:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                )
            for _, sink in ours.values():
                sink.close()
    duckdb_path.unlink(missing_ok=True)
    return measurements


def check_sink(path: Path, expected_rows: int) -> None:
    """The DuckDB table holds exactly the rows left in the source (hard deletes)."""
    with duckdb.connect(str(path), read_only=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TARGET.qualified}").fetchone()
    if row is None or row[0] != expected_rows:
        raise AssertionError(f"DuckDB holds {row} rows after the CDC round, expected {expected_rows}")


def check_count(row: tuple[Any, ...] | None, workload: Workload) -> None:
    if row is None or row[0] != workload.remaining_rows:
        expected = workload.remaining_rows
        raise AssertionError(f"the PostgreSQL sink holds {row} rows after the CDC round, expected {expected}")


def orders(rounds: int, sides: tuple[str, ...] = (OURS, RECVLOGICAL)) -> list[tuple[str, ...]]:
    """Rotate who goes first from round to round."""
    return [sides[i % len(sides) :] + sides[: i % len(sides)] for i in range(rounds)]
