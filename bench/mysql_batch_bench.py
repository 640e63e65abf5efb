"""MySQL/MariaDB batch load throughput: nilus against a plain SELECT drained by the driver, and dlt.

    python bench/mysql_batch_bench.py                  # 500k rows, 2 rounds, dlt included
    python bench/mysql_batch_bench.py --rows 100000 --rounds 1 --skip-dlt   # a quick smoke run

Starts a throwaway MariaDB (tests/mariadb_server.py) and PostgreSQL (the state store), fills
`bench.rows` (id bigint PK, varchar, decimal(12,2), timestamp(6), int) from MariaDB's sequence
engine, then per round, in rotating order:

* `pymysql SELECT`: `SELECT * FROM bench.rows` drained by PyMySQL's unbuffered cursor with its
  default conversions (Python objects per value) into nothing: the driver's floor for any loader
  built on it;
* `pymysql raw`: the same with no conversions (text values), what our reader receives;
* `nilus`: `load_table` (full, replace) into a fresh DuckDB file, the whole call timed;
* `dlt pyarrow`: dlt's `sql_database(..., backend="pyarrow")` over `mysql+pymysql` into DuckDB, in
  its own venv (`~/.cache/nilus-dagster/bench-dlt-mysql`, created once; not a project dependency;
  or the interpreter NILUS_BENCH_DLT_PYTHON names).

Prints each measurement, then median ratios nilus/SELECT and nilus/dlt, and checks the DuckDB table
holds every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pymysql
import pymysql.cursors

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mariadb_server import ROOT_PASSWORD, MariaDBServer  # noqa: E402
from peer_venvs import peer_python  # noqa: E402

from nilus_dagster.batch import BatchTableLoad, load_table  # noqa: E402
from nilus_dagster.embedded.postgres import EmbeddedPostgres  # noqa: E402
from nilus_dagster.sinks.base import SinkTable, WriteStrategy  # noqa: E402
from nilus_dagster.sinks.duckdb import DuckDBSink  # noqa: E402
from nilus_dagster.sources.mysql.connection import RAW_CONVERSIONS  # noqa: E402
from nilus_dagster.spec.pipelines import SourceTable  # noqa: E402
from nilus_dagster.state.records import PipelineKey  # noqa: E402
from nilus_dagster.state.store import StateStore  # noqa: E402

DLT_REQUIREMENTS = ["dlt[duckdb,sql-database]>=1,<2", "pymysql", "pyarrow"]
DLT_SCRIPT = """
import json, sys, time
import dlt
from dlt.sources.sql_database import sql_database

url, db_path, pipelines_dir = sys.argv[1:4]
source = sql_database(credentials=url, schema="bench", table_names=["rows"], backend="pyarrow")
pipeline = dlt.pipeline(pipeline_name="bench_dlt", destination=dlt.destinations.duckdb(db_path),
                        dataset_name="bench", pipelines_dir=pipelines_dir)
start = time.perf_counter()
pipeline.run(source)
seconds = time.perf_counter() - start
with pipeline.sql_client() as client:
    rows = client.execute_sql("SELECT count(*) FROM rows")[0][0]
