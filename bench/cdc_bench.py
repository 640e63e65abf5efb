"""The CDC and snapshot benchmarks of issues 3 and 14, in one run on one throwaway PostgreSQL 16.

    python bench/cdc_bench.py [--rows 1000000] [--snapshot-rows 2000000] [--rounds 2] [--out DIR]

CDC: a 1M-row insert and a mixed update/delete workload through our engine into DuckDB and into
the PostgreSQL sink, each against `pg_recvlogical` (pgoutput) reading the same changes from its
own slot; events/s and the ratio (goals: >= 0.9x into DuckDB, >= 0.6x into PostgreSQL).
Snapshot: a 2M-row table through our initial snapshot into DuckDB, against one `COPY ... TO
STDOUT (FORMAT binary)` (goal >= 0.5x) and dlt's `sql_database` source with the pyarrow backend
into DuckDB (goal >= 5x). Sides rotate order across rounds; every number is printed, ratios use
medians. A missed goal triggers pyinstrument profiles of our side (skip with --no-profile, force
with --profile; skipped with a note when pyinstrument is not installed). Results go to --out as
results.json plus profiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cdcbench import cdc, snapshot  # noqa: E402
from cdcbench.common import STATE_DB, Cluster, Measurement, median_rate, ratio_line, throwaway_cluster  # noqa: E402
from cdcbench.dlt_runner import run_dlt  # noqa: E402

from nilus_dagster.state.store import StateStore  # noqa: E402

CDC_GOALS = {cdc.OURS: 0.9, cdc.OURS_PG: 0.6}  # ratio to pg_recvlogical (issue 14)
COPY_GOAL, DLT_GOAL = 0.5, 5.0
SINKS = {"duckdb": cdc.OURS, "postgres": cdc.OURS_PG}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the CDC insert (default 1M)")
    parser.add_argument("--snapshot-rows", type=int, default=2_000_000, help="rows of the snapshot table (2M)")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per side, alternating order (2)")
    parser.add_argument("--snapshot-workers", type=int, default=2, help="our snapshot workers (default 2)")
    parser.add_argument("--skip-cdc", action="store_true", help="only the snapshot benchmark")
    parser.add_argument("--skip-snapshot", action="store_true", help="only the CDC benchmark")
    parser.add_argument("--skip-dlt", action="store_true", help="no dlt comparison (no venv needed)")
    parser.add_argument("--cdc-sinks", default="duckdb,postgres", help="our CDC sides (default duckdb,postgres)")
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--profile", action="store_true", help="profile our side even if goals are met")
    profile.add_argument("--no-profile", action="store_true", help="never profile")
    parser.add_argument("--profile-rows", type=int, default=200_000, help="CDC rows of the profiled round (200k)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a new temp dir)")
    return parser.parse_args()


def cdc_benchmark(cluster: Cluster, store: StateStore, args: argparse.Namespace, work: Path) -> list[Measurement]:
    print(f"\n== CDC: {args.rows:,}-row insert, then updates of {args.rows // 2:,} + deletes of {args.rows // 5:,}")
    cdc.prepare_source(cluster)
    workload = cdc.Workload(args.rows)
    measurements: list[Measurement] = []
    sides = (*our_cdc_sides(args), cdc.RECVLOGICAL)
    for round_no, order in enumerate(cdc.orders(args.rounds, sides), start=1):
        measurements += cdc.run_round(cluster, store, workload, round_no, order, work)
    return measurements


def our_cdc_sides(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(SINKS[name.strip()] for name in args.cdc_sinks.split(",") if name.strip())


def snapshot_benchmark(cluster: Cluster, store: StateStore, args: argparse.Namespace, work: Path) -> list[Measurement]:
    rows = args.snapshot_rows
    print(f"\n== Snapshot: {rows:,} rows x 5 columns", flush=True)
    snapshot.prepare_source(cluster, rows)
    sides = ["ours", "copy"] + ([] if args.skip_dlt else ["dlt"])
    measurements: list[Measurement] = []
    for round_no in range(1, args.rounds + 1):
        shift = (round_no - 1) % len(sides)
        for side in sides[shift:] + sides[:shift]:
            if side == "ours":
                measured = snapshot.run_ours(cluster, store, rows, round_no, work, args.snapshot_workers)
            elif side == "copy":
                measured = snapshot.run_copy(cluster, rows)
            else:
                measured = run_dlt(cluster, snapshot.TABLE.split(".")[1], rows)
            print(f"  round {round_no}:{measured.line()[1:]}", flush=True)
            measurements.append(measured)
    return measurements


def verdicts(measurements: list[Measurement]) -> tuple[list[str], dict[str, bool]]:
    lines, met = ["\n== Ratios (medians of the rounds)"], {}
    for side, goal in CDC_GOALS.items():
        for phase in ("insert", "mixed"):
            ours, theirs = median_rate(measurements, side, phase), median_rate(measurements, cdc.RECVLOGICAL, phase)
            if ours and theirs:
                line, met[f"cdc-{side}-{phase}"] = ratio_line(
                    f"CDC {phase} ({side})", ours, theirs, goal, against="pg_recvlogical"
                )
                lines.append(line)
    ours = median_rate(measurements, snapshot.OURS)
    for side, goal, key in ((snapshot.COPY, COPY_GOAL, "snapshot-copy"), (snapshot.DLT, DLT_GOAL, "snapshot-dlt")):
        theirs = median_rate(measurements, side)
        if ours and theirs:
            line, met[key] = ratio_line(f"snapshot vs {side}", ours, theirs, goal, against=side)
            lines.append(line)
    return lines, met


def profile_ours(
    cluster: Cluster, store: StateStore, args: argparse.Namespace, work: Path, missed: set[str]
) -> list[str]:
    """Extra runs of our side under pyinstrument (not part of the numbers above). Imported here:
    a venv without pyinstrument runs the benchmark, without profiles."""
    try:
        from cdcbench.profiling import profiled
    except ModuleNotFoundError as error:
        print(f"\n== No profiles: {error.name} is not installed (pip install pyinstrument; a bench tool)")
        return []
    summaries: list[str] = []
    profiles = work.parent / "profiles" if args.out is None else args.out / "profiles"
    if any(m.startswith("cdc") for m in missed):
        print("\n== Profiling our CDC (one more round, ours only; pyinstrument slows it down)", flush=True)
        cdc.run_round(
            cluster, store, cdc.Workload(min(args.rows, args.profile_rows)), 99, our_cdc_sides(args), work,
            profile=lambda phase: profiled(profiles, f"cdc-{phase}", summaries),
        )  # fmt: skip
    if any(m.startswith("snapshot") for m in missed):
        print("\n== Profiling our snapshot (main thread = DuckDB writer) and the reader alone", flush=True)
        rows = args.snapshot_rows
        with profiled(profiles, "snapshot-main-thread", summaries):
            measured = snapshot.run_ours(cluster, store, rows, 99, work, args.snapshot_workers)
        print(f" {measured.line()}  [profiled]")
        measured = snapshot.run_reader_only(cluster, rows)
        print(f" {measured.line()}")
        with profiled(profiles, "snapshot-reader", summaries):
            snapshot.run_reader_only(cluster, rows)
    print(f"  profiles saved in {profiles}")
    return summaries


def main() -> int:
    args = parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="nilus-cdc-bench-"))
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    measurements: list[Measurement] = []
    with throwaway_cluster() as cluster, StateStore(cluster.dsn(STATE_DB)).open() as store:
        print(f"PostgreSQL 16 on 127.0.0.1:{cluster.port} (throwaway); results in {out}")
        if not args.skip_cdc:
            measurements += cdc_benchmark(cluster, store, args, work)
        if not args.skip_snapshot:
            measurements += snapshot_benchmark(cluster, store, args, work)
        lines, met = verdicts(measurements)
        print("\n".join(lines))
        missed = {key for key, ok in met.items() if not ok}
        if args.profile:
            missed = set(met) or {"cdc", "snapshot"}
        summaries = [] if args.no_profile or not missed else profile_ours(cluster, store, args, work, missed)
    for text in summaries:
        print(f"\n{text}")
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "measurements": [m.as_json() for m in measurements],
                "goals_met": met,
                "ratios": lines[1:],
                "profiles": summaries,
            },
            indent=2,
        )  # fmt: skip
    )
    print(f"\ndone in {time.monotonic() - started:.0f} s; {out / 'results.json'}")
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
