"""`nilus-demo`: embedded PostgreSQL + seeded shop + `dagster dev` with the sample pipelines and the
monitoring API (`nilus-api`; it prints the API's URL, a token per tenant, the DSNs and DAGSTER_HOME).

State lives under one folder (default `.nilus/`, or NILUS_HOME), so a second start reuses the
database, the warehouse and Dagster's run history. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from nilus_dagster.demo.api import api_environment, demo_tokens, start_api, summary
from nilus_dagster.demo.shop import add_activity, generate_changes, seed_shop
from nilus_dagster.embedded.postgres import EmbeddedPostgres

DEMO_DATABASES = ("shop", "nilus_state")

# The demo's Dagster instance: local storage, and (as in deploy/dagster.yaml) a run queue that
# admits one CDC run per pipeline, a second guard besides the keep-alive sensor.
DEMO_INSTANCE_CONFIG = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
concurrency:
  runs:
    tag_concurrency_limits:
      - key: nilus/cdc_pipeline
        value: {applyLimitPerUniqueValue: true}
        limit: 1
  pools:
    default_limit: 1  # "Materialize" on a CDC asset waits for the live run (deploy/dagster.yaml)
"""


def _ensure_databases(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
        for name in DEMO_DATABASES:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def demo_environment(home: Path) -> dict[str, str]:
    """The environment every demo process gets: its own DAGSTER_HOME under `home`."""
    env = dict(os.environ)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DEMO_INSTANCE_CONFIG)
    env["DAGSTER_HOME"] = str(dagster_home)
    return env


def start_embedded_postgres(home: Path, pg_port: int, env: dict[str, str]) -> EmbeddedPostgres:
    """Start (or reuse) the embedded cluster and point SHOP_DSN / NILUS_STATE_DSN at it."""
    cluster = EmbeddedPostgres(home / "postgres", port=pg_port).start()
    _ensure_databases(cluster.dsn())
    env["SHOP_DSN"] = cluster.dsn("shop")
    env.setdefault("NILUS_STATE_DSN", cluster.dsn("nilus_state"))
    print(f"nilus-demo: embedded PostgreSQL on 127.0.0.1:{cluster.port} (data in {cluster.pgdata})")
    return cluster


def materialize_all(env: dict[str, str]) -> int:
    """Run every sample pipeline once in the demo's Dagster instance (CDC until caught up)."""
    os.environ.update(env)
    import dagster as dg

    from nilus_dagster.spec.loading import load_declared_pipelines

    sys.path.insert(0, str(Path.cwd()))
    from definitions import defs  # the project's definitions.py

    failed = 0
    with dg.DagsterInstance.get() as instance:
        for declared in load_declared_pipelines(Path("pipelines")):
            pipeline = declared.pipeline
            run_config = (
                {"ops": {f"{pipeline.job_name}__cdc": {"config": {"stop_at": "caught_up"}}}}
                if pipeline.type == "cdc"
                else {}
            )
            job = defs.resolve_job_def(pipeline.job_name)
            result = job.execute_in_process(instance=instance, run_config=run_config, raise_on_error=False)
            print(f"nilus-demo: {job.name}: {'ok' if result.success else 'FAILED'} (run {result.run_id})")
            failed += 0 if result.success else 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nilus-demo", description=__doc__)
    parser.add_argument("--home", default=os.environ.get("NILUS_HOME", ".nilus"), help="state folder")
    parser.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("NILUS_DEMO_PG_PORT", "54329")))
    parser.add_argument("--api-port", type=int, default=8000, help="monitoring API port")
    parser.add_argument("--metrics-port", type=int, default=9090, help="the API's Prometheus metrics port")
    parser.add_argument("--once", action="store_true", help="materialize every sample pipeline once and exit (no UI)")
    parser.add_argument("--activity", action="store_true", help="add new and changed source rows, then exit")
    parser.add_argument(
        "--changes", action="store_true", help="keep changing source rows every second (for CDC) until Ctrl-C"
    )
    args = parser.parse_args(argv)
    # Explicit handlers: a SIGINT inherited as ignored (background shells) or a supervisor's SIGTERM
    # must still stop everything this command started.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    home = Path(args.home).resolve()
    env = demo_environment(home)
    cluster = start_embedded_postgres(home, args.pg_port, env) if "SHOP_DSN" not in env else None
    try:
        env.setdefault("NILUS_STATE_DSN", env["SHOP_DSN"])
        seed_shop(env["SHOP_DSN"])
        return _run(args, env)
    finally:
        if cluster is not None and cluster.started_here:  # another nilus-demo may still use a reused one
            cluster.stop()


def _run(args: argparse.Namespace, env: dict[str, str]) -> int:
    if args.activity:
        add_activity(env["SHOP_DSN"])
        return 0
    if args.changes:
        print("nilus-demo: changing acme.orders every second (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            generate_changes(env["SHOP_DSN"])
        return 0
    if args.once:
        return materialize_all(env)
    home = Path(args.home).resolve()
    api_env = api_environment(env, home, args.port, args.api_port, args.metrics_port)
    print(summary(api_env, demo_tokens(home, Path("pipelines"))), flush=True)
    command = ["dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(args.port)]
    print(f"nilus-demo: Dagster UI at http://127.0.0.1:{args.port} (Ctrl-C stops everything)", flush=True)
    # Own process groups: a stop reaches dagster dev and everything it started (runs too).
    process = subprocess.Popen(command, env=env, start_new_session=True)
    api = start_api(api_env)
    try:
        code: int | None = process.wait()
    except KeyboardInterrupt:
        code = None
    stopped = [_stop_group(api), _stop_group(process)]  # the API first: it reads Dagster's storage
    return code if code is not None else max(stopped)


def _stop_group(process: subprocess.Popen[bytes]) -> int:
    """SIGINT the whole group, then SIGTERM and SIGKILL whatever is left."""
    for sig, grace_s in ((signal.SIGINT, 60), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
            _wait_group_gone(process.pid, grace_s)
            return 0
        except subprocess.TimeoutExpired:
            continue
    return 1


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout_s)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
