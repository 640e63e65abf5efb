"""`nilus-demo`: embedded PostgreSQL + seeded shop + `dagster dev` with the sample pipelines.

State lives under one folder (default `.nilus/`, or NILUS_HOME), so a second start reuses the
database, the warehouse and Dagster's run history. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from nilus_dagster.demo.shop import add_activity, seed_shop
from nilus_dagster.embedded.postgres import EmbeddedPostgres

DEMO_DATABASES = ("shop", "nilus_state")


def _ensure_databases(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in DEMO_DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def prepare_environment(home: Path, pg_port: int) -> tuple[dict[str, str], EmbeddedPostgres | None]:
    """Start what is missing and return the environment the pipelines need."""
    env = dict(os.environ)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    env["DAGSTER_HOME"] = str(dagster_home)
    cluster = None
    if "SHOP_DSN" not in env:
        cluster = EmbeddedPostgres(home / "postgres", port=pg_port).start()
        _ensure_databases(cluster.dsn())
        env["SHOP_DSN"] = cluster.dsn("shop")
        env.setdefault("NILUS_STATE_DSN", cluster.dsn("nilus_state"))
        print(f"nilus-demo: embedded PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.pgdata})")
    if "NILUS_STATE_DSN" not in env:
        env["NILUS_STATE_DSN"] = env["SHOP_DSN"]
    seed_shop(env["SHOP_DSN"])
    return env, cluster


def materialize_all(env: dict[str, str]) -> int:
    """Run every sample pipeline's job once in the demo's Dagster instance; 0 when all succeed."""
    os.environ.update(env)
    import dagster as dg

    sys.path.insert(0, str(Path.cwd()))
    from definitions import defs  # the project's definitions.py

    failed = 0
    with dg.DagsterInstance.get() as instance:
        for job in defs.resolve_all_job_defs():
            if job.name.startswith("__"):
                continue
            result = job.execute_in_process(instance=instance, raise_on_error=False)
            print(f"nilus-demo: {job.name}: {'ok' if result.success else 'FAILED'} (run {result.run_id})")
            failed += 0 if result.success else 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nilus-demo", description=__doc__)
    parser.add_argument("--home", default=os.environ.get("NILUS_HOME", ".nilus"), help="state folder")
    parser.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("NILUS_DEMO_PG_PORT", "54329")))
    parser.add_argument("--once", action="store_true", help="materialize every sample pipeline once and exit (no UI)")
    parser.add_argument("--activity", action="store_true", help="add new and changed source rows, then exit")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    env, cluster = prepare_environment(home, args.pg_port)
    try:
        if args.activity:
            add_activity(env["SHOP_DSN"])
            return 0
        if args.once:
            return materialize_all(env)
        command = ["dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(args.port)]
        print(f"nilus-demo: Dagster UI at http://127.0.0.1:{args.port} (Ctrl-C stops everything)")
        process = subprocess.Popen(command, env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            return process.wait(timeout=60)
    finally:
        if cluster is not None:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
