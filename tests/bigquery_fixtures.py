"""Pytest fixtures for the BigQuery emulator: one server per session, one dataset per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from bigquery_emulator import RunningEmulator, running_emulator
from google.cloud import bigquery

from nilus_dagster.sinks.bigquery import BigQuerySink


@pytest.fixture(scope="session")
def bigquery_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    """The local-bigquery emulator, installed into the test cache on first use."""
    with running_emulator(tmp_path_factory.mktemp("bq-emulator")) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def bigquery_client(bigquery_emulator: RunningEmulator) -> Iterator[bigquery.Client]:
    client = bigquery_emulator.client()
    yield client
    client.close()


@pytest.fixture
def bigquery_sink(bigquery_client: bigquery.Client) -> Iterator[BigQuerySink]:
    """A sink on the emulator whose dataset (created on first write) is dropped after the test."""
    dataset = f"nilus_{uuid.uuid4().hex[:10]}"
    sink = BigQuerySink(bigquery_client.project, dataset=dataset, client=bigquery_client)
    yield sink
    bigquery_client.delete_dataset(dataset, delete_contents=True, not_found_ok=True)
