"""Build and run a batch pipeline project against real databases, the way Dagster would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from nilus_dagster.components.definitions import build_definitions
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec


@dataclass
class SinkTarget:
    """A sink connection declaration plus how to read what landed in it."""

    kind: str
    connection: dict[str, Any]
    location: str  # DuckDB file path or PostgreSQL DSN


def sink_target(kind: str, duckdb_path: Path, sink_pg: str, monkeypatch: pytest.MonkeyPatch) -> SinkTarget:
    if kind == "duckdb":
        return SinkTarget(kind, {"type": "duckdb", "path": str(duckdb_path)}, str(duckdb_path))
    monkeypatch.setenv("SINK_DSN", sink_pg)
    return SinkTarget(kind, {"type": "postgres", "dsn_env": "SINK_DSN"}, sink_pg)


def project(sink: SinkTarget, *pipelines: dict[str, Any], source_type: str = "postgres") -> dg.Definitions:
    """Definitions of `pipelines`, reading connection `src` (a `source_type` DSN in SOURCE_DSN)."""
    spec = validate_spec(
        PipelinesSpec,
        {
            "connections": {"src": {"type": source_type, "dsn_env": "SOURCE_DSN"}, "sink": sink.connection},
            "pipelines": list(pipelines),
        },
        "test defs.yaml",
    )
    return build_definitions(spec)


def pipeline(name: str, tables: list[Any], strategy: str = "merge", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "tenant": extra.pop("tenant", "acme"),
        "source": {"connection": "src", "tables": tables},
        "sink": {"connection": "sink", "dataset": "analytics", "strategy": strategy},
        **extra,
    }


def run_job(defs: dg.Definitions, job_name: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job_name).execute_in_process(instance=instance, raise_on_error=False)


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The user-facing error text of a failed run's steps."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error
            while error is not None:
                messages.append(error.message)
                error = error.cause
    return "\n".join(messages)
