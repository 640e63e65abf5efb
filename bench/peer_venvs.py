"""Venvs of the benchmark's peers under `~/.cache/nilus-dagster/<name>`: created on first use,
reused while their requirements are unchanged. Never project dependencies."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nilus-dagster"


def peer_python(name: str, requirements: list[str]) -> Path:
    """The venv's interpreter, creating the venv and installing `requirements` when missing."""
    root = CACHE / name
    interpreter = root / "bin" / "python"
    marker, wanted = root / ".nilus-bench-requirements", " ".join(requirements)
    if not marker.exists() or marker.read_text() != wanted:
        print(f"  preparing {root}: pip install {wanted} (once)...", flush=True)
        if not interpreter.exists():
            venv.create(root, with_pip=True)
        subprocess.run([str(interpreter), "-m", "pip", "install", "-q", *requirements], check=True)
        marker.write_text(wanted)
    return interpreter
