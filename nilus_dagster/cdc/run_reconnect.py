"""The steps of a run that keep it streaming through blips (mixed into `CdcRun`).

`_through_faults` runs one attempt after another: a transient fault (see `cdc.retry`) ends the
attempt, the run backs off within `retry_for` and starts again from what is durable. While
streaming, that is each table's sink checkpoint (the slot replays the rest), never re-snapshotting;
while setting up, the slot if it was made and the snapshot's finished partitions (cdc/resume.py).
Heartbeats and offset records go through a background `StateWriter`, so a state-store outage
never stops the data; lag is measured against the source (`cdc.lag`) and reported through
the backoff too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from nilus_dagster.cdc.lag import LagClock, SourcePosition, source_position
from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.retry import FaultOutlastedBudget, RetryBudget, is_transient
from nilus_dagster.cdc.run_config import CdcPipelineFailed, CdcProgress, Phase
from nilus_dagster.cdc.slots import SlotInUse, SystemMismatch, ensure_same_system
from nilus_dagster.cdc.state_writer import BackgroundRead, StateWriter
from nilus_dagster.sources.postgres.connection import connect_source

if TYPE_CHECKING:
    from nilus_dagster.cdc.run_config import CdcPipelineConfig
    from nilus_dagster.state.store import StateStore

_log = logging.getLogger(__name__)
HEALTHY_S = 30.0  # an attempt that streamed this long without fault ends the fault (a new budget)
T = TypeVar("T")


class ReconnectSteps:
    """Needs `config`, `store`, `run_id`, `slot`, `should_stop`, `_report` and `_stream_once`."""

    config: CdcPipelineConfig
    store: StateStore
    run_id: str
    slot: str
    should_stop: Callable[[], bool]
    heartbeat_interval_s: float
    _beat_phase: str
    _resync_due: bool
    _report: Callable[..., None]

    def _init_reconnect(self) -> None:
        self._budget = RetryBudget(self.config.retry_for_s)
        self._writer = StateWriter(self._write_state)
        self._resync_reader: BackgroundRead | None = None
        self._attempt_started = 0.0
        self._lag = LagClock()
        self._source: SourcePosition | None = None
        self._durable_count = 0  # positions made durable: data flowed in this attempt
        self._walsender_pid: int | None = None  # the server process of our last replication connection
        self._system_id: str | None = None
        self._live_stream: Any = None  # the ReplicationStream of the current attempt
        self.reconnects = 0

    def _close_state_io(self) -> None:
        if self._resync_reader is not None:
            self._resync_reader.close()
        self._writer.close()

    def _resync_requested_nonblocking(self) -> bool:
        """Whether a resync is waiting, as read in the background since this attempt began: a
        state store that is down never holds the stream up."""
        if self._resync_reader is None:
            key = self.config.key
            self._resync_reader = BackgroundRead(
                lambda: bool(self.store.open_resyncs(key.tenant, key.pipeline)),
                self.heartbeat_interval_s,
            )
        if not self._resync_due and self._resync_reader.value_since(self._attempt_started):
            self._resync_due = True
        return self._resync_due

    def _write_state(self, key: str, value: Any) -> None:
        if key == "heartbeat":
            self.store.beat(self.config.key, self.run_id, value)
        else:
            self.store.append_offset(
                self.config.key, connector_name=self.config.key.pipeline, offset_key=self.slot,
                offset_value=value, run_id=self.run_id,
            )

    def _through_faults(self, attempt: Callable[[], T], phase: Phase | None = None) -> T | None:
        """Run `attempt` (the setup, or one stream from the durable position) until it ends without
        a fault and return its result; transient faults are retried within the budget, anything
        else is raised at once. None when asked to stop during a backoff. Stalls are reported in
        `phase` (default: the phase reported last, e.g. `snapshot` for a fault mid-copy)."""
        while True:
            started, durable = time.monotonic(), self._durable_count
            self._attempt_started = started
            try:
                return attempt()
            except CdcPipelineFailed:
                raise
            except Exception as error:
                if not is_transient(error) or (isinstance(error, SlotInUse) and not self._budget.in_fault):
                    raise  # another live run holds the slot (first attempt), or not curable by retrying
                if self._durable_count > durable or time.monotonic() - started >= HEALTHY_S:
                    self._budget.recovered()  # the previous fault was over: this is a new one
                fault = error
            stalled: Phase = phase or self._beat_phase or "setup"  # type: ignore[assignment]
            _log.warning("%s fault (%.0fs into it), reconnecting: %s", stalled, self._budget.fault_seconds(), fault)
            self._report_stall(fault, stalled)
            if not self._budget.wait(self._stall_reporter(fault, stalled)):
                what = "stream" if stalled == "streaming" else f"run ({stalled})"
                raise FaultOutlastedBudget(
                    f"the {what} could not recover within retry_for ({self.config.retry_for_s:g}s): {fault}"
                ) from fault
            if self.should_stop():
                return None
            self.reconnects += 1

    def _stall_reporter(self, fault: BaseException, phase: Phase) -> Callable[[], bool]:
        last = 0.0

        def should_stop() -> bool:
            nonlocal last
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self._report_stall(fault, phase)
            return self.should_stop()

        return should_stop

    def _report_stall(self, fault: BaseException, phase: Phase) -> None:
        progress = CdcProgress(phase, lag_seconds=self._lag.lag())
        progress.fault = str(fault).strip()[:300] or type(fault).__name__
        progress.fault_seconds = round(self._budget.fault_seconds(), 1)
        self._apply_source(progress)
        self._report(progress)  # first: reading the source may take seconds while it is down
        self._refresh_source()

    def _refresh_source(self) -> None:
        """Source-side facts for the next progress report; from a fresh short connection while stalled."""
        if not self.slot:
            return  # the fault came before the run knew its slot
        try:
            with connect_source(
                self.config.source_connection, self.config.source_dsn, autocommit=True, connect_timeout=3
            ) as conn:
                self._source = source_position(conn, self.slot)
        except Exception:  # noqa: BLE001 - the source is what is down: keep the last known facts
            pass

    def _apply_source(self, progress: CdcProgress) -> None:
        if self._source is not None:
            progress.source_lsn = self._source.wal_lsn
            progress.unconfirmed_wal_bytes = self._source.unconfirmed_wal_bytes
            self._retained_wal = self._source.retained_wal_bytes  # `_report` puts it in the progress

    def _check_reconnected_source(self, conn: psycopg.Connection[Any]) -> None:
        """Before (re)starting the stream: the same cluster, and no walsender of ours left over
        holding the slot (after a frozen connection the server may not have noticed it is gone)."""
        if self._system_id is not None:
            try:
                ensure_same_system(conn, self._system_id)
            except SystemMismatch as error:
                raise self._fail(str(error)) from None  # type: ignore[attr-defined]
        if self._walsender_pid is not None:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid = %s",
                (self.slot, self._walsender_pid),
            )

    def _queue_offset(self, lsn: int) -> None:
        self._writer.put("offset", {"lsn": format_lsn(lsn), "lsn_int": lsn, "slot": self.slot})
