"""A CDC pipeline's lifecycle, operated through Dagster: start, stop, pause, resume.

One implementation serves the REST route (`PUT .../state`) and the Dagster jobs
`<tenant>__<pipeline>__{start,stop,pause,resume}`, so the Dagster UI and the API always agree:

- stop / pause: the operator's hold is stored first (the keep-alive sensor then launches nothing,
  and a run launched anyway ends at once), then every live run of the pipeline is terminated
  through the instance: it flushes what it received, records its offsets and ends CANCELED
  (components/run_stop.py). The replication slot is kept: the next run resumes from it.
- start / resume: the hold is lifted; the keep-alive sensor launches the next run, tagged with
  the action's audit id.

Transitions follow Nanosync's table: start from `stopped`, stop from a running (or paused)
pipeline, pause from a running one, resume from `paused`; anything else is refused, naming the
current state. Every action, refused ones too, is written to the audit trail (state/control.py).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from nilus_dagster.components.cdc_config import pipeline_key
from nilus_dagster.components.run_stop import CANCEL_STATUSES, DeliberateStop
from nilus_dagster.components.tags import PIPELINE_TAG, TENANT_TAG, operation_tags
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state import NilusStateStore
from nilus_dagster.state.control import ControlStore
from nilus_dagster.state.store import StateStore

LIFECYCLE_ACTIONS = ("start", "stop", "pause", "resume")
# What each action leaves the operator's hold at.
DESIRED = {"start": "running", "resume": "running", "stop": "stopped", "pause": "paused"}
# The states (see `lifecycle_state`) each action may start from.
ALLOWED_FROM = {
    "start": ("stopped",),
    "stop": ("running", "starting", "pending_schema_approval", "paused", "pausing"),
    "pause": ("running", "starting", "pending_schema_approval"),
    "resume": ("paused",),
}
LIVE_STATUSES = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)
# Tags on a run an operator action caused (terminated, or launched after a start/resume).
AUDIT_TAG = "nilus/audit_id"
OPERATOR_TAG = "nilus/operator"
ACTION_TAG = "nilus/operator_action"
HOLD_POLL_INTERVAL_S = 2.0


class TransitionRefused(Exception):
    """The action is not allowed from the pipeline's current state."""

    def __init__(self, action: str, current: str):
        self.action, self.current = action, current
        hint = " (reset it first: its job __reset)" if current == "failed" else ""
        super().__init__(f"cannot {action} the pipeline: it is {current}{hint}")


@dataclass(frozen=True)
class LifecycleChange:
    previous: str
    state: str
    run_ids: list[str] = field(default_factory=list)
    audit_id: int = 0


def live_runs(instance: dg.DagsterInstance, pipeline: Pipeline) -> list[dg.DagsterRun]:
    tags = {TENANT_TAG: pipeline.tenant, PIPELINE_TAG: pipeline.name}
    return list(instance.get_runs(dg.RunsFilter(tags=tags, statuses=list(LIVE_STATUSES))))


def lifecycle_state(instance: dg.DagsterInstance, store: StateStore, pipeline: Pipeline) -> str:
    """stopped / paused (held, no live run), stopping / pausing (held, a run still ending), failed,
    pending_schema_approval, running (a live run) or starting (none yet: the sensor launches one)."""
    hold = ControlStore(store).get(pipeline.tenant, pipeline.name)
    live = bool(live_runs(instance, pipeline))
    if hold is not None and hold.held:
        if not live:
            return hold.desired
        return "stopping" if hold.desired == "stopped" else "pausing"
    runtime = store.get_pipeline_state(pipeline.tenant, pipeline.name)
    if runtime is not None and runtime.state in ("failed", "pending_schema_approval"):
        return runtime.state
    return "running" if live else "starting"


def change_state(
    instance: dg.DagsterInstance, store: StateStore, pipeline: Pipeline, action: str, actor: str, via: str
) -> LifecycleChange:
    """Carry out `action` (audited); TransitionRefused when the current state does not allow it."""
    if action not in LIFECYCLE_ACTIONS:
        raise ValueError(f"state must be one of {', '.join(LIFECYCLE_ACTIONS)}, got {action!r}")
    control, key = ControlStore(store), pipeline_key(pipeline)
    audit_id = control.audit_start(key.tenant, key, actor, f"state:{action}", {"state": action, "via": via})
    try:
        with control.serialized(key):
            return _change(instance, store, pipeline, action, actor, audit_id)
    except TransitionRefused:
        raise
    except Exception as error:
        control.audit_end(audit_id, "error", {"error": str(error)}, [])
        raise


