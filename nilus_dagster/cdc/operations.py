"""Operator actions on a CDC pipeline: approve a held schema change, reset (re-snapshot)."""

from __future__ import annotations

from typing import Any

from nilus_dagster.cdc.pipeline import APPROVED_DETAIL, CdcPipelineConfig, current_database
from nilus_dagster.cdc.replication import drop_slot
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
    """Accept the held change: the pipeline resumes and applies it as `evolve` would.

    The running CDC run notices and ends; the keep-alive sensor starts the next one, which replays
    the held table's changes from its checkpoint and, at the approved change, evolves the sink
    table (bringing the rows it already had in line, or re-reading the table: see source_facts).
    """
    pending = proposed_schema(store, key)
    if pending is None:
        raise NothingToApprove(f"pipeline {key.pipeline} of tenant {key.tenant} has no schema change to approve")
    kept = {k: v for k, v in pending.items() if k not in (*PENDING_DETAIL, "reason")}
    approved = {"table": pending["table"], "schema": pending["proposed_schema"]}
    store.set_pipeline_state(key, "active", {**kept, APPROVED_DETAIL: approved})
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
