"""Load-test the monitoring API on PostgreSQL run storage: 100k runs, 50 pipelines, 5 tenants.

    python bench/api_bench.py [--runs 100000] [--requests 400] [--concurrency 1,4] [--pg-dsn DSN]
                              [--cache-dir DIR] [--only SUBSTRING]

Fills a fresh Dagster PostgreSQL storage (bulk insert of serialized runs and their tags; the
same rows Dagster writes), a state store with CDC offsets, a defs folder declaring the 50
pipelines; starts the real `nilus-api` process; drives it with an asyncio httpx load generator
and prints p50/p99 per endpoint and concurrency. Goals: p99 < 50 ms for lists, < 100 ms for stats.

With `--cache-dir DIR` (embedded cluster only) the cluster, the filled databases and the defs
folder are kept in DIR and reused by the next run with the same `--runs`: the fill (a few
minutes) happens once; on reuse the runs' timestamps are shifted so that the newest run is as
recent as right after a fill (the 24h/7d/30d windows see the same runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._serdes import serialize_value

from nilus_dagster.components.tags import PIPELINE_TAG, RESOURCE_ID_TAG, RUN_AS_USER_TAG, TENANT_TAG
from nilus_dagster.embedded.postgres import EmbeddedPostgres, free_port
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

TENANTS = [f"tenant{i}" for i in range(5)]
PER_TENANT = 10
BASE = "/nilus-manager/api/v1"
TOKEN = "bench-admin-token"
STATUSES = [DagsterRunStatus.SUCCESS] * 8 + [DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]


def pipelines() -> list[tuple[str, str, str]]:
    return [(t, f"p{i:02d}", f"nilus:v1:p{i:02d}:{t}") for t in TENANTS for i in range(PER_TENANT)]


def write_defs(directory: Path) -> None:
    lines = [
        "type: nilus_dagster.components.NilusPipelines",
        "attributes:",
        "  connections:",
        "    src: {type: postgres, dsn_env: SRC_DSN}",
        "    wh: {type: duckdb, path: wh.duckdb}",
        "  pipelines:",
    ]
    for tenant, name, _ in pipelines():
        lines += [
            f"    - {{name: {name}, tenant: {tenant}, run_as_user: user{name[-1]},",
            f"       source: {{connection: src, tables: [s.{name}]}},",
            f"       sink: {{connection: wh, dataset: {tenant}, strategy: append}}}}",
        ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "defs.yaml").write_text("\n".join(lines) + "\n")


def fill_runs(instance: DagsterInstance, total: int) -> None:
    """`total` runs over the last 60 days, round-robin over the pipelines, oldest first."""
    rng = random.Random(7)
    now = datetime.now(UTC)
    specs = pipelines()
    storage = instance.run_storage
    batch_runs, batch_tags = [], []
    for n in range(total):
        tenant, name, rid = specs[n % len(specs)]
        created = now - timedelta(days=60) * (1 - n / total)
        status = rng.choice(STATUSES) if n < total - len(specs) else DagsterRunStatus.SUCCESS
        tags = {TENANT_TAG: tenant, PIPELINE_TAG: name, RESOURCE_ID_TAG: rid, RUN_AS_USER_TAG: f"user{name[-1]}"}
        run = DagsterRun(job_name=f"{tenant}__{name}", run_id=str(uuid.uuid4()), status=status, tags=tags)
        start = created.timestamp() + 2
        batch_runs.append(
            {
                "run_id": run.run_id,
                "pipeline_name": run.job_name,
                "status": status.value,
                "run_body": serialize_value(run),
                "create_timestamp": created.replace(tzinfo=None),
                "update_timestamp": created.replace(tzinfo=None),
                "start_time": start,
                "end_time": start + rng.uniform(5, 300),
            }
        )
        batch_tags += [{"run_id": run.run_id, "key": k, "value": v} for k, v in tags.items()]
        if len(batch_runs) == 5000 or n == total - 1:
            with storage.connect() as conn:
                conn.execute(RunsTable.insert(), batch_runs)
                conn.execute(RunTagsTable.insert(), batch_tags)
            batch_runs, batch_tags = [], []
    with storage.connect() as conn:
        conn.exec_driver_sql("ANALYZE runs; ANALYZE run_tags")


def fill_state(dsn: str) -> None:
    with StateStore(dsn) as store:
        for tenant, name, rid in pipelines():
            for i in range(20):
                store.append_offset(
                    PipelineKey(tenant, name, rid),
                    connector_name="pg",
                    offset_key="slot",
                    offset_value={"lsn": f"0/{i:X}"},
                )


def write_home(home: Path, dagster_dsn: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    url = dagster_dsn.replace("postgresql://", "postgresql+psycopg2://")
    (home / "dagster.yaml").write_text(
        f"telemetry:\n  enabled: false\nstorage:\n  postgres:\n    postgres_url: {url}\n"
    )
    return home


def new_db(cluster: EmbeddedPostgres | None, base_dsn: str, name: str) -> str:
    with psycopg.connect(base_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return base_dsn.rsplit("/", 1)[0] + f"/{name}"


def shift_runs(dagster_dsn: str, filled_at: float) -> None:
    """Move every run forward by the time elapsed since the fill (a reused cache looks fresh)."""
    delta = time.time() - filled_at
    with psycopg.connect(dagster_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE runs SET create_timestamp = create_timestamp + make_interval(secs => %(d)s),"
            " update_timestamp = update_timestamp + make_interval(secs => %(d)s),"
            " start_time = start_time + %(d)s, end_time = end_time + %(d)s",
            {"d": delta},
        )
        conn.execute("VACUUM ANALYZE runs")


def endpoints(rng: random.Random) -> dict[str, callable]:
    specs = pipelines()

    def pick():
        return rng.choice(specs)

    return {
        "pipelines list": lambda: (lambda t: f"{BASE}/tenants/{t}/pipelines")(pick()[0]),
        "pipelines filtered": lambda: f"{BASE}/tenants/{pick()[0]}/pipelines?is_success=true&limit=5",
        "runs list": lambda: (lambda p: f"{BASE}/tenants/{p[0]}/pipelines/{p[2]}/runs?limit=50")(pick()),
        "runs deep page": lambda: (
            lambda p: f"{BASE}/tenants/{p[0]}/pipelines/{p[2]}/runs?limit=50&offset={rng.randrange(0, 1900)}"
        )(pick()),
        "stats 24h": lambda: (lambda p: f"{BASE}/tenants/{p[0]}/pipelines/{p[2]}/stats?period=24h")(pick()),
        "stats 7d": lambda: (lambda p: f"{BASE}/tenants/{p[0]}/pipelines/{p[2]}/stats?period=7d")(pick()),
        "stats 30d": lambda: (lambda p: f"{BASE}/tenants/{p[0]}/pipelines/{p[2]}/stats?period=30d")(pick()),
        "cdc offset-storage": lambda: f"{BASE}/tenants/{pick()[0]}/cdc/offset-storage?limit=50",
    }


async def drive(url: str, make_path, requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:

        async def warm(count: int) -> None:
            for _ in range(count):
                (await client.get(make_path())).raise_for_status()

        # Warm-up at the measured concurrency: connection pools reach their steady size first.
        await asyncio.gather(*(warm(5) for _ in range(max(2, concurrency))))

        async def worker(count: int) -> None:
            for _ in range(count):
                path = make_path()
                start = time.perf_counter()
                response = await client.get(path)
                latencies.append((time.perf_counter() - start) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{path}: {response.status_code} {response.text[:200]}")

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=400, help="per endpoint")
    parser.add_argument(
        "--concurrency", default="1,4", help="comma-separated concurrencies, each measured in turn (default 1,4)"
    )
    parser.add_argument("--pg-dsn", help="an existing PostgreSQL (superuser) DSN; default: an embedded cluster")
    parser.add_argument("--cache-dir", help="keep the embedded cluster and filled storage here and reuse it")
    parser.add_argument("--only", help="measure only endpoints whose name contains this")
    args = parser.parse_args()

    cache = Path(args.cache_dir).resolve() if args.cache_dir else None
    if cache is not None and args.pg_dsn:
        raise SystemExit("--cache-dir keeps an embedded cluster; it cannot be used with --pg-dsn")
    work = cache or Path(tempfile.mkdtemp(prefix="nilus-api-bench-"))
    marker = work / f"filled-{args.runs}.json"
    cluster = None
    if args.pg_dsn:
        base = args.pg_dsn
    else:
        work.mkdir(parents=True, exist_ok=True)
        cluster = EmbeddedPostgres(work / "pg").start()
        base = cluster.dsn()
    proc = None
    try:
        home = work / "dagster_home"
        if cache is not None and marker.exists():
            info = json.loads(marker.read_text())
            dagster_dsn, state_dsn = (
                info[k].replace(":PORT/", f":{cluster.port}/") for k in ("dagster_dsn", "state_dsn")
            )
            t0 = time.perf_counter()
            shift_runs(dagster_dsn, info["filled_at"])
            info["filled_at"] = time.time()
            marker.write_text(json.dumps(info))
            print(f"reused {args.runs} runs from {work} (timestamps shifted in {time.perf_counter() - t0:.1f}s)")
        else:
            suffix = uuid.uuid4().hex[:6]
            dagster_dsn = new_db(cluster, base, f"bench_dagster_{suffix}")
            state_dsn = new_db(cluster, base, f"bench_state_{suffix}")
            t0 = time.perf_counter()
            instance = DagsterInstance.from_config(str(write_home(home, dagster_dsn)))
            fill_runs(instance, args.runs)
            fill_state(state_dsn)
            instance.dispose()
            print(
                f"filled {args.runs} runs over {len(pipelines())} pipelines / {len(TENANTS)} tenants "
                f"in {time.perf_counter() - t0:.1f}s"
            )
            if cache is not None:
                port = f":{cluster.port}/"
                marker.write_text(
                    json.dumps(
                        {
                            "dagster_dsn": dagster_dsn.replace(port, ":PORT/"),
                            "state_dsn": state_dsn.replace(port, ":PORT/"),
                            "filled_at": time.time(),
                        }
                    )
                )
        write_home(home, dagster_dsn)  # the port of a reused cluster may have changed
        write_defs(work / "defs")

        port, metrics_port = free_port(), free_port()
        env = dict(
            os.environ,
            DAGSTER_HOME=str(home),
            NILUS_STATE_DSN=state_dsn,
            NILUS_DEFS_DIR=str(work / "defs"),
            NILUS_API_TOKENS=f"{TOKEN}::admin",
            NILUS_API_HOST="127.0.0.1",
            NILUS_API_PORT=str(port),
            NILUS_METRICS_HOST="127.0.0.1",
            NILUS_METRICS_PORT=str(metrics_port),
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "nilus_dagster.api.server"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        api = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{api}/nilus-manager/openapi.json", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the API did not start") from None
                time.sleep(0.2)

        rng = random.Random(1)
        print(f"\n{'endpoint':<22}{'c':>3}{'requests':>9}{'p50 ms':>9}{'p99 ms':>9}{'goal':>8}")
        for concurrency in [int(c) for c in str(args.concurrency).split(",")]:
            for name, make_path in endpoints(rng).items():
                if args.only and args.only not in name:
                    continue
                latencies = asyncio.run(drive(api, make_path, args.requests, concurrency))
                goal = 100 if name.startswith("stats") else 50
                p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
                verdict = "ok" if p99 < goal else "MISS"
                print(
                    f"{name:<22}{concurrency:>3}{len(latencies):>9}{p50:>9.1f}{p99:>9.1f}{goal:>6} {verdict}",
                    flush=True,
                )
        scrape = time.perf_counter()
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=60).raise_for_status()
        print(f"\nmetrics scrape (all pipelines, uncached): {(time.perf_counter() - scrape) * 1000:.0f} ms")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if cluster is not None:
            if cache is not None:
                cluster.stop()
            else:
                cluster.destroy()


if __name__ == "__main__":
    main()
