"""Ending a CDC run whose heartbeat went stale, before the keep-alive sensor starts another."""

from __future__ import annotations

import logging

import dagster as dg

_log = logging.getLogger(__name__)
STALE_MESSAGE = "CDC run stopped sending heartbeats (process died or wedged?); relaunching"


def end_stale_run(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Ask the run launcher to terminate `run` (a wedged process would otherwise stream beside its
    successor and hold the slot), then mark it failed. True if the launcher took the request."""
    try:
        terminated = bool(instance.run_launcher.terminate(run.run_id))
    except Exception as error:  # noqa: BLE001 - a dead process or launcher: marking it failed still frees the way
        _log.warning("could not terminate stale run %s: %s", run.run_id, error)
        terminated = False
    current = instance.get_run_by_id(run.run_id) or run
    if current.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
        instance.report_run_failed(current, message=f"{STALE_MESSAGE} (terminate requested: {terminated})")
    return terminated
