"""Snapshot and batch loads side by side (issue 14), in one run on one throwaway PostgreSQL 16.

    python bench/snapshot_bench.py [--rows5 2000000] [--rows20 500000] [--rounds 1] [--skip dlt,sling]

Two tables: `snap5` (N rows x 5 columns) and `snap20` (N rows x 20 mixed columns: integers, floats,
numerics, bool, date/time types, uuid, text, jsonb, bytea, text[]). Per table and round, in
rotating order: one binary COPY drained into nothing (the 1.0 reference), DuckDB's postgres
extension (`CREATE TABLE AS` from `ATTACH ... (TYPE postgres)`), ours into DuckDB (batch
`replace`; batch `merge` of every row over a full table; CDC initial snapshot), dlt with the
connectorx backend, Sling; into PostgreSQL: ours (batch `replace`) against a binary COPY piped into
`COPY FROM STDIN`. Each of ours runs in a fresh process (its peak RSS is printed); every load ends
in a committed table whose row count is checked. Prints rates as ratios to the COPY and the goals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cdcbench.common import SOURCE_DB, STATE_DB, Cluster, throwaway_cluster  # noqa: E402
from cdcbench.dlt_runner import run_dlt  # noqa: E402
from snapbench import peers  # noqa: E402

SINK_DB = "sink"
FILL_5 = """
CREATE TABLE snap5 (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2), created_at timestamptz, qty int);
INSERT INTO snap5 SELECT g, 'customer-' || g || '-' || md5(g::text), (g % 10000000) / 100.0,
  timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', (g % 1000)::int
FROM generate_series(1::bigint, {rows}) g
"""
FILL_20 = """
CREATE TABLE snap20 (
  id bigint PRIMARY KEY, i2 smallint, i4 int, i8 bigint, f4 real, f8 double precision,
  n1 numeric(12,2), n2 numeric(18,6), flag boolean, d date, ts timestamp, tstz timestamptz, t time,
  u uuid, name text, code varchar(16), note text, doc jsonb, raw bytea, tags text[]);
INSERT INTO snap20 SELECT g, (g % 30000)::smallint, (g * 7 % 2000000000)::int, g * 1000003, (g % 977) / 7.0,
  g / 3.0, (g % 1000000) / 100.0, (g % 100000000) / 1000000.0, g % 2 = 0, date '2020-01-01' + (g % 2000)::int,
  timestamp '2024-01-01' + g * interval '1 second', timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
  time '00:00' + (g % 86400) * interval '1 second', md5(g::text)::uuid, 'name-' || g, 'c' || (g % 1000),
  CASE WHEN g % 5 = 0 THEN NULL ELSE repeat(md5(g::text), 2) END, jsonb_build_object('k', g, 'v', 'x' || g),
  decode(md5(g::text), 'hex'), ARRAY['a' || (g % 10), 'b' || (g % 7)]
