"""Run one CDC pipeline in this process until killed (the crash tests SIGKILL it).

Usage: python cdc_worker.py '<PipelinesSpec JSON>' <pipeline name> [caught_up]
Environment: the DSN variables the spec names, and NILUS_STATE_DSN.
"""

from __future__ import annotations

import json
import os
import sys

from nilus_dagster.cdc.pipeline import run_cdc_pipeline
from nilus_dagster.components.cdc_assets import cdc_config
from nilus_dagster.sinks.factory import open_sink
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.store import StateStore


def main() -> None:
    spec = validate_spec(PipelinesSpec, json.loads(sys.argv[1]), "worker")
    pipeline = next(p for p in spec.pipelines if p.name == sys.argv[2])
    caught_up = len(sys.argv) > 3 and sys.argv[3] == "caught_up"
    sink = open_sink(pipeline.sink.connection, spec.connections[pipeline.sink.connection])
    with StateStore(os.environ["NILUS_STATE_DSN"]).open() as store:
        run_cdc_pipeline(cdc_config(spec, pipeline), sink, store, run_id=f"worker-{os.getpid()}",
                         stop_at_caught_up=caught_up)


if __name__ == "__main__":
    main()
