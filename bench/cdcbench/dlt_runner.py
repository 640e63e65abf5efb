"""dlt's `sql_database` source (pyarrow or connectorx backend) into DuckDB, in its own cached venv
and process.

dlt is not a project dependency: the venv lives under `~/.cache/nilus-dagster/bench-dlt` and is
created on first use. The script times `pipeline.run(...)` itself and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from peer_venvs import peer_python

from cdcbench.common import SOURCE_DB, Cluster, Measurement

REQUIREMENTS = ["dlt[duckdb,sql-database]>=1,<2", "psycopg2-binary", "pyarrow", "connectorx"]
SIDE = "dlt pyarrow"

SCRIPT = """
import json, sys, time
import dlt
from dlt.sources.sql_database import sql_database

url, table, db_path, pipelines_dir, backend = sys.argv[1:6]
source = sql_database(credentials=url, schema="public", table_names=[table], backend=backend)
pipeline = dlt.pipeline(
    pipeline_name="bench_dlt", destination=dlt.destinations.duckdb(db_path), dataset_name="bench",
    pipelines_dir=pipelines_dir,
)
start = time.perf_counter()
pipeline.run(source)
seconds = time.perf_counter() - start
with pipeline.sql_client() as client:
    rows = client.execute_sql(f"SELECT count(*) FROM {table}")[0][0]
print(json.dumps({"seconds": seconds, "rows": rows, "dlt": dlt.__version__}))
"""


def run_dlt(cluster: Cluster, table: str, rows: int, backend: str = "pyarrow") -> Measurement:
    """Load `public.<table>` into a fresh DuckDB file; the time is dlt's `pipeline.run` alone."""
    interpreter = peer_python("bench-dlt", REQUIREMENTS)
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{cluster.port}/{SOURCE_DB}"
    with tempfile.TemporaryDirectory(prefix="nilus-bench-dlt-") as tmp:
        script = Path(tmp) / "dlt_load.py"
        script.write_text(SCRIPT)
        env = {**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false", "DLT_DATA_DIR": tmp}
        done = subprocess.run(
            [str(interpreter), str(script), url, table, str(Path(tmp) / "dlt.duckdb"), str(Path(tmp) / "pipelines"),
             backend],
            capture_output=True, text=True, cwd=tmp, env=env, timeout=3600,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the dlt load failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rows"] != rows:
        raise AssertionError(f"dlt loaded {result['rows']} rows, expected {rows}")
    side = SIDE if backend == "pyarrow" else f"dlt {backend}"
    return Measurement(side, "snapshot", result["seconds"], rows, f"dlt {result['dlt']}, pipeline.run only")