def _change(
    instance: dg.DagsterInstance, store: StateStore, pipeline: Pipeline, action: str, actor: str, audit_id: int
) -> LifecycleChange:
    """Under the pipeline's lock: check the transition, store the hold, end the live runs."""
    control, key = ControlStore(store), pipeline_key(pipeline)
    current = lifecycle_state(instance, store, pipeline)
    if current not in ALLOWED_FROM[action]:
        control.audit_end(audit_id, "refused", {"current": current}, [])
        raise TransitionRefused(action, current)
    control.set_desired(key, DESIRED[action], actor, audit_id)
    run_ids = []
    if DESIRED[action] != "running":
        tags = {AUDIT_TAG: str(audit_id), OPERATOR_TAG: actor, ACTION_TAG: action}
        message = f"{action} requested by {actor} (audit {audit_id})"
        for run in live_runs(instance, pipeline):
            terminate_run(instance, run, message, tags)
            run_ids.append(run.run_id)
    state = lifecycle_state(instance, store, pipeline)
    control.audit_end(audit_id, "ok", {"previous": current, "state": state}, run_ids)
    return LifecycleChange(current, state, run_ids, audit_id)


def terminate_run(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str, tags: dict[str, str]) -> None:
    """End a live run as "Terminate" in the Dagster UI does: a queued one is canceled in the
    queue; a started one becomes CANCELING and its launcher signals it (the CDC run then flushes
    and ends CANCELED). Tags say which operator action it was."""
    instance.add_run_tags(run.run_id, tags)
    if run.status == dg.DagsterRunStatus.QUEUED:
        instance.run_coordinator.cancel_run(run.run_id)
        return
    if run.status == dg.DagsterRunStatus.NOT_STARTED:
        instance.report_run_canceled(run, message=message)
        return
    instance.report_engine_event(message, run)
    try:
        instance.run_launcher.terminate(run.run_id)  # marks it CANCELING, then signals it if it can
    except Exception as error:  # e.g. its code server is gone: CANCELING alone stops a CDC run
        instance.report_engine_event(f"the run launcher could not signal the run: {error}", run)
    fresh = instance.get_run_by_id(run.run_id)
    if fresh is not None and not fresh.is_finished and fresh.status not in CANCEL_STATUSES:
        instance.report_run_canceling(fresh, message=message)


def sensor_hold(
    instance: dg.DagsterInstance, store: StateStore, pipeline: Pipeline, last: dg.DagsterRun | None
) -> tuple[str | None, dict[str, str]]:
    """For the keep-alive sensor: (why it must not launch, or None; tags for the run it launches).

    The first run after a start/resume carries that action's audit tags."""
    hold = ControlStore(store).get(pipeline.tenant, pipeline.name)
    if hold is None:
        return None, {}
    if hold.held:
        return f"pipeline is {hold.desired} by {hold.actor} (PUT .../state start/resume, or its job)", {}
    record = instance.get_run_record_by_id(last.run_id) if last is not None else None
    if hold.audit_id is not None and (record is None or record.create_timestamp < hold.updated_at):
        return None, {AUDIT_TAG: str(hold.audit_id), OPERATOR_TAG: hold.actor, ACTION_TAG: "start"}
    return None, {}


def hold_watch(store: StateStore, pipeline: Pipeline, stop: DeliberateStop) -> Callable[[], bool]:
    """True once an operator holds the pipeline (checked at most every HOLD_POLL_INTERVAL_S): the
    run then ends as a deliberate stop, even where the launcher could not signal it."""
    control = ControlStore(store)
    last_check = float("-inf")

    def held() -> bool:
        nonlocal last_check
        if stop.reason is not None:
            return True
        if time.monotonic() - last_check < HOLD_POLL_INTERVAL_S:
            return False
        last_check = time.monotonic()
        hold = control.get(pipeline.tenant, pipeline.name)
        if hold is not None and hold.held:
            stop.reason = f"the pipeline was {hold.desired} by {hold.actor}"
            return True
        return False

    return held


def lifecycle_jobs(pipeline: Pipeline) -> list[dg.JobDefinition]:
    """`<tenant>__<pipeline>__<action>` for each action: the same change as the REST route."""
    return [_lifecycle_job(pipeline, action) for action in LIFECYCLE_ACTIONS]


def _lifecycle_job(pipeline: Pipeline, action: str) -> dg.JobDefinition:
    name = f"{pipeline.job_name}__{action}"

    @dg.op(name=f"{name}_op", tags=operation_tags(pipeline, action))
    def _act(context: dg.OpExecutionContext, nilus_state: NilusStateStore) -> None:
        actor = f"dagster:{context.run.tags.get('dagster/user', 'ui')}"
        try:
            change = change_state(context.instance, nilus_state.get_store(), pipeline, action, actor, "dagster")
        except TransitionRefused as refused:
            raise dg.Failure(str(refused), allow_retries=False) from None
        context.instance.add_run_tags(context.run.run_id, {AUDIT_TAG: str(change.audit_id)})
        ended = f"; terminated {', '.join(change.run_ids)}" if change.run_ids else ""
        context.log.info(f"{pipeline.name}: {change.previous} -> {change.state}{ended}")

    @dg.job(name=name, tags=operation_tags(pipeline, action), description=f"{action.capitalize()} {pipeline.name}.")
    def _job() -> None:
        _act()

    return _job
