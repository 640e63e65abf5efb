"""Run the `local-bigquery` emulator (REST, DuckDB-backed) for tests, with nothing preinstalled.

The emulator needs Python >= 3.13, so it lives in its own venv under a cache directory
(`$NILUS_TEST_CACHE/bq-emulator`, else `~/.cache/nilus-dagster/bq-emulator`), built once with pip
from PyPI and reused while its stamp matches `REQUIREMENTS`. DuckDB extensions cannot be downloaded
here, so the venv gets them from the `duckdb-extension-*` wheels and installs them into a private
HOME inside the venv (DuckDB keeps extensions under `$HOME/.duckdb`).

    with running_emulator(tmp_dir) as emulator:
        client = emulator.client()
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

REQUIREMENTS = (
    "local-bigquery==0.3.2",
    "duckdb==1.5.5",
    "duckdb-extensions==1.5.5",
    "duckdb-extension-icu==1.5.5",
    "duckdb-extension-ducklake==1.5.5",
    "duckdb-extension-spatial==1.5.5",
)
DUCKDB_EXTENSIONS = ("icu", "ducklake", "spatial")
PROJECT = "test-project"
_PROVISION = (
    "import duckdb, duckdb_extensions, sys\n"
    "con = duckdb.connect()\n"
    "for name in sys.argv[1:]:\n"
    "    duckdb_extensions.import_extension(name, con=con)\n"
)


class EmulatorUnavailable(RuntimeError):
    """The emulator could not be installed or started; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("NILUS_TEST_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "nilus-dagster"
    return base / "bq-emulator"


def find_python313() -> str:
    """A Python >= 3.13 interpreter: $NILUS_PYTHON313, a pyenv install, or python3.13 on PATH."""
    candidates = [os.environ.get("NILUS_PYTHON313")]
    for root in (os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv"), "/root/.pyenv"):
        if root:
            candidates += sorted(glob.glob(f"{root}/versions/3.1[3-9]*/bin/python3"), reverse=True)
    candidates.append(shutil.which("python3.13"))
    for candidate in candidates:
        if candidate and _is_python313(candidate):
            return candidate
    raise EmulatorUnavailable("local-bigquery needs Python >= 3.13: set NILUS_PYTHON313 to its interpreter")


def _is_python313(candidate: str) -> bool:
    check = [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 13))"]
    try:
        return subprocess.run(check, capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


@dataclass(frozen=True)
class EmulatorEnv:
    """An installed emulator venv: its `local-bigquery` script and the HOME holding DuckDB extensions."""

    root: Path

    @property
    def executable(self) -> Path:
        return self.root / "venv" / "bin" / "local-bigquery"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def stamp(self) -> Path:
        return self.root / "ready.json"

    def is_ready(self) -> bool:
        try:
            return json.loads(self.stamp.read_text()) == list(REQUIREMENTS) and self.executable.exists()
        except (OSError, ValueError):
            return False


def ensure_emulator_env(root: Path | None = None) -> EmulatorEnv:
    """Install (once, under a file lock so parallel runs wait) and return the emulator venv."""
    env = EmulatorEnv(root or cache_dir())
    env.root.mkdir(parents=True, exist_ok=True)
    with open(env.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not env.is_ready():
            _install(env)
    return env


def _install(env: EmulatorEnv) -> None:
    venv = env.root / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    env.home.mkdir(exist_ok=True)
    python = venv / "bin" / "python"
    steps = [
        [find_python313(), "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
        [str(python), "-c", _PROVISION, *DUCKDB_EXTENSIONS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, env={**os.environ, "HOME": str(env.home)})
        if done.returncode != 0:
            raise EmulatorUnavailable(f"{' '.join(step[:4])} failed:\n{done.stderr[-3000:]}")
    env.stamp.write_text(json.dumps(list(REQUIREMENTS)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningEmulator:
    url: str
    project: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self) -> bigquery.Client:
        return bigquery.Client(
            project=self.project,
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=self.url),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_emulator(data_dir: Path, *, project: str = PROJECT, timeout: float = 60.0) -> RunningEmulator:
    """Start the emulator on a free loopback port and wait until it answers."""
    env = ensure_emulator_env()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = data_dir / "emulator.log"
    command = [str(env.executable), "serve", "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
    command += ["--data-dir", str(data_dir / "data"), "--project", project]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(env.home)}
        )
    emulator = RunningEmulator(f"http://127.0.0.1:{port}", project, process, log)
    try:
        _wait_ready(emulator, timeout)
    except BaseException:
        emulator.stop()
        raise
    return emulator


def _wait_ready(emulator: RunningEmulator, timeout: float) -> None:
    probe = f"{emulator.url}/bigquery/v2/projects/{emulator.project}/datasets"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if emulator.process.poll() is not None:
            raise EmulatorUnavailable(f"emulator exited early:\n{emulator.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(probe, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise EmulatorUnavailable(f"emulator not ready after {timeout:.0f}s:\n{emulator.log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_emulator(data_dir: Path) -> Iterator[RunningEmulator]:
    emulator = start_emulator(data_dir)
    try:
        yield emulator
    finally:
        emulator.stop()
