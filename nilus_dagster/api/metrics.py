"""Prometheus metrics: API requests (middleware) and pipeline/CDC gauges read at scrape time.

Served by a separate small app (`create_metrics_app`, port 9090 by default) with `/metrics`,
`/health` (the process is alive) and `/readiness` (Dagster storage and state store answer);
none of them takes the API's bearer token. Storage reads are cached `metrics_cache_seconds`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nilus_dagster.api.services import Services
from nilus_dagster.api.slot_positions import slot_positions
from nilus_dagster.state.control import ControlStore

log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ApiMetrics:
    """The API's own request counters, in a registry per app (tests build many apps)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("nilus_api_requests", "API requests", ["method", "route", "status"], registry=registry)
        self.latency = Histogram(
            "nilus_api_request_duration_seconds",
            "API request latency",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


class RequestMetricsMiddleware:
    """Pure ASGI middleware: count and time each request by route template (never the raw path,
    so no tenant names or ids end up in labels). Templates come from the app's OpenAPI paths."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, templates: Callable[[], Iterable[str]]):
        self.app, self.metrics, self._templates_source = app, metrics, templates
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    def _route(self, path: str) -> str:
        if self._templates is None:
            self._templates = [
                (re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)) + "/?$"), t)
                for t in self._templates_source()
            ]
        return next((t for pattern, t in self._templates if pattern.match(path)), "unmatched")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self._route(scope.get("path", ""))
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)


class StorageCollector(Collector):
    """Pipeline runs by status, last run duration/outcome, CDC lag, events, snapshot progress."""

    def __init__(self, services: Services, cache_seconds: float):
        self.services = services
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_seconds:
                self._cached = (now, self._read())
            return list(self._cached[1])

    def _read(self) -> list[Metric]:
        families: list[Metric] = []
        for section in (self._runs, self._declared, self._cdc, self._holds, self._dlq):
            try:
                families.extend(section())
            except Exception as exc:  # one unreachable store must not empty the whole scrape
                log.warning("metrics section %s failed: %s", section.__name__, exc)
        return families

    def _runs(self) -> list[Metric]:
        runs = self.services.read_model.runs
        by_status = GaugeMetricFamily(
            "nilus_pipeline_runs",
            "Runs in Dagster storage by status",
            labels=["tenant", "pipeline", "status"],
        )
        for (tenant, pipeline, status), count in sorted(runs.status_counts().items()):
            by_status.add_metric([tenant, pipeline, status], count)
        duration = GaugeMetricFamily(
            "nilus_pipeline_last_run_duration_seconds",
            "Duration of the newest finished run",
            labels=["tenant", "pipeline"],
        )
        success = GaugeMetricFamily(
            "nilus_pipeline_last_run_success",
            "1 if the newest finished run succeeded, else 0",
            labels=["tenant", "pipeline"],
        )
        for last in runs.last_finished():
            if last.duration is not None:
                duration.add_metric([last.tenant, last.pipeline], last.duration)
            success.add_metric([last.tenant, last.pipeline], 1.0 if last.status == "SUCCESS" else 0.0)
        return [by_status, duration, success]

    def _declared(self) -> list[Metric]:
        declared = GaugeMetricFamily("nilus_pipelines_declared", "Pipelines declared", labels=["tenant", "type"])
        counts: dict[tuple[str, str], int] = {}
        for p in self.services.declarations.all():
            counts[(p.tenant, p.type)] = counts.get((p.tenant, p.type), 0) + 1
        for labels, count in sorted(counts.items()):
            declared.add_metric(list(labels), count)
        return [declared]

    def _cdc(self) -> list[Metric]:
        store = self.services.store
        if store is None:
            return []
        labels = ["tenant", "pipeline"]
        lag = GaugeMetricFamily(
            "nilus_cdc_lag_seconds",
            "Seconds the sink is behind the source (grows with the heartbeat's age once the run stops beating)",
            labels=labels,
        )
        unconfirmed = GaugeMetricFamily(
            "nilus_cdc_slot_unconfirmed_wal_bytes",
            "Source WAL past the slot's confirmed position (not yet durable in the sink), read from the "
            "source's pg_replication_slots (the run's last heartbeat when the source cannot be read)",
            labels=labels,
        )
        events = CounterMetricFamily("nilus_cdc_events", "Change events applied", labels=labels)
        sink_errors = CounterMetricFamily(
            "nilus_sink_errors", "Sink errors the CDC run met and outlived (retried, waited out, or isolated)",
            labels=labels,
        )
        failed_tables = GaugeMetricFamily(
            "nilus_cdc_failed_tables", "CDC tables held failed (their sink apply kept failing)", labels=labels
        )
        rate = GaugeMetricFamily("nilus_cdc_events_per_second", "Recent change events per second", labels=labels)
        age = GaugeMetricFamily("nilus_cdc_heartbeat_age_seconds", "Seconds since the last heartbeat", labels=labels)
        snapshot = GaugeMetricFamily(
            "nilus_cdc_snapshot_percent", "Initial snapshot progress per table", labels=[*labels, "table"]
        )
        table_events = CounterMetricFamily(
            "nilus_cdc_table_events",
            "Change events applied per table by the live (or last) run",
            labels=[*labels, "table"],
        )
        table_failed = GaugeMetricFamily(
            "nilus_cdc_table_failed", "1 while the table is held failed (its sink apply kept failing)",
            labels=[*labels, "table"],
        )
        held_wal = GaugeMetricFamily(
            "nilus_pipeline_held_retained_wal_bytes",
            "Source WAL the slot of a paused or stopped pipeline retains (grows while held: nothing consumes it)",
            labels=[*labels, "state"],
        )
        heartbeats = store.list_heartbeats()
        slots = slot_positions(self.services.declarations, store)  # also while no run is alive
        for (tenant, pipeline), position in sorted(slots.items()):
            unconfirmed.add_metric([tenant, pipeline], position.unconfirmed_wal_bytes)
        now = time.time()
        for (tenant, pipeline), beat in sorted(heartbeats.items()):
            key = [tenant, pipeline]
            beat_age = max(0.0, now - beat.beat_at.timestamp())
            age.add_metric(key, beat_age)
            lag.add_metric(key, cdc_lag(beat.detail, beat_age))
            reported = [(events, "events_total"), (rate, "events_per_s"), (sink_errors, "sink_errors_total")]
            if (tenant, pipeline) not in slots:
                reported.append((unconfirmed, "unconfirmed_wal_bytes"))
            for family, field in reported:
                value = _number(beat.detail.get(field))
                if value is not None:
                    family.add_metric(key, value)
            failed_tables.add_metric(key, len(beat.detail.get("failed_tables") or {}))
            for table, kinds in sorted((beat.detail.get("table_changes") or {}).items()):
                table_events.add_metric([*key, table], sum(v for v in kinds.values() if isinstance(v, int)))
            for table in sorted(beat.detail.get("failed_tables") or {}):
                table_failed.add_metric([*key, table], 1.0)
        for hold in ControlStore(store).holds():
            position = slots.get((hold.tenant, hold.pipeline))
            if hold.held and position is not None:
                held_wal.add_metric([hold.tenant, hold.pipeline, hold.desired], position.unconfirmed_wal_bytes)
        cdc_pipelines = {(p.tenant, p.name) for p in self.services.declarations.all() if p.type == "cdc"}
        for tenant, pipeline in sorted(cdc_pipelines | set(heartbeats)):
            for table in store.snapshot_progress(tenant, pipeline):
                snapshot.add_metric([tenant, pipeline, table.table], table.percent)
        return [
            lag, unconfirmed, events, rate, age, snapshot, sink_errors, failed_tables, table_events, table_failed,
            held_wal,
        ]

    def _holds(self) -> list[Metric]:
        """Pipelines an operator stopped or paused (1 while held), and for how long."""
        store = self.services.store
        if store is None:
            return []
        held = GaugeMetricFamily(
            "nilus_pipeline_held",
            "1 while an operator holds the pipeline stopped or paused",
            labels=["tenant", "pipeline", "state"],
        )
        since = GaugeMetricFamily(
            "nilus_pipeline_held_seconds",
            "Seconds since the operator stopped or paused it",
            labels=["tenant", "pipeline"],
        )
        now = time.time()
        for hold in ControlStore(store).holds():
            if hold.held:
                held.add_metric([hold.tenant, hold.pipeline, hold.desired], 1.0)
                since.add_metric([hold.tenant, hold.pipeline], max(0.0, now - hold.updated_at.timestamp()))
        return [held, since]

    def _dlq(self) -> list[Metric]:
        store = self.services.store
        if store is None:
            return []
        labels = ["tenant", "pipeline", "table"]
        entries = GaugeMetricFamily("nilus_dlq_entries", "Unacknowledged dead-letter entries", labels=labels)
        events = CounterMetricFamily(
            "nilus_dlq_events", "Rows dead-lettered (entries kept; a purge resets it)", labels=labels
        )
        for key, (unacked, kept) in sorted(store.dead_letter_totals().items()):
            entries.add_metric(list(key), unacked)
            events.add_metric(list(key), kept)
        return [entries, events]


STALE_BEAT_S = 30.0  # a live run beats every few seconds


def cdc_lag(detail: dict[str, Any], beat_age_s: float) -> float:
    """The lag a heartbeat reported, plus its age once it is stale (or the run stopped): a run
    that died or hangs must not keep showing its last, small lag."""
    reported = _number(detail.get("lag_seconds")) or 0.0
    if detail.get("phase") == "stopped" or beat_age_s > STALE_BEAT_S:
        return reported + beat_age_s
    return reported


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def create_metrics_app(services: Services, registry: CollectorRegistry) -> Starlette:
    """The metrics server: `/metrics`, `/health`, `/readiness`, without the API's auth."""

    def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def readiness(_: Request) -> JSONResponse:
        result = services.read_model.health()
        checks = {name: c.ok for name, c in result.components.items()}
        return JSONResponse(
            {"ready": result.status == "ok", "checks": checks},
            status_code=200 if result.status == "ok" else 503,
        )

    return Starlette(routes=[Route("/metrics", metrics), Route("/health", health), Route("/readiness", readiness)])


def build_registry(services: Services) -> tuple[CollectorRegistry, ApiMetrics]:
    registry = CollectorRegistry()
    api_metrics = ApiMetrics(registry)
    registry.register(StorageCollector(services, services.settings.metrics_cache_seconds))
    return registry, api_metrics
