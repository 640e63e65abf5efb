"""Delete finished Dagster runs older than N days (Dagster purges ticks, never runs).

    DAGSTER_HOME=... python deploy/retention.py --older-than-days 30 [--dry-run]

Run it daily (cron, or the CronJob in deploy/k8s/run-retention.yaml). Only finished runs are
deleted (a long-lived CDC run is never touched); their event logs go with them.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

import dagster as dg

FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def purge_old_runs(
    instance: dg.DagsterInstance, older_than: timedelta, *, batch: int = 500, dry_run: bool = False
) -> int:
    """Delete finished runs created before now - `older_than`, oldest first; the number deleted."""
    cutoff = datetime.now(UTC) - older_than
    runs_filter = dg.RunsFilter(statuses=FINISHED, created_before=cutoff)
    deleted = 0
    cursor = None
    while True:
        records = instance.get_run_records(runs_filter, limit=batch, cursor=cursor, ascending=True)
        if not records:
            return deleted
        for record in records:
            if not dry_run:
                instance.delete_run(record.dagster_run.run_id)
            deleted += 1
        if dry_run:  # nothing was removed: page on instead of re-reading the same batch
            cursor = records[-1].dagster_run.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retention", description=__doc__)
    parser.add_argument("--older-than-days", type=float, required=True)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        count = purge_old_runs(instance, timedelta(days=args.older_than_days), batch=args.batch, dry_run=args.dry_run)
    print(f"retention: {'would delete' if args.dry_run else 'deleted'} {count} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
