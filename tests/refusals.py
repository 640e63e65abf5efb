"""Checks that a refused pipeline declaration left no trace in the source or the state store."""

from __future__ import annotations

import psycopg

from nilus_dagster.state.store import StateStore


def assert_nothing_created(source_dsn: str, state_dsn: str, tenant: str, pipeline: str) -> None:
    """No replication slot, no publication in the source database; the pipeline is not `active`."""
    with psycopg.connect(source_dsn, autocommit=True) as conn:
        slots = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()")
        assert slots.fetchall() == []
        assert conn.execute("SELECT pubname FROM pg_publication").fetchall() == []
    with StateStore(state_dsn).open() as store:
        state = store.get_pipeline_state(tenant, pipeline)
        assert state is None or state.state != "active", state
