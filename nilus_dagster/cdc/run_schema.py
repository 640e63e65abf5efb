"""The schema-change steps of a CDC run (a mixin of `CdcRun`): a Relation message that changed a
table's schema is failed, held for approval, or evolved in the sink, whose older rows are brought
in line with what PostgreSQL now reports for them (see source_facts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg
import pyarrow as pa

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.run_config import APPROVED_DETAIL, CdcPipelineConfig, CdcPipelineFailed
from nilus_dagster.cdc.source_facts import ChangeVerdict, TableFacts, judge_schema_change, read_table_facts
from nilus_dagster.cdc.stream import SchemaChangeRefused, SchemaEvent
from nilus_dagster.schema import TableName, TableSchema
from nilus_dagster.sinks.base import Sink
from nilus_dagster.sources.postgres.text_codec import text_to_arrow
from nilus_dagster.state.store import StateStore


class SchemaSteps:
    """Needs the run's collaborators and helpers (declared for type checkers only)."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        sink: Sink
        store: StateStore
        _facts: dict[TableName, TableFacts]
        _catalog: psycopg.Connection[Any] | None
        _fail: Callable[..., CdcPipelineFailed]
        _set_state: Callable[..., None]
        _record_schema: Callable[[TableName, TableSchema, int, Any], None]
        request_resync: Callable[[Sequence[str | TableName], str], list[int]]

    def _schema_policy(self, event: SchemaEvent) -> str:
        config = self.config
        policy = config.schema_changes
        if policy == "fail" or (policy == "evolve" and not event.diff.evolvable):
            raise (
                self._fail(
                    f"{event.table}: the source schema changed ({event.diff.describe()}) and schema_changes is "
                    f"'{policy}'",
                    table=event.table.qualified,
                    diff=event.diff.describe(),
                )
                if policy == "fail"
                else SchemaChangeRefused(
                    f"{event.table}: the source schema changed in a way evolve cannot apply "
                    f"({event.diff.describe()}): set schema_changes to pause to review it"
                )
            )
        if policy == "pause" and self._take_approval(event):
            return self._evolve(event)
        if policy == "pause":
            self._set_state(
                "pending_schema_approval",
                table=event.table.qualified,
                proposed_schema=event.schema.to_json(),
                diff=event.diff.describe(),
                lsn=format_lsn(event.lsn),
            )
            return "pause"
        return self._evolve(event)

    def _take_approval(self, event: SchemaEvent) -> bool:
        """True (once) when an operator approved exactly this change."""
        state = self.store.get_pipeline_state(self.config.key.tenant, self.config.key.pipeline)
        approved = state.detail.get(APPROVED_DETAIL) if state is not None else None
        if not approved or approved.get("table") != event.table.qualified:
            return False
        if approved.get("schema") != event.schema.to_json():
            return False
        detail = {k: v for k, v in state.detail.items() if k != APPROVED_DETAIL}  # type: ignore[union-attr]
        self.store.set_pipeline_state(self.config.key, state.state, detail)  # type: ignore[union-attr]
        return True

    def _evolve(self, event: SchemaEvent) -> str:
        """Apply the change to the sink table, and bring the rows it already had in line: the value
        PostgreSQL now reports for them in added columns, or a re-read of the table when the change
        touched rows without streaming them (see source_facts)."""
        facts = read_table_facts(self._catalog, event.table) if self._catalog is not None else None
        verdict = judge_schema_change(self._facts.get(event.table), facts, event.diff)
        if verdict.resync_reason is None and event.diff.retyped:
            verdict = ChangeVerdict({}, "column types changed in a way the sink columns cannot follow in place")
        if verdict.resync_reason is not None:
            return self._resync_after_schema_change(event, verdict.resync_reason)
        target = next(t.target for t in self.config.tables if t.table == event.table)
        created = set(self.sink.prepare_table(target, event.schema, cdc=True))
        if event.diff.widened:
            self.sink.widen_columns(target, [event.schema.column(name) for name, _, _ in event.diff.widened])
        for name, text in verdict.fill.items():
            if text is None and name in created:
                continue  # a column the sink just created is NULL in every row already
            column = event.schema.column(name)
            value = text_to_arrow(pa.array([text], pa.string()), column.type, column=f"{event.table}.{name}")
            self.sink.fill_column(target, column, value, before_lsn=event.lsn)
        event.fill.update(verdict.fill)  # the open transaction's rows written before the change, too
        self._record_schema(event.table, event.schema, event.lsn, facts and facts.restricted_to(event.schema))
        return "evolve"

    def _resync_after_schema_change(self, event: SchemaEvent, reason: str) -> str:
        """PostgreSQL changed rows of the table without streaming them: hold the table (its changes
        until then are dropped, its acknowledgement frozen) and re-read it at the next safe point."""
        self.request_resync([event.table], f"{event.diff.describe()}: {reason}")
        return "pause"