FROM generate_series(1::bigint, {rows}) g
"""
COPY, EXT = "COPY binary", "duckdb pg ext"
OURS_DUCKDB = ("replace", "merge", "cdc")
GOALS: list[tuple[str, str, float]] = [  # (ours, against, at least)
    *((f"ours {side}", EXT, 1.0) for side in OURS_DUCKDB),
    *((f"ours {side}", "dlt connectorx", 3.0) for side in OURS_DUCKDB),
    *((f"ours {side}", "sling", 10.0) for side in OURS_DUCKDB),
    ("ours pg replace", "COPY pipe", 0.7),
]
RSS_GOAL_MB = 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows5", type=int, default=2_000_000, help="rows of the 5-column table (2M; 0 skips it)")
    parser.add_argument("--rows20", type=int, default=500_000, help="rows of the 20-column table (500k; 0 skips)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per side, order rotated (1)")
    parser.add_argument("--skip", default="", help="comma-separated sides to skip: ext,dlt,sling,pg,merge,cdc")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a new temp dir)")
    return parser.parse_args()


def ours(side: str, cluster: Cluster, table: str, sink: str, run_no: int) -> dict[str, Any]:
    """One of our sides in a fresh process (see snapbench/ours.py)."""
    command = [
        sys.executable,
        "-m",
        "snapbench.ours",
        side,
        cluster.dsn(),
        cluster.dsn(STATE_DB),
        table,
        sink,
        str(run_no),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"ours {side} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sides(
    cluster: Cluster, table: str, rows: int, work: Path, skip: set[str]
) -> dict[str, Callable[[int], dict[str, Any]]]:
    """Every side as `run(round) -> {"seconds", "rows", ...}`."""
    port, sink_dsn = cluster.port, cluster.dsn(SINK_DB)

    def duck(side: str) -> Callable[[int], dict[str, Any]]:
        def run(round_no: int) -> dict[str, Any]:
            path = work / f"{side}-{table}-{round_no}.duckdb"
            try:
                return ours(side, cluster, table, str(path), round_no)
            finally:
                path.unlink(missing_ok=True)

        return run

    def copy(round_no: int) -> dict[str, Any]:
        seconds, received = peers.copy_drain(cluster.dsn(), table)
        return {"seconds": seconds, "rows": rows, "note": f"{received / 1e6:.0f} MB into nothing"}

    def dlt(round_no: int) -> dict[str, Any]:
        measured = run_dlt(cluster, table, rows, backend="connectorx")
        return {"seconds": measured.seconds, "rows": rows, "note": measured.note}

    def pg_replace(round_no: int) -> dict[str, Any]:
        return ours("replace", cluster, table, sink_dsn, round_no)

    chosen: dict[str, Callable[[int], dict[str, Any]]] = {COPY: copy}
    if "ext" not in skip:
        chosen[EXT] = lambda r: peers.duckdb_extension(port, SOURCE_DB, table)
    for side in OURS_DUCKDB:
        if side not in skip:
            chosen[f"ours {side}"] = duck(side)
    if "dlt" not in skip:
        chosen["dlt connectorx"] = dlt
    if "sling" not in skip:
        chosen["sling"] = lambda r: peers.sling(port, SOURCE_DB, table)
    if "pg" not in skip:
        chosen["COPY pipe"] = lambda r: {"seconds": peers.copy_pipe(cluster.dsn(), sink_dsn, table), "rows": rows}
        chosen["ours pg replace"] = pg_replace
    return chosen


def bench_table(
    cluster: Cluster, table: str, rows: int, args: argparse.Namespace, work: Path
) -> dict[str, list[float]]:
    runs = sides(cluster, table, rows, work, set(filter(None, args.skip.split(","))))
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            try:
                result = runs[name](round_no)
            except Exception as error:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                print(f"  round {round_no}: {table:<7} {name:<16} not measured: {str(error)[-300:]}", flush=True)
                continue
            loaded = result.get("table_rows", result["rows"])
            if loaded != rows:
                raise AssertionError(f"{name} loaded {loaded} rows of {table}, expected {rows}")
            rates[name].append(rows / result["seconds"])
            extra = "".join(f"; {k} {v}" for k, v in result.items() if k in ("peak_rss_mb", "note"))
            seconds = result["seconds"]
            line = f"{table:<7} {name:<16} {seconds:7.2f} s = {rows / seconds:>10,.0f} rows/s{extra}"
            print(f"  round {round_no}: {line}", flush=True)
            if result.get("peak_rss_mb", 0) > RSS_GOAL_MB:
                print(f"    peak RSS {result['peak_rss_mb']} MB is over the {RSS_GOAL_MB} MB goal", flush=True)
    return rates


def ratios(table: str, rates: dict[str, list[float]]) -> tuple[list[str], bool]:
    median = {name: statistics.median(values) for name, values in rates.items() if values}
    lines, met = [f"\n== {table}: rate / {COPY} rate (medians)"], True
    for name, rate in median.items():
        lines.append(f"  {name:<16} {rate / median[COPY]:5.2f}x" if COPY in median else f"  {name:<16} ?")
    for side, against, goal in GOALS:
        if side in median and against in median:
            value = median[side] / median[against]
            verdict = "MET" if value >= goal else "MISSED"
            met = met and value >= goal
            lines.append(f"  {side:<16} {value:6.2f}x {against:<16} (goal >= {goal:g}x: {verdict})")
    return lines, met


def main() -> int:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="nilus-snapshot-bench-"))
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started, report, all_met = time.monotonic(), [], True
    with throwaway_cluster() as cluster:
        with cluster.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {SINK_DB}")
        print(f"PostgreSQL 16 on 127.0.0.1:{cluster.port} (throwaway); results in {out}", flush=True)
        for table, rows, fill in (("snap5", args.rows5, FILL_5), ("snap20", args.rows20, FILL_20)):
            if rows <= 0:
                continue
            with cluster.connect() as conn:
                for statement in fill.format(rows=int(rows)).split(";"):
                    conn.execute(statement)  # type: ignore[arg-type]
                conn.execute(f"VACUUM (ANALYZE) {table}")
            print(f"\n== {table}: {rows:,} rows", flush=True)
            lines, met = ratios(table, bench_table(cluster, table, rows, args, work))
            print("\n".join(lines), flush=True)
            report += lines
            all_met = all_met and met
    (out / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "report": report}, indent=2)
    )
    print(f"\ndone in {time.monotonic() - started:.0f} s; {out / 'results.json'}")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
