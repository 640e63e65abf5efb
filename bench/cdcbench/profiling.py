"""pyinstrument profiles of our side, saved as text/HTML with a short "where the time goes" summary.

pyinstrument samples only the thread that starts it: the stream runs on the main thread (fully
seen); in the snapshot the main thread writes to DuckDB while worker threads read, so the reader
is profiled separately (`snapshot.run_reader_only`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyinstrument import Profiler
from pyinstrument.frame import Frame

# Self time is charged to the innermost frame of ours on the stack (library and built-in calls to
# whoever called them); the first matching path fragment names the area.
AREAS = (
    ("nilus_dagster/cdc/pgoutput", "pgoutput decoding"),
    ("nilus_dagster/cdc/replication", "replication receive loop"),
    ("nilus_dagster/cdc/changes", "change batching (rows -> Arrow)"),
    ("nilus_dagster/cdc/stream", "stream applier/loop"),
    ("nilus_dagster/cdc/snapshot", "snapshot runner (waits for workers)"),
    ("nilus_dagster/sinks/duckdb", "DuckDB sink (incl. DuckDB itself)"),
    ("nilus_dagster/sinks", "sink SQL building/staging"),
    ("nilus_dagster/sources", "source reader"),
    ("nilus_dagster/state", "state store"),
    ("nilus_dagster", "other nilus code"),
    ("/bench/", "benchmark harness"),
)


def area_of(frame: Frame, inherited: str) -> str:
    path = (frame.file_path or "").replace("\\", "/")
    return next((name for fragment, name in AREAS if fragment in path), inherited)


def self_times(root: Frame) -> tuple[dict[str, float], dict[str, float]]:
    """Self time per area and per function (`function  file:line`) over the whole call tree."""
    by_area: dict[str, float] = defaultdict(float)
    by_function: dict[str, float] = defaultdict(float)
    stack = [(root, "outside our code")]
    while stack:
        frame, inherited = stack.pop()
        if frame.is_synthetic:
            continue  # its time is in its parent's total_self_time
        current = area_of(frame, inherited)
        own = max(frame.total_self_time, 0.0)
        by_area[current] += own
        by_function[f"{frame.function}  {frame.code_position_short() or ''}"] += own
        stack.extend((child, current) for child in frame.children)
    return by_area, by_function


def summary(profiler: Profiler, title: str, top: int = 12) -> str:
    session = profiler.last_session
    root = session.root_frame() if session else None
    if root is None:
        return f"{title}: no samples"
    total = root.time or 1e-9
    by_area, by_function = self_times(root)
    lines = [f"{title}: {total:.2f} s sampled", "  by area (self time, library calls charged to our caller):"]
    for name, seconds in sorted(by_area.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"    {seconds:7.2f} s {100 * seconds / total:5.1f}%  {name}")
    lines.append("  top functions (self time):")
    for name, seconds in sorted(by_function.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {seconds:7.2f} s {100 * seconds / total:5.1f}%  {name}")
    return "\n".join(lines)


@contextmanager
def profiled(out_dir: Path, name: str, summaries: list[str]) -> Iterator[None]:
    """Profile the block; save `<name>.txt`/`.html` in out_dir and append its summary."""
    profiler = Profiler(interval=0.001)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.txt").write_text(profiler.output_text(unicode=True, show_all=False))
        (out_dir / f"{name}.html").write_text(profiler.output_html())
        text = summary(profiler, name)
        (out_dir / f"{name}.summary.txt").write_text(text + "\n")
        summaries.append(text)
