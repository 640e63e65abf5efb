"""Steady churn for a while: memory, retained WAL and lag over time, all flat (issue 12, soak).

    python bench/soak.py [--minutes 30] [--rate 50] [--sample-s 10]

On a throwaway PostgreSQL 16 a CDC run (its own process) streams `public.big_tx` into DuckDB
while a writer commits `--rate` small transactions a second (inserts, updates, deletes). Every
`--sample-s` this prints the run's resident memory, the WAL the slot retains, its unconfirmed WAL
and the lag the run reports. At the end the writer stops, the run catches up and stops, the sink
is compared with the source row by row, and the first and second halves of the samples are
compared: memory and retained WAL must not keep growing (second-half peak within 1.5x the
first's, plus slack), the lag must stay bounded.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdcbench.common import COLUMNS_DDL, ROWS_SELECT, STATE_DB, throwaway_cluster  # noqa: E402
from cdcbench.live import LiveChild  # noqa: E402
from large_transaction import TABLE, compare  # noqa: E402

SEED_ROWS = 10_000
SLOT_SQL = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots")


def churn(conn, rate: float, stop: threading.Event) -> int:  # noqa: ANN001 - a psycopg connection
    """Small transactions at `rate` a second until stopped; returns the next unused id."""
    next_id, started, done = SEED_ROWS + 1, time.perf_counter(), 0
    while not stop.is_set():
        with conn.transaction():
            conn.execute(f"INSERT INTO {TABLE} {ROWS_SELECT}", (next_id, next_id + 4))
            conn.execute(f"UPDATE {TABLE} SET qty = qty + 1 WHERE id IN (%s, %s, %s)",
                         (next_id % SEED_ROWS + 1, (next_id * 7) % next_id + 1, next_id - 3))
            conn.execute(f"DELETE FROM {TABLE} WHERE id = %s", ((next_id * 13) % next_id + 1,))
        next_id, done = next_id + 5, done + 1
        if (ahead := done / rate - (time.perf_counter() - started)) > 0:
            time.sleep(ahead)
    return next_id


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def flat(values: list[float], slack: float) -> bool:
    half = len(values) // 2
    return half == 0 or max(values[half:]) <= 1.5 * max(values[:half]) + slack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=50, help="transactions a second")
    parser.add_argument("--sample-s", type=float, default=10)
    args = parser.parse_args()
    with throwaway_cluster() as cluster:
        with cluster.connect() as conn:
            conn.execute(f"CREATE TABLE {TABLE} ({COLUMNS_DDL})")
            conn.execute(f"INSERT INTO {TABLE} {ROWS_SELECT}", (1, SEED_ROWS))
        duckdb_path = cluster.pg.data_dir / "soak.duckdb"
        run = LiveChild.start(cluster.dsn(), cluster.dsn(STATE_DB), duckdb_path, caught_up=False)
        latest: dict = {}
        reader = threading.Thread(target=lambda: [latest.update(line) for line in run.lines()], daemon=True)
        reader.start()
        while latest.get("phase") != "streaming":
            time.sleep(0.2)
        stop = threading.Event()
        writer_conn = cluster.connect()
        writer = threading.Thread(target=churn, args=(writer_conn, args.rate, stop), daemon=True)
        writer.start()
        samples: list[tuple[float, float, float, float]] = []
        started = time.monotonic()
        print(f"{'t (s)':>7} {'RSS MB':>8} {'retained WAL MB':>16} {'unconfirmed MB':>15} {'lag s':>7} {'events':>10}")
        with cluster.connect() as conn:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(args.sample_s)
                retained, unconfirmed = conn.execute(SLOT_SQL).fetchone()
                sample = (rss_mb(run.process.pid), retained / 2**20, unconfirmed / 2**20, float(latest["lag_s"]))
                samples.append(sample)
                print(f"{time.monotonic() - started:>7.0f} {sample[0]:>8.1f} {sample[1]:>16.1f} {sample[2]:>15.1f} "
                      f"{sample[3]:>7.1f} {latest['events']:>10,}", flush=True)
            stop.set()
            writer.join()
            writer_conn.close()
            end_lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            while conn.execute("SELECT confirmed_flush_lsn < %s FROM pg_replication_slots", (end_lsn,)).fetchone()[0]:
                time.sleep(0.5)  # the run catches up with the last change
        run.stop()
        reader.join(timeout=60)
        compared = compare_all(cluster, duckdb_path)
        memory, wal, lag = ([s[i] for s in samples] for i in (0, 1, 3))
        verdicts = {"memory": flat(memory, 20.0), "retained WAL": flat(wal, 16.0), "lag": max(lag, default=0) < 60}
        print(f"{len(samples)} samples; {compared:,} rows equal; " +
              ", ".join(f"{name} {'flat' if ok else 'GROWING'}" for name, ok in verdicts.items()))
        sys.exit(0 if all(verdicts.values()) else 1)


def compare_all(cluster, duckdb_path: Path) -> int:  # noqa: ANN001 - the bench cluster
    """Row by row over every id (the churn deletes rows: ids are sparse)."""
    with cluster.connect() as conn:
        count, max_id = conn.execute(f"SELECT count(*), max(id) FROM {TABLE}").fetchone()
    return compare(cluster, str(duckdb_path), count, max_id)


if __name__ == "__main__":
    main()
