"""The audit trail of the operator jobs (approve_schema, reset, resync, retry_tables): whether
launched from the Dagster UI or by the REST API (which launches these same jobs), the job's op
records who asked, what, when and how it ended, and tags its own run with the audit id.

The actor is the run's `nilus/operator` tag when the API launched it (the token's name), else
`dagster:<user>` (the UI user, `ui` when Dagster has no users)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from nilus_dagster.components.cdc_config import pipeline_key
from nilus_dagster.components.lifecycle import ACTION_TAG, AUDIT_TAG, OPERATOR_TAG
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state.control import ControlStore
from nilus_dagster.state.store import StateStore

VIA_TAG = "nilus/via"
# Errors that mean the action was refused (nothing changed), not that it broke.
Refusals = tuple[type[Exception], ...]


def run_actor(context: dg.OpExecutionContext) -> str:
    tags = context.run.tags
    return tags.get(OPERATOR_TAG) or f"dagster:{tags.get('dagster/user', 'ui')}"


def audited(
    context: dg.OpExecutionContext,
    store: StateStore,
    pipeline: Pipeline,
    action: str,
    params: dict[str, Any],
    act: Callable[[], str],
    refusals: Refusals = (),
) -> str:
    """Run `act` (returning its message) as audited action `action`; a refusal or error fails the
    op with its message (dg.Failure, no retries) after the audit row records it."""
    control, key = ControlStore(store), pipeline_key(pipeline)
    via = context.run.tags.get(VIA_TAG, "dagster")
    audit_id = control.audit_start(key.tenant, key, run_actor(context), action, {**params, "via": via})
    context.instance.add_run_tags(context.run.run_id, {AUDIT_TAG: str(audit_id), ACTION_TAG: action})
    try:
        message = act()
    except refusals as refused:
        control.audit_end(audit_id, "refused", {"error": str(refused)}, [context.run.run_id])
        raise dg.Failure(str(refused), allow_retries=False) from None
    except Exception as error:
        control.audit_end(audit_id, "error", {"error": str(error)}, [context.run.run_id])
        raise
    control.audit_end(audit_id, "ok", {"message": message}, [context.run.run_id])
    return message
