"""Operator actions on a CDC pipeline: approve a held schema change, reset (re-snapshot all),
resync (re-snapshot some tables while the others keep their place), retry failed tables, replay
dead-letter entries."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from nilus_dagster.cdc.pipeline import APPROVED_DETAIL, CdcPipelineConfig, current_database, request_table_resync
from nilus_dagster.cdc.replication import drop_slot
from nilus_dagster.cdc.resync import validate_resync_tables
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.state.records import PipelineKey, ResyncRequest
from nilus_dagster.state.store import StateStore

# Keys of a pipeline state's detail that describe a held schema change (the rest is identity).
PENDING_DETAIL = ("table", "proposed_schema", "diff", "lsn")
LIVE_HEARTBEAT = timedelta(seconds=60)  # a CDC run that beat more recently is live


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
    Returns the slot's name. A MariaDB pipeline has no slot: its next run snapshots every table
    again, at a new binlog position (cdc/mysql/pipeline.py)."""
    from nilus_dagster.cdc.mysql.pipeline import is_binlog_source

    if is_binlog_source(config):
        store.clear_table_failures(config.key)
        store.set_pipeline_state(config.key, "active", {"reset": True})
        return "(binlog: no slot)"
    with connect_source(config.source_connection, config.source_dsn, autocommit=True) as conn:
        slot = config.slot(current_database(conn))
        drop_slot(conn, slot)
    store.clear_snapshot(config.key.tenant, config.key.pipeline)
    store.clear_table_failures(config.key)  # every table is snapshotted again
    store.set_pipeline_state(config.key, "active", {"reset": True})
    return slot


class ResyncFailed(Exception):
    """A CDC run tried the requested resync and failed (its error is in the request)."""


def resync_tables(
    config: CdcPipelineConfig,
    store: StateStore,
    tables: Sequence[str],
    reason: str = "operator request",
    *,
    wait_s: float = 600.0,
    poll_s: float = 1.0,
    log: Callable[[str], Any] = lambda message: None,
) -> str:
    """Request a resync of `tables` and wait (at most `wait_s`) for the live CDC run to carry it
    out. With no live run it returns at once: the next run resyncs them before it streams."""
    key = config.key
    state = store.get_pipeline_state(key.tenant, key.pipeline)
    if state is not None and state.state == "failed":
        reason_failed = state.detail.get("reason", "see its state")
        raise ResyncFailed(f"pipeline {key.pipeline} is failed ({reason_failed}): reset it, a resync cannot help")
    ids = request_table_resync(config, store, tables, reason)
    names = ", ".join(dict.fromkeys(tables))
    log(f"resync of {names} requested (request ids {ids})")
    deadline = time.monotonic() + wait_s
    last_log = 0.0
    while True:
        requests = store.resync_requests(ids)
        failed = [r for r in requests if r.status == "failed"]
        if failed:
            raise ResyncFailed("; ".join(f"resync of {r.table_name} failed: {r.error}" for r in failed))
        if all(r.status == "done" for r in requests):
            return f"resynced {names}"
        if not _run_is_live(store, key):
            return (
                f"no CDC run of {key.pipeline} is live: the next run resyncs {names} before it streams "
                "(the keep-alive sensor starts one)"
            )
        if time.monotonic() >= deadline:
            return f"the resync of {names} is still under way after {wait_s:.0f}s; the live run finishes it"
        if time.monotonic() - last_log >= 10:
            last_log = time.monotonic()
            log(_progress_line(store, key, requests))
        time.sleep(poll_s)


def _run_is_live(store: StateStore, key: PipelineKey) -> bool:
    beat = store.last_heartbeat(key.tenant, key.pipeline)
    if beat is None or beat.detail.get("phase") == "stopped":
        return False
    return datetime.now(UTC) - beat.beat_at < LIVE_HEARTBEAT


def _progress_line(store: StateStore, key: PipelineKey, requests: Sequence[ResyncRequest]) -> str:
    progress = {p.table: p for p in store.snapshot_progress(key.tenant, key.pipeline)}
    parts = []
    for request in requests:
        table = progress.get(request.table_name)
        done = f", {table.percent}% copied" if request.status == "running" and table else ""
        parts.append(f"{request.table_name}: {request.status}{done}")
    return "waiting for the live CDC run: " + "; ".join(parts)


class NothingToRetry(Exception):
    """A retry was asked for tables that are not failed."""


def retry_tables(config: CdcPipelineConfig, store: StateStore, tables: Sequence[str]) -> str:
    """Ask the CDC run to stream failed tables again, each from its own checkpoint (fix the cause
    first: restore the sink table, grant the permission). The live run restarts its stream within
    a heartbeat; with no live run, the next one does. A table that fails again is held again."""
    names = validate_resync_tables(tables, [t.table for t in config.tables])
    asked = [n.qualified for n in names]
    retried = store.request_table_retry(config.key, asked)
    if not retried:
        raise NothingToRetry(
            f"none of {', '.join(asked)} is failed in pipeline {config.key.pipeline}"
            + _failed_listing(store, config.key)
        )
    skipped = sorted(set(asked) - set(retried))
    note = f" ({', '.join(skipped)} not failed)" if skipped else ""
    return f"retry of {', '.join(retried)} requested{note}: the CDC run streams them again from their checkpoints"


def _failed_listing(store: StateStore, key: PipelineKey) -> str:
    failed = [f.table_name for f in store.table_failures(key.tenant, key.pipeline)]
    return f"; failed tables: {', '.join(failed)}" if failed else "; it has no failed tables"


class NothingToReplay(Exception):
    """A dead-letter replay was asked for, but no unacknowledged entry matches."""


class ReplayFailed(Exception):
    """The CDC run carried out the replay but some entries could not be replayed (named)."""


def replay_dead_letters(
    config: CdcPipelineConfig,
    store: StateStore,
    ids: Sequence[int] | None = None,
    table: str | None = None,
    *,
    wait_s: float = 600.0,
    poll_s: float = 1.0,
) -> str:
    """Ask the CDC run to replay the pipeline's unacknowledged dead-letter entries with these ids
    and/or of this table, from the current source rows of their keys (cdc/dlq_replay.py), and wait
    (at most `wait_s`) for the live run to do it; with no live run the next run does it first."""
    if not ids and table is None:
        raise NothingToReplay("name the entries to replay: their ids, a table, or both")
    name = validate_resync_tables([table], [t.table for t in config.tables])[0].qualified if table else None
    request_id, entries = store.request_dlq_replay(config.key, ids or None, name)
    if not entries:
        which = " and ".join(filter(None, [f"ids {list(ids)}" if ids else "", f"table {name}" if name else ""]))
        raise NothingToReplay(f"pipeline {config.key.pipeline} has no unacknowledged dead-letter entry with {which}")
    asked = f"replay {request_id} of {len(entries)} dead-letter entries"
    deadline = time.monotonic() + wait_s
    while True:
        request = store.dlq_replay(request_id)
        assert request is not None
        if request.status == "failed":
            raise ReplayFailed(f"{asked}: {request.message}")
        if request.status != "pending":
            return f"{asked}: {request.message}"
        if not _run_is_live(store, config.key):
            return f"{asked} requested; no CDC run of {config.key.pipeline} is live: the next run replays them first"
        if time.monotonic() >= deadline:
            return f"{asked} is still pending after {wait_s:.0f}s; the live CDC run carries it out"
        time.sleep(poll_s)
