"""A throwaway MariaDB server for tests, started from Debian's `mariadb-server` binaries.

`mariadb-install-db` creates a data directory in a temporary folder and `mariadbd` serves it on a
loopback port and a socket of its own, so the MariaDB a machine may happen to run (on 3306, with
its own binlog and server id) is never touched. The server writes a ROW binlog with full row
images and GTIDs (MariaDB's `gtid_domain_id`/`server_id`; a random, unique server id), like a
primary a CDC pipeline reads. Its default time zone is deliberately not UTC (+05:30): a reader
that forgets to pin its session's time zone reads TIMESTAMPs shifted, and the tests see it.

Durability settings are relaxed (no fsync of the binlog or the redo log): a test checks its data
itself, and a throwaway server is never restarted after a host crash.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from apt_packages import ensure_packages

from nilus_dagster.embedded.postgres import free_port

APT_PACKAGES = ["mariadb-server", "mariadb-client"]
SERVER_TIME_ZONE = "+05:30"
ROOT_PASSWORD = "nilus-test"  # a throwaway server's root; TCP logins need a password in the DSN tests


def _binaries() -> tuple[str | None, str | None]:
    path = f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}"
    return shutil.which("mariadb-install-db", path=path), shutil.which("mariadbd", path=path)


def ensure_mariadb() -> tuple[str, str]:
    """Paths of mariadb-install-db and mariadbd, installing Debian's packages first if needed."""
    # --no-install-recommends: the package's own service and tools beyond the server are not wanted.
    ensure_packages(APT_PACKAGES, lambda: None not in _binaries(), recommends=False)
    install_db, server = _binaries()
    assert install_db and server, f"apt-get install {' '.join(APT_PACKAGES)} did not provide mariadbd"
    return install_db, server


@dataclass
class MariaDBServer:
    """A server in `base_dir` (created), on `port` (a free one when 0)."""

    base_dir: Path
    port: int = 0
    server_id: int = field(default_factory=lambda: random.randint(10_000, 2**31 - 1))
    gtid_domain_id: int = 0
    settings: dict[str, str] = field(default_factory=dict)  # extra `--name=value` server options
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_path(self) -> Path:
        return self.base_dir / "mariadb.sock"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    def dsn(self, database: str = "", user: str = "root", password: str | None = ROOT_PASSWORD) -> str:
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"mysql://{auth}@127.0.0.1:{self.port}/{database}"

    def _options(self, server: str) -> list[str]:
        options = {
            "datadir": str(self.data_dir),
            "socket": str(self.socket_path),
            "pid-file": str(self.base_dir / "mariadbd.pid"),
            "log-error": str(self.log_path),
            "port": str(self.port),
            "bind-address": "127.0.0.1",
            "skip-name-resolve": None,
            "init-file": str(self.base_dir / "init.sql"),
            "log-bin": str(self.base_dir / "binlog" / "mariadb-bin"),
            "binlog-format": "ROW",
            "binlog-row-image": "FULL",
            "server-id": str(self.server_id),
            "gtid-domain-id": str(self.gtid_domain_id),
            "gtid-strict-mode": "ON",
            "character-set-server": "utf8mb4",
            "collation-server": "utf8mb4_unicode_ci",
            "default-time-zone": SERVER_TIME_ZONE,
            "max-connections": "200",
            "innodb-buffer-pool-size": "128M",
            "innodb-log-file-size": "64M",
            "innodb-flush-log-at-trx-commit": "0",
            "innodb-doublewrite": "0",
            "sync-binlog": "0",
            "skip-slave-start": None,
            **({"user": "root"} if os.geteuid() == 0 else {}),
            **self.settings,
        }
        return [server, "--no-defaults", *(f"--{k}" if v is None else f"--{k}={v}" for k, v in options.items())]

    def start(self, timeout_s: float = 60.0) -> MariaDBServer:
        install_db, server = ensure_mariadb()
        self.base_dir = Path(self.base_dir).resolve()
        (self.base_dir / "binlog").mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "mysql").exists():
            user = ["--user=root"] if os.geteuid() == 0 else []
            subprocess.run(
                [install_db, "--no-defaults", f"--datadir={self.data_dir}", "--skip-test-db",
                 "--auth-root-authentication-method=normal", "--skip-name-resolve", *user],
                check=True, capture_output=True, timeout=300,
            )
        # Every start: root may log in over TCP with a password (the DSNs tests use).
        (self.base_dir / "init.sql").write_text(
            "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';\n"
            f"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY '{ROOT_PASSWORD}';\n"
            "GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;\n"
        )
        self.port = self.port or free_port()
        with open(self.base_dir / "stdout.log", "ab") as out:
            self._process = subprocess.Popen(self._options(server), stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self._process.returncode}:\n{self._log_tail()}")
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if "ready for connections" in log:
                return
            time.sleep(0.1)
        raise RuntimeError(f"mariadbd did not become ready in {timeout_s:.0f}s:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server (a crash); `start()` brings it back on the same port and data."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)
        self._process = None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=30)
        self._process = None

    def destroy(self) -> None:
        """Kill the server and delete its files (a clean shutdown would only flush what is deleted)."""
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)
