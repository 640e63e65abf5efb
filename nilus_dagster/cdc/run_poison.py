"""The `on_error` steps of a CDC run (a mixin of `CdcRun`): a batch with rows the sink cannot take.

* `dlq`: the rows become dead-letter entries in the state store, written (and committed) before
  the sink transaction that applies the rest of the batch with the table's checkpoint. So the
  checkpoint never passes a row whose entry is not durable; a replay after a crash finds its
  entries already there (unique per table, commit LSN and key) and records nothing twice. A state
  store that is down raises a transient error: the run reconnects and replays (cdc/retry.py).
* `pause_table`: the table is held (none of its changes applied, its checkpoint and the slot's
  acknowledgement stay before the row), the pipeline state `paused` names it and why; the other
  tables flow. A resync of the table (after fixing the row in the source) ends the hold. Inside a
  transaction applied in chunks the sink transaction is rolled back and applied again without the
  table (cdc/spanning.py); where that cannot undo the pieces (BigQuery) the run fails instead.
* `fail`: the run fails naming the table, row, column, value and LSN.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from nilus_dagster.cdc.lsn import format_lsn
from nilus_dagster.cdc.poison import Changes, PoisonRow, PoisonRowRefused, drop_poison, find_poison
from nilus_dagster.sinks.base import ChangeSet
from nilus_dagster.sources.postgres.text_codec import ValueDecodeError
from nilus_dagster.state.dead_letters import NewDeadLetter

if TYPE_CHECKING:
    from nilus_dagster.cdc.applier import StreamTable
    from nilus_dagster.cdc.run_config import CdcPipelineConfig
    from nilus_dagster.state.store import StateStore

_log = logging.getLogger(__name__)
PAUSED_DETAIL = "paused_tables"  # pipeline state detail: table → why it is held (on_error: pause_table)


class PoisonSteps:
    """Needs the run's collaborators (declared for type checkers only)."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        store: StateStore
        run_id: str

    def _on_poison(
        self, table: StreamTable, changes: Changes, error: ValueDecodeError, spanning: bool
    ) -> ChangeSet | None:
        """`spanning`: inside a transaction applied in chunks whose pieces a hold cannot undo."""
        poison = find_poison(changes)
        if not poison:
            raise error
        policy = self.config.on_error
        if policy == "fail" or (policy == "pause_table" and spanning):
            why = (
                "on_error is 'fail' (set it to dlq or pause_table to let the other rows flow)"
                if policy == "fail"
                else "on_error 'pause_table' cannot hold a table inside a transaction applied in chunks "
                "(more than batch_max_rows changes) on this sink: use dlq, or raise batch_max_rows"
            )
            raise PoisonRowRefused(f"{describe(table, poison[0])}; {why}") from error
        if policy == "pause_table":
            table.held = True
            self._hold_for_poison(table, poison[0], len(poison))
            return None
        self._dead_letter(table, poison)
        drop_poison(changes, poison)
        return changes.to_change_set()

    def _dead_letter(self, table: StreamTable, poison: list[PoisonRow]) -> None:
        entries = [
            NewDeadLetter(
                table_name=table.source.name.qualified,
                commit_lsn=row.commit_lsn,
                key_hash=row.key_hash,
                row_key=row.key,
                row_data=row.row,
                op=row.op,
                error_kind=row.error_kind,
                column_name=row.column,
                message=row.message,
            )
            for row in poison
        ]
        added = self.store.record_dead_letters(self.config.key, entries, self.run_id)  # durable before the sink
        _log.warning(
            "%s: %d row(s) the sink cannot take went to the dead-letter queue (%d new), first: %s",
            table.source.name, len(poison), added, describe(table, poison[0]),
        )

    def _hold_for_poison(self, table: StreamTable, row: PoisonRow, rows: int) -> None:
        key = self.config.key
        current = self.store.get_pipeline_state(key.tenant, key.pipeline)
        detail: dict[str, Any] = dict(current.detail) if current else {}
        status = current.state if current is not None and current.state != "active" else "paused"
        paused = dict(detail.get(PAUSED_DETAIL) or {})
        paused[table.source.name.qualified] = {
            "reason": describe(table, row),
            "error_kind": row.error_kind,
            "column": row.column,
            "lsn": format_lsn(row.commit_lsn),
            "rows": rows,
        }
        self.store.set_pipeline_state(key, status, {**detail, PAUSED_DETAIL: paused})
        _log.warning("%s is held (on_error: pause_table): %s", table.source.name, describe(table, row))


def describe(table: StreamTable, row: PoisonRow) -> str:
    return (
        f"{table.source.name}: the {_OPS.get(row.op, row.op)} of the row with key {row.key} (transaction "
        f"committed at LSN {format_lsn(row.commit_lsn)}) has a value the sink cannot take: {row.message}"
    )


_OPS = {"I": "insert", "U": "update", "D": "delete"}


def release_paused(detail: dict[str, Any], tables: set[str]) -> dict[str, Any]:
    """The state detail without the holds of `tables` (resynced: they follow the source again)."""
    paused = {t: why for t, why in (detail.get(PAUSED_DETAIL) or {}).items() if t not in tables}
    rest = {k: v for k, v in detail.items() if k != PAUSED_DETAIL}
    return {**rest, PAUSED_DETAIL: paused} if paused else rest
