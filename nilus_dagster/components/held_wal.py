"""The asset check `held_wal_retention`: while an operator holds a CDC pipeline paused (or
stopped) its slot is kept and nothing consumes it, so the source retains every WAL byte written
since; the check warns once that retained WAL has grown since the hold began.

No CDC run is live while held, so the keep-alive sensor (which still ticks, and skips) evaluates
it: at its first tick under a hold it records the slot's retained WAL as the baseline (in its
cursor, per hold), then each tick reports the check for every table of the pipeline, failed
(severity WARN) when the retained WAL is above the baseline. A source it cannot read reports
nothing that tick. The metric `nilus_pipeline_held_retained_wal_bytes` shows the same bytes.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import dagster as dg

from nilus_dagster.components.naming import asset_key
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec
from nilus_dagster.state.control import ControlStore
from nilus_dagster.state.store import StateStore

HELD_WAL_CHECK = "held_wal_retention"
READ_TIMEOUT_S = 3
log = logging.getLogger(__name__)


def held_wal_check_specs(specs: list[dg.AssetSpec]) -> list[dg.AssetCheckSpec]:
    description = (
        "While the pipeline is paused or stopped by an operator, the WAL its slot retains in the source has not "
        "grown since the hold began (evaluated by the keep-alive sensor; warns)."
    )
    return [dg.AssetCheckSpec(HELD_WAL_CHECK, asset=spec.key, description=description) for spec in specs]


def _retained_bytes(spec: PipelinesSpec, pipeline: Pipeline, store: StateStore) -> int | None:
    """The slot's unconfirmed WAL now (None: no slot yet, or the source cannot be read)."""
    from nilus_dagster.cdc.lag import source_position
    from nilus_dagster.sources.postgres.connection import connect_source

    state = store.get_pipeline_state(pipeline.tenant, pipeline.name)
    slot = state.detail.get("slot") if state is not None else None
    if not slot:
        return None
    try:
        dsn = spec.connections[pipeline.source.connection].dsn(pipeline.source.connection)  # type: ignore[union-attr]
        with connect_source(pipeline.source.connection, dsn, autocommit=True, connect_timeout=READ_TIMEOUT_S) as conn:
            position = source_position(conn, slot, deadline_s=READ_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - a check never breaks the sensor; the next tick retries
        log.warning("held_wal_retention of %s/%s not evaluated: %s", pipeline.tenant, pipeline.name, error)
        return None
    return position.unconfirmed_wal_bytes if position is not None else None


def held_wal_evaluations(
    spec: PipelinesSpec, pipeline: Pipeline, store: StateStore, cursor: str | None
) -> tuple[list[dg.AssetCheckEvaluation], str | None]:
    """The check for every table while the pipeline is held (none otherwise), and the new cursor."""
    hold = ControlStore(store).get(pipeline.tenant, pipeline.name)
    if hold is None or not hold.held:
        return [], None
    retained = _retained_bytes(spec, pipeline, store)
    if retained is None:
        return [], cursor
    baselines = json.loads(cursor) if cursor else {}
    hold_id = str(hold.audit_id)
    baseline = int(baselines.get(hold_id, retained))
    growth = retained - baseline
    metadata = {
        "retained_wal_bytes": dg.MetadataValue.int(retained),
        "retained_at_hold_bytes": dg.MetadataValue.int(baseline),
        "growth_bytes": dg.MetadataValue.int(growth),
        "held": dg.MetadataValue.text(f"{hold.desired} by {hold.actor}"),
        "held_seconds": dg.MetadataValue.float(round((datetime.now(UTC) - hold.updated_at).total_seconds(), 1)),
    }
    evaluations = [
        dg.AssetCheckEvaluation(
            asset_key=asset_key(pipeline, table),
            check_name=HELD_WAL_CHECK,
            passed=growth <= 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=metadata,
            description=None if growth <= 0 else f"the source retains {growth} more WAL bytes than when {hold.desired}",
        )
        for table in pipeline.source.tables
    ]
    return evaluations, json.dumps({hold_id: baseline})
