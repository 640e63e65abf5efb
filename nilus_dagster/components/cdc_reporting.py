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

from nilus_dagster.components.cdc_checks import as_evaluation, dlq_check, lag_check, row_parity_check
from nilus_dagster.components.naming import asset_key
from nilus_dagster.components.schema_drift import CdcDriftWatch

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


def _table_snapshot_metadata(table_progress: dict[str, float] | None) -> dict[str, dg.MetadataValue]:
    """A table's own snapshot progress (partitions of this run, rows, percent), if it has any."""
    if not table_progress:
        return {}
    return {
        "table_snapshot_rows": dg.MetadataValue.int(int(table_progress["rows"])),
        "table_snapshot_partitions_done": dg.MetadataValue.int(int(table_progress["partitions_done"])),
        "table_snapshot_partitions_total": dg.MetadataValue.int(int(table_progress["partitions_total"])),
        "table_snapshot_percent": dg.MetadataValue.float(float(table_progress["percent"])),
    }


class CdcAssetReporter:
    """Receives a run's progress; logs materializations and observations of its table assets."""

    def __init__(
        self,
        context: dg.AssetExecutionContext,
        pipeline: Any,
        drift: CdcDriftWatch | None = None,
        dead_letters: Callable[[], Any] = lambda: None,
    ) -> None:
        self._context = context
        self._drift = drift  # schema_drift, evaluated when the copy becomes current and then when due
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
        self._parity_round = 0
        self._parity_skipped: dict[str, str] = {}

    def __call__(self, progress: Any) -> None:
        self._check_dead_letters()
        now = time.monotonic()
        self.last_lsn = progress.lsn or self.last_lsn
        if progress.phase == "streaming":
            self.last_lag = progress.lag_seconds
            self.streamed = True
        self._log_row_parity(progress)
        became_current = progress.phase == "streaming" and self._phase != "streaming"
        # a new phase, and the snapshot's last partition, are reported at once
        told_now = progress.phase != self._phase or (
            progress.phase == "snapshot" and progress.snapshot_partitions_done == progress.snapshot_partitions_total
        )
        self._phase = progress.phase
        if self._drift is not None and progress.phase == "streaming" and (became_current or self._drift.due()):
            for result in self._drift.evaluate():
                self._context.log_event(as_evaluation(result))
        if not told_now and now - self._last_report < REPORT_INTERVAL_S:
            return
        self._last_report = now
        metadata = progress_metadata(progress)
        if progress.phase == "snapshot":
            self._log_snapshot(progress)
        for table, key in self.tables.items():
            if progress.phase != "streaming":
                extra = _table_snapshot_metadata(getattr(progress, "snapshot_tables", {}).get(table))
                self._context.log_event(dg.AssetObservation(asset_key=key, metadata={**metadata, **extra}))
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
                self._context.log_event(as_evaluation(lag_check(self._pipeline, key, progress.lag_seconds)))

    def _log_snapshot(self, progress: Any) -> None:
        tables = getattr(progress, "snapshot_tables", {})
        per_table = "; ".join(
            f"{t} {p['percent']:g}% ({p['partitions_done']:g}/{p['partitions_total']:g} partitions, "
            f"{p['rows']:,.0f} rows)"
            for t, p in sorted(tables.items())
        )
        self._context.log.info(
            f"snapshot: {progress.snapshot_rows:,} rows, {progress.snapshot_partitions_done} of "
            f"{progress.snapshot_partitions_total} partitions done" + (f": {per_table}" if per_table else "")
        )

    def _log_row_parity(self, progress: Any) -> None:
        """A row-count parity round's results as soon as it has them; a skipped round in the log."""
        for table, reason in getattr(progress, "row_parity_skipped", {}).items():
            if self._parity_skipped.get(table) != reason:
                self._context.log.info(f"row_count_parity of {table} skipped this round: {reason}")
        self._parity_skipped = dict(getattr(progress, "row_parity_skipped", {}))
        if getattr(progress, "row_parity_round", 0) == self._parity_round:
            return
        self._parity_round = progress.row_parity_round
        for table, parity in progress.row_parity.items():
            if table in self.tables:
                result = row_parity_check(self._pipeline, self.tables[table], parity)
                self._context.log_event(as_evaluation(result))

    def _check_dead_letters(self) -> None:
        """Evaluate the dead-letter check of every table whose count changed since the last read."""
        counts = self._dead_letters()
        if counts is None:
            return
        before, self.dlq_open = self.dlq_open, counts
        for table, key in self.tables.items():
            if before is None or before.get(table, 0) != counts.get(table, 0):
                self._context.log_event(as_evaluation(dlq_check(self._pipeline, key, counts.get(table, 0))))

    def changes_since_last(self, table: str, table_changes: dict[str, dict[str, int]]) -> dict[str, int]:
        """Rows inserted/updated/deleted (and truncates) since the table's last materialization."""
        total = Counter(table_changes.get(table, {}))
        seen = self._reported.get(table, Counter())
        self._reported[table] = total
        return {name: total[kind] - seen[kind] for kind, name in KINDS}
