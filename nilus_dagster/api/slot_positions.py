"""The slot's side of CDC lag, read by the metrics server straight from each source database.

A run reports its slot's unconfirmed WAL in its heartbeats, but a run that died (or never started)
reports nothing: the metrics server then reads `pg_replication_slots` itself, so
`nilus_cdc_slot_unconfirmed_wal_bytes` keeps rising while changes pile up and no run is alive.
The slot is the one the pipeline's state names (recorded when the slot was made); the DSN is the
pipeline's declared source connection, read from the environment of the API process. A source that
is unreachable, or whose DSN is not set there, is left out (the heartbeat's value stands).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from nilus_dagster.api.declarations import Declarations
from nilus_dagster.cdc.lag import SourcePosition, source_position
from nilus_dagster.sources.postgres.connection import connect_source
from nilus_dagster.spec.connections import MissingSecret, PostgresConnection
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.state.store import StateStore

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 3  # a scrape must not hang on a source that is down


@dataclass(frozen=True)
class _Slot:
    tenant: str
    pipeline: str
    slot: str


def slot_positions(
    declarations: Declarations, store: StateStore, only: Iterable[Pipeline] | None = None
) -> dict[tuple[str, str], SourcePosition]:
    """(tenant, pipeline) → the server's WAL position and the slot's unconfirmed bytes, for every
    declared CDC pipeline (or those of `only`) whose slot exists; one short connection per source
    database."""
    by_dsn: dict[tuple[str, str], list[_Slot]] = {}
    for pipeline in declarations.all() if only is None else only:
        if pipeline.type != "cdc":
            continue
        connection = declarations.source(pipeline)
        state = store.get_pipeline_state(pipeline.tenant, pipeline.name)
        slot = state.detail.get("slot") if state is not None else None
        if not isinstance(connection, PostgresConnection) or not slot:
            continue
        try:
            dsn = connection.dsn(pipeline.source.connection)
        except MissingSecret as exc:
            log.debug("slot of %s/%s not read: %s", pipeline.tenant, pipeline.name, exc)
            continue
        by_dsn.setdefault((pipeline.source.connection, dsn), []).append(_Slot(pipeline.tenant, pipeline.name, slot))
    positions: dict[tuple[str, str], SourcePosition] = {}
    for (name, dsn), slots in by_dsn.items():
        try:
            with connect_source(name, dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                for one in slots:
                    position = source_position(conn, one.slot, deadline_s=CONNECT_TIMEOUT_S)
                    if position is not None:
                        positions[(one.tenant, one.pipeline)] = position
        except Exception as exc:  # noqa: BLE001 - one unreachable source must not empty the scrape
            log.warning("cannot read the replication slots of connection '%s': %s", name, exc)
    return positions
