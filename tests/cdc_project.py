"""Helpers for CDC tests: a cdc pipeline project and runs that stop once caught up."""

from __future__ import annotations

from typing import Any

import dagster as dg
from batch_project import SinkTarget, project


def cdc_pipeline(name: str, tables: list[Any], **extra: Any) -> dict[str, Any]:
    cdc_options = {"batch_max_ms": 200, **extra.pop("cdc", {})}
    return {
        "name": name,
        "tenant": extra.pop("tenant", "acme"),
        "type": "cdc",
        "source": {"connection": "src", "tables": tables},
        "sink": {"connection": "sink", "dataset": "replica"},
        "cdc": cdc_options,
        **extra,
    }


def cdc_project(sink: SinkTarget, *pipelines: dict[str, Any]) -> dg.Definitions:
    return project(sink, *pipelines)


def run_until_caught_up(defs: dg.Definitions, job_name: str, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance,
        run_config={"ops": {f"{job_name}__cdc": {"config": {"stop_at": "caught_up"}}}},
        raise_on_error=False,
    )
