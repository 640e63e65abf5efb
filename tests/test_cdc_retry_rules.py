"""The rules of staying up: which errors a run outlives, the retry budget, `retry_for` in the
spec, and the exported lag of a run that stopped beating."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest


def test_exported_lag_grows_once_the_heartbeat_is_stale() -> None:
    from nilus_dagster.api.metrics import cdc_lag

    assert cdc_lag({"phase": "streaming", "lag_seconds": 1.5}, beat_age_s=2.0) == 1.5
    assert cdc_lag({"phase": "streaming", "lag_seconds": 1.5}, beat_age_s=120.0) == 121.5  # the run died
    assert cdc_lag({"phase": "stopped", "lag_seconds": 0.0}, beat_age_s=40.0) == 40.0  # no run is alive


def test_which_errors_a_run_outlives() -> None:
    from nilus_dagster.cdc.retry import RetryBudget, is_transient, parse_duration
    from nilus_dagster.cdc.slots import ServerClosed, SlotLost, SystemMismatch
    from nilus_dagster.sinks.base import SinkError

    def chained(outer: Exception, cause: Exception) -> Exception:
        try:
            raise outer from cause
        except Exception as error:  # noqa: BLE001
            return error

    assert is_transient(ServerClosed("lost"))
    assert is_transient(chained(SinkError("write failed"), psycopg.OperationalError("server closed")))
    assert not is_transient(chained(SinkError("write failed"), psycopg.errors.NumericValueOutOfRange("too big")))
    assert not is_transient(SlotLost("gone")) and not is_transient(SystemMismatch("other cluster"))
    assert not is_transient(chained(SlotLost("dropped"), psycopg.OperationalError("server closed")))
    assert [parse_duration(d) for d in ("10m", "30s", "1.5h", "500ms", 7)] == [600, 30, 5400, 0.5, 7]
    now = [0.0]
    budget = RetryBudget(5.0, clock=lambda: now[0])
    delays = []
    while (delay := budget.next_delay()) is not None:
        delays.append(delay)
        now[0] += delay
    assert 0.1 <= delays[0] <= 0.2 and all(d <= 10.0 for d in delays) and sum(delays) == pytest.approx(5.0)


def test_retry_for_in_the_spec() -> None:
    from cdc_project import cdc_pipeline

    from nilus_dagster.components.cdc_assets import cdc_config
    from nilus_dagster.spec.errors import PipelineSpecError, validate_spec
    from nilus_dagster.spec.project import PipelinesSpec

    def spec(**cdc: Any) -> dict[str, Any]:
        return {"connections": {"src": {"type": "postgres", "host": "h", "database": "db", "user": "u"},
                                "sink": {"type": "duckdb", "path": "/tmp/x.duckdb"}},
                "pipelines": [cdc_pipeline("p", ["public.t"], cdc=cdc)]}

    loaded = validate_spec(PipelinesSpec, spec(retry_for="30s"), "defs.yaml")
    assert cdc_config(loaded, loaded.pipelines[0]).retry_for_s == 30.0
    default = validate_spec(PipelinesSpec, spec(), "defs.yaml")
    assert cdc_config(default, default.pipelines[0]).retry_for_s == 600.0
    with pytest.raises(PipelineSpecError, match="not a duration"):
        validate_spec(PipelinesSpec, spec(retry_for="soon"), "defs.yaml")
