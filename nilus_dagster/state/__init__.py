"""The state store: everything a pipeline must remember between runs, in PostgreSQL."""

from typing import TYPE_CHECKING, Any

from nilus_dagster.state.records import PipelineKey
from nilus_dagster.state.store import StateStore, StateStoreError

if TYPE_CHECKING:
    from nilus_dagster.state.resource import NilusStateStore


def __getattr__(name: str) -> Any:
    """`NilusStateStore` (the Dagster resource) is imported on first use: the engine (CDC runs,
    batch loads, the API's readers) must not pay for importing Dagster."""
    if name == "NilusStateStore":
        from nilus_dagster.state.resource import NilusStateStore

        return NilusStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NilusStateStore", "PipelineKey", "StateStore", "StateStoreError"]
