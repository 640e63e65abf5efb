"""The asset checks of a CDC table: `max_lag` (lag against `checks.max_lag`), `row_count_parity`
(source rows against sink rows at a matched point, cdc/row_parity.py, every `checks.row_count_interval`),
`schema_drift` (components/schema_drift.py), `dead_letters` (no unacknowledged dead-letter
entries, on_error: dlq) and `held_wal_retention` (components/held_wal.py, while paused or stopped).

Results are logged as check evaluations while the run streams (severity `checks.severity`).
"""

from __future__ import annotations

from typing import Any

import dagster as dg

from nilus_dagster.components.batch_checks import ROW_COUNT_CHECK, check_severity, row_count_result
from nilus_dagster.components.held_wal import held_wal_check_specs
from nilus_dagster.components.schema_drift import drift_check_spec
from nilus_dagster.spec.pipelines import Pipeline

LAG_CHECK = "max_lag"
DLQ_CHECK = "dead_letters"


def has_cdc_row_count_check(pipeline: Pipeline) -> bool:
    """Off with `soft_delete` (the sink keeps deleted rows) or `checks.row_count_interval: null`."""
    return pipeline.checks.row_count_interval is not None and not pipeline.cdc.soft_delete


def cdc_check_specs(pipeline: Pipeline, specs: list[dg.AssetSpec]) -> list[dg.AssetCheckSpec]:
    checks = []
    if pipeline.checks.max_lag is not None:
        description = f"The table's replication lag stays within {pipeline.checks.max_lag} (checks.max_lag)."
        checks += [dg.AssetCheckSpec(LAG_CHECK, asset=spec.key, description=description) for spec in specs]
    if has_cdc_row_count_check(pipeline):
        description = (
            "The sink table holds as many rows as the source table, both counted at one point of the stream "
            f"(every {pipeline.checks.row_count_interval}; a round that cannot match the point exactly is skipped)."
        )
        checks += [dg.AssetCheckSpec(ROW_COUNT_CHECK, asset=spec.key, description=description) for spec in specs]
    drift = [drift_check_spec(spec.key) for spec in specs]
    return [*checks, *drift, *dlq_check_specs(specs), *held_wal_check_specs(specs)]


def lag_check(pipeline: Pipeline, key: dg.AssetKey, lag_seconds: float) -> dg.AssetCheckResult:
    """The lag check's result for one table (logged while streaming, yielded at the run's end)."""
    bound = pipeline.checks.max_lag_seconds
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=LAG_CHECK,
        passed=lag_seconds <= bound,  # type: ignore[operator]
        severity=check_severity(pipeline),
        metadata={"lag_seconds": dg.MetadataValue.float(lag_seconds), "max_lag_seconds": dg.MetadataValue.float(bound)},
    )


def row_parity_check(pipeline: Pipeline, key: dg.AssetKey, parity: dict[str, Any]) -> dg.AssetCheckResult:
    """A row-count parity round's result (cdc/row_parity.py RowParity, as a dict) for one table."""
    return row_count_result(
        pipeline,
        key,
        parity["source_rows"],
        parity["sink_rows"],
        sink_rows_now=dg.MetadataValue.int(parity["sink_rows_now"]),
        lsn=dg.MetadataValue.text(parity["lsn"]),
    )


def as_evaluation(result: dg.AssetCheckResult) -> dg.AssetCheckEvaluation:
    """A check result logged from inside a running op (`context.log_event`)."""
    assert result.asset_key is not None and result.check_name is not None
    return dg.AssetCheckEvaluation(
        asset_key=result.asset_key,
        check_name=result.check_name,
        passed=result.passed,
        metadata=result.metadata,
        severity=result.severity,
    )


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


def dlq_check(pipeline: Pipeline, key: dg.AssetKey, unacked: int | None) -> dg.AssetCheckResult:
    """Passes while the table has no unacknowledged entries (None: the state store did not answer)."""
    metadata = {"unacknowledged_entries": dg.MetadataValue.int(unacked)} if unacked is not None else {
        "unknown": dg.MetadataValue.text("the state store did not answer")
    }
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=DLQ_CHECK,
        passed=unacked == 0,
        severity=check_severity(pipeline),
        metadata=metadata,
    )
