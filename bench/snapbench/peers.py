"""The reference and the peers of the snapshot benchmark, each timed the same way as ours.

- `copy_drain`: one `COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)` drained by psycopg into
  nothing: the 1.0 reference.
- `copy_pipe`: that COPY piped into `COPY ... FROM STDIN (FORMAT binary)` of an empty copy of the
  table in another database: the PostgreSQL sink's reference.
- `duckdb_extension`: DuckDB's own postgres extension, `CREATE TABLE AS SELECT * FROM` an
  `ATTACH ... (TYPE postgres)`; DuckDB 1.5.5 with the extension from the
  `duckdb-extension-postgres-scanner` wheel, loaded by path.
- `sling`: Sling's CLI (from the `sling-linux-amd64` wheel) into a DuckDB file.

Peers live in venvs of their own under `~/.cache/nilus-dagster/` (`bench/peer_venvs.py`), never in the
project's dependencies; each prints one JSON line with its own timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from peer_venvs import peer_python

EXTENSION_REQUIREMENTS = ["duckdb==1.5.5", "duckdb-extension-postgres-scanner==1.5.5"]
# The `sling` wheel downloads its binary on first use; this one ships it (for linux/amd64).
# Sling drives the DuckDB CLI (DUCKDB_PATH), which loads the json and httpfs extensions from ~/.duckdb.
SLING_REQUIREMENTS = [
    "sling-linux-amd64", "duckdb-cli==1.5.5", "duckdb-extension-json==1.5.5", "duckdb-extension-httpfs==1.5.5",
]

_EXTENSION_SCRIPT = """
import glob, json, sys, time
import duckdb, duckdb_extension_postgres_scanner as ext
libpq, table, path = sys.argv[1:4]
(extension,) = glob.glob(ext.__path__[0] + "/extensions/*/postgres_scanner.duckdb_extension")
conn = duckdb.connect(path, config={"allow_unsigned_extensions": True})
conn.execute("SET enable_progress_bar = false")
conn.execute(f"LOAD '{extension}'")
started = time.perf_counter()
conn.execute(f"ATTACH '{libpq}' AS pg (TYPE postgres, READ_ONLY)")
conn.execute(f"CREATE TABLE {table} AS SELECT * FROM pg.public.{table}")
conn.close()
seconds = time.perf_counter() - started
rows = duckdb.connect(path, read_only=True).execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
print(json.dumps({"seconds": seconds, "rows": rows, "duckdb": duckdb.__version__}))
"""


def _json_run(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def copy_drain(dsn: str, table: str) -> tuple[float, int]:
    """Seconds and bytes of one binary COPY drained into nothing."""
    received = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        with conn.cursor().copy(f"COPY (SELECT * FROM public.{table}) TO STDOUT (FORMAT binary)") as copy:
            for data in copy:
                received += len(data)
        return time.perf_counter() - started, received


def copy_pipe(source_dsn: str, sink_dsn: str, table: str) -> float:
    """Seconds of a binary COPY out of the source piped into a binary COPY into the sink."""
    with psycopg.connect(sink_dsn, autocommit=True) as sink:
        sink.execute(f"DROP TABLE IF EXISTS public.{table}_pipe")
        with psycopg.connect(source_dsn) as source:
            ddl = source.execute(
                "SELECT string_agg(format('%%I %%s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum) "
                "FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
                (f"public.{table}",),
            ).fetchall()[0][0]
        sink.execute(f"CREATE TABLE public.{table}_pipe ({ddl})")
        with psycopg.connect(source_dsn, autocommit=True) as source:
            started = time.perf_counter()
            into_query = f"COPY public.{table}_pipe FROM STDIN (FORMAT binary)"
            out_query = f"COPY public.{table} TO STDOUT (FORMAT binary)"
            with sink.transaction(), sink.cursor().copy(into_query) as into, source.cursor().copy(out_query) as out:
                for data in out:
                    into.write(data)
            seconds = time.perf_counter() - started
        sink.execute(f"DROP TABLE public.{table}_pipe")
    return seconds


def duckdb_extension(port: int, database: str, table: str) -> dict[str, Any]:
    python = peer_python("bench-duckdb-postgres-ext", EXTENSION_REQUIREMENTS)
    libpq = f"host=127.0.0.1 port={port} user=postgres dbname={database}"
    with tempfile.TemporaryDirectory(prefix="nilus-bench-ext-") as tmp:
        return _json_run([str(python), "-c", _EXTENSION_SCRIPT, libpq, table, str(Path(tmp) / "ext.duckdb")])


def sling(port: int, database: str, table: str) -> dict[str, Any]:
    """Sling's `run` (full refresh) into a DuckDB file, timed around the CLI process."""
    python = peer_python("bench-sling", SLING_REQUIREMENTS)
    with tempfile.TemporaryDirectory(prefix="nilus-bench-sling-") as tmp:
        path = Path(tmp) / "sling.duckdb"
        site = next(python.parent.parent.glob("lib/python*/site-packages"))
        extensions = Path(tmp) / ".duckdb" / "extensions" / "v1.5.5" / "linux_amd64"
        extensions.mkdir(parents=True)
        for extension in site.glob("duckdb_extension_*/extensions/v1.5.5/*.duckdb_extension"):
            shutil.copy(extension, extensions)
        env = {
            **os.environ,
            "SLING_HOME_DIR": tmp,
            "SLING_DISABLE_TELEMETRY": "true",
            "PG_SRC": f"postgresql://postgres@127.0.0.1:{port}/{database}?sslmode=disable",
            "DUCK_TGT": f"duckdb://{path}",
            "DUCKDB_PATH": str(site / "duckdb_cli" / "duckdb"),
            "HOME": tmp,
        }
        (cli,) = python.parent.parent.glob("lib/python*/site-packages/sling_linux_amd64/bin/sling-linux-amd64")
        started = time.perf_counter()
        done = subprocess.run(
            [str(cli), "run", "--src-conn", "PG_SRC", "--src-stream", f"public.{table}", "--tgt-conn", "DUCK_TGT",
             "--tgt-object", f"main.{table}", "--mode", "full-refresh"],
            capture_output=True, text=True, timeout=3600, env=env,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"sling failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")
        counter = peer_python("bench-duckdb-postgres-ext", EXTENSION_REQUIREMENTS)
        count = _json_run([str(counter), "-c", _COUNT_SCRIPT, str(path), table])
    return {"seconds": seconds, "rows": count["rows"]}


_COUNT_SCRIPT = """
import json, sys, duckdb
print(json.dumps({"rows": duckdb.connect(sys.argv[1], read_only=True).execute(
    f"SELECT count(*) FROM main.{sys.argv[2]}").fetchall()[0][0]}))
"""
