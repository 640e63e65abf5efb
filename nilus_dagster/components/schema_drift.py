"""The asset check `schema_drift`: the source table's columns against the sink table's columns.

Batch: after every load (the columns the load read against the sink's after its commit). CDC:
when the copy becomes current, then every `DRIFT_INTERVAL_S` and at the run's end, against the
source catalog at that moment (stored generated columns left out: CDC does not replicate them).
The result lists the columns missing in the sink and those only the sink has (e.g. dropped in the
source: `evolve` keeps them); nilus's own `_nilus_*` columns are not compared.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import dagster as dg

from nilus_dagster.components.batch_checks import check_severity
from nilus_dagster.schema import TableName
from nilus_dagster.spec.pipelines import Pipeline

SCHEMA_DRIFT_CHECK = "schema_drift"
DRIFT_INTERVAL_S = 600.0
_METADATA_PREFIX = "_nilus_"

_SOURCE_COLUMNS_SQL = """
SELECT attname FROM pg_attribute
WHERE attrelid = format('%%I.%%I', %s::text, %s::text)::regclass
  AND attnum > 0 AND NOT attisdropped AND (%s OR attgenerated = '')
ORDER BY attnum
"""


def drift_check_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        SCHEMA_DRIFT_CHECK, asset=key, description="The sink table has the source table's columns, and no others."
    )


def drift_result(
    pipeline: Pipeline, key: dg.AssetKey, source_columns: Iterable[str], sink_columns: Iterable[str]
) -> dg.AssetCheckResult:
    source = list(source_columns)
    sink = [c for c in sink_columns if not c.startswith(_METADATA_PREFIX)]
    missing = [c for c in source if c not in sink]
    only_in_sink = [c for c in sink if c not in source]
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=SCHEMA_DRIFT_CHECK,
        passed=not missing and not only_in_sink,
        severity=check_severity(pipeline),
        metadata={
            "missing_in_sink": dg.MetadataValue.text(", ".join(missing)),
            "only_in_sink": dg.MetadataValue.text(", ".join(only_in_sink)),
            "source_columns": dg.MetadataValue.int(len(source)),
            "sink_columns": dg.MetadataValue.int(len(sink)),
        },
    )


def source_columns(conn: Any, table: TableName, *, generated: bool) -> list[str]:  # a psycopg connection
    """The table's columns in the source catalog now (`generated=False`: without generated ones)."""
    return [r[0] for r in conn.execute(_SOURCE_COLUMNS_SQL, (table.schema, table.name, generated)).fetchall()]


class CdcDriftWatch:
    """Evaluates `schema_drift` for a CDC run's tables when due (`due()`, then `evaluate()`)."""

    def __init__(self, pipeline: Pipeline, dsn: str, sink: Any, tables: dict[TableName, tuple[dg.AssetKey, Any]]):
        self._pipeline, self._dsn, self._sink, self._tables = pipeline, dsn, sink, tables
        self._last = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self._last >= DRIFT_INTERVAL_S

    def evaluate(self) -> list[dg.AssetCheckResult]:
        """One result per table; none if the source cannot be read now (the next round retries)."""
        from nilus_dagster.sources.postgres.connection import connect_source

        self._last = time.monotonic()
        try:
            with connect_source(self._pipeline.source.connection, self._dsn, autocommit=True) as conn:
                columns = {name: source_columns(conn, name, generated=False) for name in self._tables}
            return [
                drift_result(self._pipeline, key, columns[name], self._sink.column_names(target))
                for name, (key, target) in self._tables.items()
            ]
        except Exception:  # noqa: BLE001 - a check never breaks the stream; the next round retries
            return []