print(json.dumps({"seconds": seconds, "rows": rows, "dlt": dlt.__version__}))
"""


def fill(server: MariaDBServer, rows: int) -> None:
    with pymysql.connect(host="127.0.0.1", port=server.port, user="root", password=ROOT_PASSWORD,
                         autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE DATABASE bench")
        cursor.execute("CREATE TABLE bench.rows (id bigint PRIMARY KEY, name varchar(64) NOT NULL, "
                       "amount decimal(12,2), created_at timestamp(6) NULL, qty int)")
        cursor.execute(
            f"INSERT INTO bench.rows SELECT seq, concat('customer-', seq, '-', md5(seq)), (seq % 10000000) / 100, "
            f"timestamp '2024-01-01 00:00:00' + INTERVAL seq SECOND, seq % 1000 FROM bench.seq_1_to_{rows}"
        )
        cursor.execute("ANALYZE TABLE bench.rows")


def drain_select(server: MariaDBServer, raw: bool) -> tuple[float, int]:
    options = {"conv": RAW_CONVERSIONS} if raw else {}
    start = time.perf_counter()
    count = 0
    with pymysql.connect(host="127.0.0.1", port=server.port, user="root", password=ROOT_PASSWORD,
                         charset="utf8mb4", **options) as conn, conn.cursor(pymysql.cursors.SSCursor) as cursor:
        cursor.execute("SELECT * FROM bench.rows")
        while batch := cursor.fetchmany(50_000):
            count += len(batch)
    return time.perf_counter() - start, count


def nilus_load(server: MariaDBServer, state_dsn: str, out: Path, round_: int) -> tuple[float, int]:
    path = out / f"nilus-{round_}.duckdb"
    load = BatchTableLoad(
        key=PipelineKey("bench", f"mysql{round_}", f"nilus:v1:mysql{round_}:bench"),
        source_connection="src", source_dsn=server.dsn("bench"), table=SourceTable(name="bench.rows"),
        target=SinkTable("bench", "rows"), strategy=WriteStrategy.REPLACE, source_type="mysql",
    )
    start = time.perf_counter()
    with StateStore(state_dsn).open() as store:
        sink = DuckDBSink(path)
        try:
            load_table(load, sink, store)
        finally:
            sink.close()
    seconds = time.perf_counter() - start
    with duckdb.connect(str(path), read_only=True) as conn:
        count = conn.execute("SELECT count(*) FROM bench.rows").fetchone()[0]  # type: ignore[index]
    return seconds, count


def dlt_python() -> Path:
    if os.environ.get("NILUS_BENCH_DLT_PYTHON"):  # an interpreter that already has dlt and pymysql
        return Path(os.environ["NILUS_BENCH_DLT_PYTHON"])
    return peer_python("bench-dlt-mysql", DLT_REQUIREMENTS)


def dlt_load(server: MariaDBServer, out: Path, round_: int) -> tuple[float, int]:
    url = f"mysql+pymysql://root:{ROOT_PASSWORD}@127.0.0.1:{server.port}/bench"
    work = out / f"dlt-{round_}"
    work.mkdir()
    script = work / "dlt_load.py"
    script.write_text(DLT_SCRIPT)
    env = {**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false", "DLT_DATA_DIR": str(work)}
    done = subprocess.run([str(dlt_python()), str(script), url, str(work / "dlt.duckdb"), str(work / "pipelines")],
                          capture_output=True, text=True, cwd=work, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the dlt load failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["rows"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-dlt", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nilus-mysql-bench-") as tmp:
        out = Path(tmp)
        server = MariaDBServer(out / "mariadb").start()
        state = EmbeddedPostgres(out / "pg").start()
        try:
            fill(server, args.rows)
            sides = {
                "pymysql SELECT": lambda r: drain_select(server, raw=False),
                "pymysql raw": lambda r: drain_select(server, raw=True),
                "nilus": lambda r: nilus_load(server, state.dsn(), out, r),
            }
            if not args.skip_dlt:
                sides["dlt pyarrow"] = lambda r: dlt_load(server, out, r)
            rates: dict[str, list[float]] = {side: [] for side in sides}
            names = list(sides)
            for round_ in range(args.rounds):
                for side in names[round_ % len(names):] + names[: round_ % len(names)]:
                    seconds, count = sides[side](round_)
                    if count != args.rows:
                        raise AssertionError(f"{side} moved {count} rows, expected {args.rows}")
                    rates[side].append(count / seconds)
                    print(f"  round {round_ + 1}: {side:<15} {count:>10,} rows in {seconds:7.2f} s = "
                          f"{count / seconds:>10,.0f}/s", flush=True)
            median = {side: statistics.median(values) for side, values in rates.items()}
            for other in names:
                if other != "nilus":
                    print(f"nilus / {other}: {median['nilus'] / median[other]:.2f}x")
        finally:
            server.destroy()
            state.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
