"""The state store: everything a pipeline must remember between runs, in PostgreSQL."""

from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.resource import NilusStateStore
from nilus_dagster.state.store import StateStore, StateStoreError

__all__ = ["NilusStateStore", "PipelineKey", "StateStore", "StateStoreError"]
