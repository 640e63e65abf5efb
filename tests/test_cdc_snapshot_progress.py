"""A CDC snapshot's progress per table, in the run's log and as observations of each table's asset.

Real PostgreSQL source, DuckDB sink, real Dagster instance.
"""

from __future__ import annotations

import dagster as dg
import psycopg
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from test_cdc_crash import create_items

ITEMS = dg.AssetKey(["acme", "crashy", "public", "items"])
TAGS = dg.AssetKey(["acme", "crashy", "public", "tags"])


def test_snapshot_progress_per_table(pipeline_env: str, duckdb_sink: SinkTarget) -> None:
    create_items(pipeline_env, 3000)  # about 40 pages: several one-block partitions
    with psycopg.connect(pipeline_env, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.tags (id int PRIMARY KEY)")
        conn.execute("INSERT INTO public.tags SELECT generate_series(1, 10)")
    pipeline = cdc_pipeline("crashy", ["public.items", "public.tags"], cdc={"snapshot_partition_blocks": 8})
    instance = dg.DagsterInstance.get()
    result = run_until_caught_up(cdc_project(duckdb_sink, pipeline), "acme__crashy", instance)
    assert result.success, failure_message(result)
    observations = [
        e.event_specific_data.asset_observation  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    snapshot = {o.asset_key: o.metadata for o in observations if o.metadata["phase"].value == "snapshot"}
    items, tags = snapshot[ITEMS], snapshot[TAGS]  # the last one of each: the snapshot's end
    assert items["table_snapshot_partitions_total"].value > 1
    assert items["table_snapshot_percent"].value == 100.0 and items["table_snapshot_rows"].value == 3000
    assert tags["table_snapshot_rows"].value == 10
    logged = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("public.items 100%" in m and "3,000 rows" in m for m in logged), logged
