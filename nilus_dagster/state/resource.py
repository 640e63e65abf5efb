"""The state store as a Dagster resource, shaped like dagster-duckdb's `DuckDBResource`."""

from __future__ import annotations

import dagster as dg
from pydantic import Field, PrivateAttr

from nilus_dagster.state.store import StateStore

STATE_DSN_ENV = "NILUS_STATE_DSN"


class NilusStateStore(dg.ConfigurableResource):
    """Pipeline state in PostgreSQL: batch cursors, CDC offsets, schema history, snapshot progress.

    Examples:
        .. code-block:: python

            defs = dg.Definitions(
                resources={"nilus_state": NilusStateStore(dsn=dg.EnvVar("NILUS_STATE_DSN"))}
            )
    """

    dsn: str = Field(description="PostgreSQL DSN of the state store; pass it as dg.EnvVar, never inline.")
    schema_name: str = Field(default="nilus", description="Schema the store creates and migrates.")

    _store: StateStore | None = PrivateAttr(default=None)

    def get_store(self) -> StateStore:
        """The open, migrated store (opened on first use, shared for the run)."""
        if self._store is None:
            self._store = StateStore(self.dsn, schema=self.schema_name).open()
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
