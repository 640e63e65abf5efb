"""Fixtures shared by the CDC tests (a plugin of conftest.py): `store`, an open state store, and
`sink`, a DuckDB sink by default (a module testing other sinks defines its own `sink`, which wins)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from batch_project import SinkTarget

from nilus_dagster.state.store import StateStore


@pytest.fixture
def sink(duckdb_sink: SinkTarget) -> SinkTarget:
    return duckdb_sink


@pytest.fixture
def store(state_dsn: str) -> Iterator[StateStore]:
    with StateStore(state_dsn).open() as opened:
        yield opened
