"""Dead-letter replays in a CDC run (a mixin of `CdcRun`): requests made by the
`<tenant>__<pipeline>__replay_dead_letters` job (or `POST /tenants/{t}/dlq/replay`) are carried out
on the stream thread, when the stream starts and between polls (never inside a transaction being
applied in chunks), after the batch of whole transactions is flushed; see cdc/dlq_replay.py for
why that is exact. The request and the entries it replayed are closed in one store transaction.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg

from nilus_dagster.cdc.dlq_replay import ReplayOutcome, replay_table_entries
from nilus_dagster.cdc.state_writer import BackgroundRead
from nilus_dagster.sinks.base import SinkError, SinkUnavailable
from nilus_dagster.state.dlq_replays import DlqReplay

if TYPE_CHECKING:
    from nilus_dagster.cdc.applier import ChangeApplier
    from nilus_dagster.cdc.run_config import CdcPipelineConfig
    from nilus_dagster.sinks.base import Sink
    from nilus_dagster.state.store import StateStore

_log = logging.getLogger(__name__)


class ReplaySteps:
    """Needs the run's collaborators (declared for type checkers only)."""

    if TYPE_CHECKING:
        config: CdcPipelineConfig
        store: StateStore
        sink: Sink
        run_id: str
        heartbeat_interval_s: float
        _catalog: psycopg.Connection[Any] | None

    def _init_replays(self) -> None:
        self._replay_reader: BackgroundRead | None = None
        self._replays_seen = time.monotonic()  # a pending request read after this is due

    def _close_replays(self) -> None:
        if self._replay_reader is not None:
            self._replay_reader.close()

    def _replay_tick(self, applier: ChangeApplier) -> bool:
        """Checked between polls (a pending request is read in the background every heartbeat);
        never ends the stream."""
        if applier.applying_in_chunks or self._catalog is None:
            return False
        if self._replay_reader is None:
            key = self.config.key
            self._replay_reader = BackgroundRead(
                lambda: bool(self.store.pending_dlq_replays(key.tenant, key.pipeline)), self.heartbeat_interval_s
            )
        if self._replay_reader.value_since(self._replays_seen):
            applier._flush_pending()  # the sink holds every whole transaction received: see cdc/dlq_replay.py
            self._replay_pending(applier, self._catalog)
        return False

    def _replay_pending(self, applier: ChangeApplier, conn: psycopg.Connection[Any]) -> None:
        """Carry out the pending replay requests (the applier holds no unapplied whole transaction)."""
        self._replays_seen = time.monotonic()
        key = self.config.key
        for request in self.store.pending_dlq_replays(key.tenant, key.pipeline):
            self._carry_out(request, applier, conn)

    def _carry_out(self, request: DlqReplay, applier: ChangeApplier, conn: psycopg.Connection[Any]) -> None:
        entries = [e for e in self.store.dead_letters_by_id(request.entry_ids) if e.acked_at is None]
        tables = {t.source.name.qualified: t for t in applier.tables.values()}
        by_table: dict[str, list[Any]] = {}
        for entry in entries:
            by_table.setdefault(entry.table_name, []).append(entry)
        total = ReplayOutcome()
        for name, group in by_table.items():
            table = tables.get(name)
            why = _not_replayable(table)
            if why is not None:
                total.refused.append(f"{name} {why}")
                continue
            assert table is not None
            try:
                outcome = replay_table_entries(conn, self.sink, table, group, soft_delete=self.config.soft_delete)
            except (SinkUnavailable, psycopg.OperationalError):
                raise  # transient: the run reconnects, the request stays pending
            except (SinkError, psycopg.Error, ValueError) as error:
                total.refused.append(f"{name}: {error}")
                continue
            total.replayed += outcome.replayed
            total.refused += outcome.refused
            total.upserted += outcome.upserted
            total.deleted += outcome.deleted
        skipped = len(request.entry_ids) - len(entries)
        message = (
            f"replayed {len(total.replayed)} dead-letter entries from the current source rows "
            f"({total.upserted} rows written, {total.deleted} deleted)"
            + (f"; {skipped} already acknowledged" if skipped else "")
            + ("; not replayed: " + "; ".join(total.refused) if total.refused else "")
        )
        self.store.finish_dlq_replay(
            request.id, "failed" if total.refused else "done", message, total.replayed, self.run_id
        )
        (_log.warning if total.refused else _log.info)("dead-letter replay %d: %s", request.id, message)


def _not_replayable(table: Any) -> str | None:
    if table is None:
        return "is not streamed by this pipeline"
    if table.failed is not None:
        return f"is failed ({table.failed}): retry or resync it, then replay"
    if table.held:
        return "is held (a schema change waiting, on_error: pause_table, or a resync): replay once it streams again"
    return None

