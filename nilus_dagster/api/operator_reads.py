"""Read-only views of a CDC pipeline for operators: snapshot progress, pipeline metrics, the
schema change waiting for approval, and column drift between source and sink."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from dagster import DagsterInstance

from nilus_dagster.api import operator_models as om
from nilus_dagster.api.errors import ApiError
from nilus_dagster.api.metrics import STALE_BEAT_S, cdc_lag
from nilus_dagster.api.operator import table_phases
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.slot_positions import slot_positions
from nilus_dagster.components.lifecycle import lifecycle_state
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state.records import Heartbeat

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 3


def _phase(phases: dict[str, str]) -> str:
    values = set(phases.values())
    for phase in ("snapshot", "resync", "streaming"):
        if phase in values:
            return phase
    return "not_started"


def progress(model: ReadModel, pipeline: Pipeline) -> om.ProgressResponse:
    """Per table the copy's partitions and rows (Nanosync's shape), from the snapshot plan the
    run keeps in the state store; a table never copied (snapshot: never) shows zeros."""
    store = model.store
    _, phases = table_phases(store, pipeline)
    planned = {p.table: p for p in store.snapshot_progress(pipeline.tenant, pipeline.name)}
    tables = []
    for name, phase in phases.items():
        plan = planned.get(name)
        if plan is None:
            percent = 100.0 if phase == "streaming" else 0.0
            counts = {"partitions_total": 0, "partitions_done": 0, "rows_total": 0, "rows_done": 0}
        else:
            percent = plan.percent
            counts = {
                "partitions_total": plan.partitions_total,
                "partitions_done": plan.partitions_done,
                "rows_total": max(plan.rows_total, plan.rows_done),
                "rows_done": plan.rows_done,
            }
        tables.append(om.TableProgress(table=name, phase=phase, percent=percent, **counts))  # type: ignore[arg-type]
    return om.ProgressResponse(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        phase=_phase(phases),  # type: ignore[arg-type]
        tables=tables,
    )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _live_rate(beat: Heartbeat | None, age_s: float) -> float:
    if beat is None or beat.detail.get("phase") == "stopped" or age_s > STALE_BEAT_S:
        return 0.0
    rate = beat.detail.get("events_per_s")
    return float(rate) if isinstance(rate, int | float) else 0.0


def metrics(instance: DagsterInstance, model: ReadModel, pipeline: Pipeline) -> om.PipelineMetrics:
    """Nanosync's pipeline metrics from the run's heartbeat, the durable offset and the slot."""
    store = model.store
    beat = store.last_heartbeat(pipeline.tenant, pipeline.name)
    age_s = max(0.0, time.time() - beat.beat_at.timestamp()) if beat is not None else 0.0
    detail = beat.detail if beat is not None else {}
    offset, phases = table_phases(store, pipeline)
    checkpointed: datetime | None = offset.record_insert_ts if offset is not None else None
    changes = detail.get("table_changes") or {}
    failed = detail.get("failed_tables") or {}
    failed_names = set(failed) | {f.table_name for f in store.table_failures(pipeline.tenant, pipeline.name)}
    position = slot_positions(model.declarations, store, only=[pipeline]).get((pipeline.tenant, pipeline.name))
    retained = position.unconfirmed_wal_bytes if position is not None else detail.get("unconfirmed_wal_bytes")
    tables = [
        om.TableMetrics(
            table=name,
            events_total=sum(_int(v) for v in (changes.get(name) or {}).values()),
            failed=name in failed_names,
            last_checkpoint_at=checkpointed if phase == "streaming" else None,
        )
        for name, phase in phases.items()
    ]
    return om.PipelineMetrics(
        pipeline_name=pipeline.name,
        resource_id=pipeline.effective_resource_id,
        state=lifecycle_state(instance, store, pipeline),
        events_per_second=_live_rate(beat, age_s),
        replication_lag_seconds=round(cdc_lag(detail, age_s), 3) if beat is not None else None,
        last_checkpoint_at=checkpointed,
        events_total=_int(detail.get("events_total")),
        sink_errors_total=_int(detail.get("sink_errors_total")),
        retained_wal_bytes=retained if isinstance(retained, int) else None,
        tables=tables,
    )


def _without_facts(schema: dict | None) -> dict | None:
    return {k: v for k, v in schema.items() if k != "source_facts"} if schema is not None else None


def proposed_schema(model: ReadModel, pipeline: Pipeline) -> om.ProposedSchema:
    """The schema change a `schema_changes: pause` pipeline holds for approval, if any."""
    from nilus_dagster.cdc.operations import proposed_schema as pending_change
    from nilus_dagster.components.cdc_config import pipeline_key

    store = model.store
    pending = pending_change(store, pipeline_key(pipeline))
    base = {"pipeline_name": pipeline.name, "resource_id": pipeline.effective_resource_id}
    if pending is None:
        return om.ProposedSchema(**base, pending=False)
    table = pending.get("table")
    current = store.latest_schemas(pipeline.tenant, pipeline.name).get(table) if table else None
    return om.ProposedSchema(
        **base,
        pending=True,
        table=table,
        diff=pending.get("diff"),
        lsn=pending.get("lsn"),
        current_schema=_without_facts(current.table_schema if current is not None else None),
        proposed_schema=pending.get("proposed_schema"),
    )


def drift(model: ReadModel, pipeline: Pipeline) -> om.DriftResponse:
    """Per table: columns added, dropped or retyped in the source against the sink. Names are
    compared with the sink table's columns (`_nilus_*` left out, as the `schema_drift` check
    does), types with the schema the sink follows (its last schema history entry); when the sink
    cannot be read now (e.g. a DuckDB file a run holds) names are compared with that schema too."""
    from nilus_dagster.sources.postgres.catalog import read_table_schema
    from nilus_dagster.sources.postgres.connection import connect_source
    from nilus_dagster.spec.connections import MissingSecret, PostgresConnection

    store = model.store
    connection = model.declarations.source(pipeline)
    if not isinstance(connection, PostgresConnection):
        raise ApiError(503, "unavailable", "the pipeline's source connection is not loaded")
    try:
        dsn = connection.dsn(pipeline.source.connection)
    except MissingSecret as error:
        raise ApiError(503, "unavailable", f"the source cannot be read from the API: {error}") from None
    recorded = store.latest_schemas(pipeline.tenant, pipeline.name)
    sink_columns, sink_error = _sink_columns(model, pipeline)
    tables = []
    try:
        name = pipeline.source.connection
        with connect_source(name, dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            for table in pipeline.source.tables:
                history = recorded.get(table.name)
                followed = TableSchema.from_json(history.table_schema) if history is not None else None
                try:
                    source = read_table_schema(conn, TableName.parse(table.name), generated=False)
                except Exception as error:  # noqa: BLE001 - e.g. dropped in the source: say so per table
                    conn.rollback()
                    tables.append(_unreadable(table.name, f"the source table cannot be read: {error}"))
                    continue
                tables.append(_table_drift(table.name, source, followed, sink_columns.get(table.target_name)))
    except ApiError:
        raise
    except Exception as error:
        raise ApiError(503, "unavailable", f"the source cannot be read: {error}") from None
    if sink_error is not None:
        log.info("drift of %s/%s compared with the schema history: %s", pipeline.tenant, pipeline.name, sink_error)
    return om.DriftResponse(pipeline_name=pipeline.name, resource_id=pipeline.effective_resource_id, tables=tables)


def _sink_columns(model: ReadModel, pipeline: Pipeline) -> tuple[dict[str, list[str]], str | None]:
    """Target table name → its columns (absent when the sink cannot be read), and why not."""
    from nilus_dagster.sinks.base import SinkTable
    from nilus_dagster.sinks.factory import open_pipeline_sink

    spec = model.declarations.spec(pipeline)
    if spec is None:
        return {}, "the pipeline's spec is not loaded"
    tables = pipeline.source.tables
    try:
        sink = open_pipeline_sink(spec, pipeline)
    except Exception as error:  # noqa: BLE001 - fall back to the schema history
        return {}, str(error)
    try:
        columns = {t.target_name: sink.column_names(SinkTable(pipeline.sink.dataset, t.target_name)) for t in tables}
        return {name: [c for c in names if not c.startswith("_nilus_")] for name, names in columns.items()}, None
    except Exception as error:  # noqa: BLE001
        return {}, str(error)
    finally:
        sink.close()


def _unreadable(table: str, error: str) -> om.TableDrift:
    return om.TableDrift(
        table=table, has_drift=False, compared_with="schema_history", added=[], dropped=[], retyped=[], error=error
    )


def _table_drift(
    table: str, source: TableSchema, followed: TableSchema | None, sink_columns: list[str] | None
) -> om.TableDrift:
    names = source.column_names
    if sink_columns is not None and (sink_columns or followed is None):
        compared, held = "sink", sink_columns
    elif followed is not None:
        compared, held = "schema_history", followed.column_names
    else:
        return _unreadable(table, "neither the sink table nor its schema history can be read yet")
    added = [c for c in names if c not in held]
    dropped = [c for c in held if c not in names]
    retyped = []
    if followed is not None:
        kept = {c.name: c for c in followed.columns}
        for column in source.columns:
            old = kept.get(column.name)
            if old is not None and old.type != column.type:
                retyped.append(
                    om.ColumnRetyped(
                        column=column.name,
                        sink_type=old.type.describe(),
                        source_type=column.type.describe(),
                        source_column_type=column.source_type,
                    )
                )
    return om.TableDrift(
        table=table,
        has_drift=bool(added or dropped or retyped),
        compared_with=compared,  # type: ignore[arg-type]
        added=added,
        dropped=dropped,
        retyped=retyped,
    )
