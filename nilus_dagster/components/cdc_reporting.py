"""How a live CDC run shows in Dagster: its tables' assets read as alive.

Every table gets a materialization once its copy is current (after the snapshot or catch-up),
then one per interval in which changes were applied to it (rows inserted, updated, deleted since
the last one, checkpoint LSN, lag), and one at least every `IDLE_MATERIALIZATION_S` while idle, so
"last updated" and freshness hold. Between them, observations carry the current values. All of it
is throttled: thousands of events per run would make the UI crawl.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dagster as dg

from nilus_dagster.components.naming import asset_key

REPORT_INTERVAL_S = 30.0
IDLE_MATERIALIZATION_S = 600.0
KINDS = (("I", "rows_inserted"), ("U", "rows_updated"), ("D", "rows_deleted"), ("T", "truncates"))


def progress_metadata(progress: Any) -> dict[str, dg.MetadataValue]:  # CdcProgress, imported lazily
    metadata = {
        "phase": dg.MetadataValue.text(progress.phase),
        "lsn": dg.MetadataValue.text(progress.lsn or ""),
        "lag_seconds": dg.MetadataValue.float(progress.lag_seconds),
        "events_total": dg.MetadataValue.int(progress.events_total),
        "events_per_s": dg.MetadataValue.float(progress.events_per_s),
    }
    if progress.retained_wal_bytes is not None:
        metadata["slot_retained_wal_bytes"] = dg.MetadataValue.int(progress.retained_wal_bytes)
    if getattr(progress, "unconfirmed_wal_bytes", None) is not None:  # the source's side of the lag
        metadata["slot_unconfirmed_wal_bytes"] = dg.MetadataValue.int(progress.unconfirmed_wal_bytes)
    if progress.phase == "snapshot":
        metadata["snapshot_rows"] = dg.MetadataValue.int(progress.snapshot_rows)
        metadata["snapshot_partitions_done"] = dg.MetadataValue.int(progress.snapshot_partitions_done)
        metadata["snapshot_partitions_total"] = dg.MetadataValue.int(progress.snapshot_partitions_total)
    return metadata


LAG_CHECK = "max_lag"


def lag_check_specs(pipeline: Any, specs: list[dg.AssetSpec]) -> list[dg.AssetCheckSpec]:  # a Pipeline
    if pipeline.checks.max_lag is None:
        return []
    description = f"The table's replication lag stays within {pipeline.checks.max_lag} (checks.max_lag)."
    return [dg.AssetCheckSpec(LAG_CHECK, asset=spec.key, description=description) for spec in specs]


def lag_check(pipeline: Any, key: dg.AssetKey, lag_seconds: float) -> dg.AssetCheckResult:
    """The lag check's result for one table (logged while streaming, yielded at the run's end)."""
    bound = pipeline.checks.max_lag_seconds
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=LAG_CHECK,
        passed=lag_seconds <= bound,
        severity=dg.AssetCheckSeverity.ERROR if pipeline.checks.severity == "error" else dg.AssetCheckSeverity.WARN,
        metadata={"lag_seconds": dg.MetadataValue.float(lag_seconds), "max_lag_seconds": dg.MetadataValue.float(bound)},
    )


DLQ_CHECK = "dead_letters"


def dlq_check_specs(specs: list[dg.AssetSpec]) -> list[dg.AssetCheckSpec]:
    description = (
        "The table has no unacknowledged dead-letter entries (rows the sink could not take, on_error: dlq); "
        "acknowledge them through the API's /dlq/ack once handled."
    )
    return [dg.AssetCheckSpec(DLQ_CHECK, asset=spec.key, description=description) for spec in specs]


def open_dead_letters(store: Any, pipeline: Any) -> dict[str, int]:  # a StateStore
    """Unacknowledged dead-letter entries of the pipeline, by source table."""
    totals = store.dead_letter_totals(pipeline.tenant)
    return {table: unacked for (_, name, table), (unacked, _) in totals.items() if name == pipeline.name}


def dlq_check(pipeline: Any, key: dg.AssetKey, unacked: int | None) -> dg.AssetCheckResult:
    """Passes while the table has no unacknowledged entries (None: the state store did not answer)."""
    metadata = {"unacknowledged_entries": dg.MetadataValue.int(unacked)} if unacked is not None else {
        "unknown": dg.MetadataValue.text("the state store did not answer")
    }
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=DLQ_CHECK,
        passed=unacked == 0,
        severity=dg.AssetCheckSeverity.ERROR if pipeline.checks.severity == "error" else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
    )


class CdcAssetReporter:
    """Receives a run's progress; logs materializations and observations of its table assets."""

    def __init__(
        self, context: dg.AssetExecutionContext, pipeline: Any, dead_letters: Callable[[], Any] = lambda: None
    ) -> None:
        self._context = context
        self._pipeline = pipeline
        self._dead_letters = dead_letters  # the newest {table: unacknowledged entries} read, or None
        self.dlq_open: dict[str, int] | None = None  # as last evaluated
        # by the source table's qualified name, as the engine counts changes
        self.tables = {t.table.qualified: asset_key(pipeline, t) for t in pipeline.source.tables}
        self.last_lag = 0.0
        self.streamed = False  # the tables' copies were current at some point of this run
        self._reported: dict[str, Counter[str]] = {}  # per table: the counts of its last materialization
        self._materialized_at: dict[str, float] = {}
        self._last_report = 0.0
        self._phase = ""
        self.last_lsn = ""  # the newest LSN reported (the checkpoint while idle)

    def __call__(self, progress: Any) -> None:
        self._check_dead_letters()
        now = time.monotonic()
        self.last_lsn = progress.lsn or self.last_lsn
        if progress.phase == "streaming":
            self.last_lag = progress.lag_seconds
            self.streamed = True
        became_current = progress.phase == "streaming" and self._phase != "streaming"
        self._phase = progress.phase
        if not became_current and now - self._last_report < REPORT_INTERVAL_S:
            return
        self._last_report = now
        metadata = progress_metadata(progress)
        if progress.phase == "snapshot":
            self._context.log.info(
                f"snapshot: {progress.snapshot_rows:,} rows, {progress.snapshot_partitions_done} of "
                f"{progress.snapshot_partitions_total} partitions done"
            )
        for table, key in self.tables.items():
            if progress.phase != "streaming":
                self._context.log_event(dg.AssetObservation(asset_key=key, metadata=metadata))
                continue
            changes = self.changes_since_last(table, progress.table_changes)
            idle_due = now - self._materialized_at.get(table, float("-inf")) >= IDLE_MATERIALIZATION_S
            if any(changes.values()) or idle_due:
                counts = {name: dg.MetadataValue.int(n) for name, n in changes.items()}
                self._context.log_event(dg.AssetMaterialization(asset_key=key, metadata={**metadata, **counts}))
                self._materialized_at[table] = now
            else:
                self._context.log_event(dg.AssetObservation(asset_key=key, metadata=metadata))
            if self._pipeline.checks.max_lag is not None:
                result = lag_check(self._pipeline, key, progress.lag_seconds)
                self._context.log_event(
                    dg.AssetCheckEvaluation(
                        asset_key=key,
                        check_name=LAG_CHECK,
                        passed=result.passed,
                        metadata=result.metadata,
                        severity=result.severity,
                    )
                )

    def _check_dead_letters(self) -> None:
        """Evaluate the dead-letter check of every table whose count changed since the last read."""
        counts = self._dead_letters()
        if counts is None:
            return
        before, self.dlq_open = self.dlq_open, counts
        for table, key in self.tables.items():
            if before is None or before.get(table, 0) != counts.get(table, 0):
                result = dlq_check(self._pipeline, key, counts.get(table, 0))
                self._context.log_event(
                    dg.AssetCheckEvaluation(
                        asset_key=key, check_name=DLQ_CHECK, passed=result.passed, metadata=result.metadata,
                        severity=result.severity,
                    )
                )

    def changes_since_last(self, table: str, table_changes: dict[str, dict[str, int]]) -> dict[str, int]:
        """Rows inserted/updated/deleted (and truncates) since the table's last materialization."""
        total = Counter(table_changes.get(table, {}))
        seen = self._reported.get(table, Counter())
        self._reported[table] = total
        return {name: total[kind] - seen[kind] for kind, name in KINDS}
