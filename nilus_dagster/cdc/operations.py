"""Operator actions on a CDC pipeline: approve a held schema change, reset (re-snapshot)."""

from __future__ import annotations

from typing import Any

from nilus_dagster.cdc.pipeline import CdcPipelineConfig, current_database
from nilus_dagster.cdc.replication import drop_slot
from nilus_dagster.schema import TableSchema
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore

# Keys of a pipeline state's detail that describe a held schema change (the rest is identity).
PENDING_DETAIL = ("table", "proposed_schema", "diff", "lsn")


class NothingToApprove(Exception):
    """Approval was asked for, but no schema change is waiting."""


def proposed_schema(store: StateStore, key: PipelineKey) -> dict[str, Any] | None:
    """The schema change waiting for approval, if any: table, proposed schema, diff, LSN."""
    state = store.get_pipeline_state(key.tenant, key.pipeline)
    if state is None or state.state != "pending_schema_approval":
        return None
    return state.detail


def approve_schema_change(store: StateStore, key: PipelineKey) -> str:
    """Accept the held change: it becomes the table's schema and the pipeline resumes.

    The running CDC run notices and ends; the keep-alive sensor starts the next one, which adds
    the new columns to the sink and replays the held table's changes from its checkpoint.
    """
    pending = proposed_schema(store, key)
    if pending is None:
        raise NothingToApprove(f"pipeline {key.pipeline} of tenant {key.tenant} has no schema change to approve")
    schema = TableSchema.from_json(pending["proposed_schema"])
    store.append_schema(
        key,
        connector_name=key.pipeline,
        table_name=pending["table"],
        table_schema=schema.to_json(),
        lsn=pending.get("lsn"),
    )
    kept = {k: v for k, v in pending.items() if k not in PENDING_DETAIL}
    store.set_pipeline_state(key, "active", kept)
    return pending["table"]


def reset_pipeline(config: CdcPipelineConfig, store: StateStore) -> str:
    """Start over after a lost slot: drop the slot (if any) and forget the snapshot progress. The
    next run creates a new slot, empties the sink tables and snapshots every table again.
    Returns the slot's name."""
    with connect_source(config.source_connection, config.source_dsn, autocommit=True) as conn:
        slot = config.slot(current_database(conn))
        drop_slot(conn, slot)
    store.clear_snapshot(config.key.tenant, config.key.pipeline)
    store.set_pipeline_state(config.key, "active", {"reset": True})
    return slot
