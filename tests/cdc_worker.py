"""Run one CDC pipeline in this process until killed (the crash tests SIGKILL it).

Usage: python cdc_worker.py '<PipelinesSpec JSON>' <pipeline name> [caught_up | dagster]
`dagster` runs the pipeline's Dagster job in process (as a run worker does) instead of the engine.
Environment: the DSN variables the spec names, NILUS_STATE_DSN, DAGSTER_HOME for `dagster`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nilus_dagster.cdc.pipeline import run_cdc_pipeline
from nilus_dagster.components.cdc_assets import cdc_config
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore


def main() -> None:
    if os.environ.get("NILUS_TEST_COPY_GATE"):
        import copy_gate

        copy_gate.install(Path(os.environ["NILUS_TEST_COPY_GATE"]), os.environ["NILUS_TEST_COPY_GATE_TABLE"])
    spec = validate_spec(PipelinesSpec, json.loads(sys.argv[1]), "worker")
    pipeline = next(p for p in spec.pipelines if p.name == sys.argv[2])
    mode = sys.argv[3] if len(sys.argv) > 3 else ""
    if mode == "dagster":
        run_dagster_job(spec, pipeline.job_name)
        return
    caught_up = mode == "caught_up"
    sink = open_sink(pipeline.sink.connection, spec.connections[pipeline.sink.connection], dataset=pipeline.sink.dataset)
    with StateStore(os.environ["NILUS_STATE_DSN"]).open() as store:
        run_cdc_pipeline(cdc_config(spec, pipeline), sink, store, run_id=f"worker-{os.getpid()}",
                         stop_at_caught_up=caught_up)


def run_dagster_job(spec: PipelinesSpec, job_name: str) -> None:
    import dagster as dg

    from nilus_dagster.components.definitions import build_definitions

    with dg.DagsterInstance.get() as instance:
        result = build_definitions(spec).resolve_job_def(job_name).execute_in_process(
            instance=instance, raise_on_error=False
        )
    print(f"run {result.run_id} success={result.success}", flush=True)


if __name__ == "__main__":
    main()
