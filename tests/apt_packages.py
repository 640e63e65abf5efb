"""Install Debian packages a test needs, once, even when several pytest workers ask at the same time."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Callable
from pathlib import Path

_LOCK = Path("/tmp/nilus-tests-apt.lock")
_ENV = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def ensure_packages(packages: list[str], present: Callable[[], bool], *, recommends: bool = True) -> None:
    """apt-get install `packages` unless `present()` already holds (checked again under the lock)."""
    if present():
        return
    with _LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # dpkg takes one installer at a time; the others wait here
        if present():
            return
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=_ENV, timeout=600)
        options = [] if recommends else ["--no-install-recommends"]
        subprocess.run(["apt-get", "install", "-y", "-qq", *options, *packages], check=True, env=_ENV, timeout=1200)
