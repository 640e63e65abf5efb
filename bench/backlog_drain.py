"""A backlog drained in bounded memory, lag falling as it goes (issue 12, backlog_drain).

    python bench/backlog_drain.py [--changes 2000000] [--txn-rows 1000]

On a throwaway PostgreSQL 16: a pipeline snapshots the empty table `public.big_tx` (its slot
exists), then stops. While nothing runs, `--changes` changes accumulate in the slot: half inserts,
half updates of those rows, in transactions of `--txn-rows` rows, written at `--rate` changes a
second (the source's pace while the pipeline was down: the lag can only fall while the drain is
faster than that). A fresh process then drains the
backlog until caught up, reporting every second; this prints those observations (lag, events,
unconfirmed WAL, the process's peak RSS), checks that the lag fell and that the sink equals the
source row by row, and prints the peak RSS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdcbench.common import COLUMNS_DDL, ROWS_SELECT, STATE_DB, throwaway_cluster  # noqa: E402
from cdcbench.live import LiveChild  # noqa: E402
from large_transaction import TABLE, compare  # noqa: E402


def accumulate(conn, rows: int, txn_rows: int, rate: float) -> float:  # noqa: ANN001 - a psycopg connection
    """`rows` inserts then `rows` updates, in transactions of `txn_rows` rows, at most `rate`
    changes a second (0: as fast as the server takes them); returns seconds."""
    started = time.perf_counter()
    statements = [(f"INSERT INTO {TABLE} {ROWS_SELECT}", low) for low in range(1, rows + 1, txn_rows)]
    statements += [(f"UPDATE {TABLE} SET qty = qty + 1, name = name || '+' WHERE id BETWEEN %s AND %s", low)
                   for low in range(1, rows + 1, txn_rows)]
    for done, (statement, low) in enumerate(statements):
        with conn.transaction():
            conn.execute(statement, (low, min(low + txn_rows - 1, rows)))
        if rate and (ahead := (done + 1) * txn_rows / rate - (time.perf_counter() - started)) > 0:
            time.sleep(ahead)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=2_000_000)
    parser.add_argument("--txn-rows", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=5000, help="changes/s while stopped (0: unthrottled)")
    args = parser.parse_args()
    rows = args.changes // 2
    with throwaway_cluster() as cluster:
        with cluster.connect() as conn:
            conn.execute(f"CREATE TABLE {TABLE} ({COLUMNS_DDL})")
        duckdb_path = cluster.pg.data_dir / "backlog.duckdb"
        list(LiveChild.start(cluster.dsn(), cluster.dsn(STATE_DB), duckdb_path, caught_up=True).lines())
        with cluster.connect() as conn:
            seconds = accumulate(conn, rows, args.txn_rows, args.rate)
            (backlog,) = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                                      "FROM pg_replication_slots").fetchone()
        print(f"backlog: {2 * rows:,} changes in {seconds:.1f} s while stopped; {int(backlog) / 2**20:.0f} MB of WAL "
              "behind the slot")
        lags, done = [], {}
        for line in LiveChild.start(cluster.dsn(), cluster.dsn(STATE_DB), duckdb_path, caught_up=True).lines():
            if "done" in line:
                done = line["done"]
                continue
            if line["phase"] == "streaming":
                lags.append(line["lag_s"])
                print(f"  t={line['t']:>6}s lag={line['lag_s']:>8.1f}s events={line['events']:>9,} "
                      f"unconfirmed_wal={(line['unconfirmed_wal'] or 0) / 2**20:>7.1f} MB rss={line['rss_mb']} MB")
        compared = compare(cluster, str(duckdb_path), rows)
        falling = len(lags) < 2 or lags[-1] < max(lags)
        print(f"drained {done['events']:,} changes in {done['seconds']} s "
              f"({done['events'] / max(done['seconds'], 0.1):,.0f}/s); peak RSS {done['peak_rss_mb']} MB; "
              f"most changes held at once {done['peak_buffered_changes']:,}")
        print(f"lag: first {lags[0] if lags else 0:.1f}s, peak {max(lags, default=0):.1f}s, last "
              f"{lags[-1] if lags else 0:.1f}s ({'falling' if falling else 'NOT falling'}); {compared:,} rows equal")
        sys.exit(0 if falling and done["events"] == 2 * rows else 1)


if __name__ == "__main__":
    main()
