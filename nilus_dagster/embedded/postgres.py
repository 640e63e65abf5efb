"""A throwaway or persistent PostgreSQL 16 cluster from the `pgserver` wheel's binaries.

We drive `initdb`/`pg_ctl` ourselves (rather than pgserver's handle counting) so the cluster has
`wal_level=logical`, listens on a loopback TCP port (Dagster's storage and replication clients
both use it) and stops exactly when its owner says so.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# pgserver's import asks platformdirs for a private runtime dir; give it one instead of a warning.
if "XDG_RUNTIME_DIR" not in os.environ:
    _runtime_dir = Path(f"/tmp/nilus-runtime-{os.getuid()}")
    _runtime_dir.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(_runtime_dir)

import pgserver  # noqa: E402
from pgserver.utils import (  # noqa: E402
    ensure_folder_permissions,
    ensure_prefix_permissions,
    ensure_user_exists,
)

BIN_DIR = Path(pgserver.__file__).parent / "pginstall" / "bin"
_SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "fsync": "off",  # throwaway/demo clusters: durability comes from the tests' own checks
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "256MB",
    "unix_socket_directories": "''",
    "listen_addresses": "'127.0.0.1'",
    "timezone": "'UTC'",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedPostgres:
    """A cluster in `data_dir` on `port`; `start()` reuses an existing data dir."""

    data_dir: Path
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # overrides of the server settings below

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self._run_as = "pgserver" if os.geteuid() == 0 else None
        self.started_here = False  # True when start() launched the server (not reused a running one)

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        user_args = {"user": self._run_as} if self._run_as else {}
        subprocess.run([str(BIN_DIR / args[0]), *args[1:]], check=True, capture_output=True, **user_args)

    def _prepare_permissions(self) -> None:
        if not self._run_as:
            return
        ensure_user_exists(self._run_as)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(BIN_DIR)
        import stat

        ensure_folder_permissions(BIN_DIR, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(BIN_DIR.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        entry = pwd.getpwnam(self._run_as)
        for path in (self.data_dir, self.pgdata):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> EmbeddedPostgres:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "-U", "postgres", "--encoding=UTF8")
        if self.is_running():
            self.port = self._running_port()
            return self
        self.port = self.port or free_port()
        settings = {**_SERVER_SETTINGS, **self.settings, "port": str(self.port)}
        (self.pgdata / "postgresql.auto.conf").write_text(
            "".join(f"{key} = {value}\n" for key, value in settings.items())
        )
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "-l", str(self.pgdata / "server.log"), "start")
        self.started_here = True
        return self

    def is_running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().split()[0]), 0)
        except (ProcessLookupError, ValueError):
            return False
        return True

    def _running_port(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])

    def stop(self) -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", "fast", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
