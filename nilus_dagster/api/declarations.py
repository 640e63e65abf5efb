"""Which pipelines a tenant has: read from the same defs folder Dagster loads.

The folder is rescanned at most every `reload_seconds`; files are re-parsed only when one changed
(path, size, mtime). A broken edit keeps the last good declarations (and is logged), so the API
never lists less than Dagster last loaded successfully.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from nilus_dagster.spec.connections import Connection
from nilus_dagster.spec.loading import load_declared_pipelines
from nilus_dagster.spec.pipelines import Pipeline
from nilus_dagster.spec.project import PipelinesSpec

log = logging.getLogger(__name__)


class DeclarationsUnavailable(Exception):
    """The defs folder never loaded."""


class Declarations:
    def __init__(self, defs_dir: Path, reload_seconds: float = 5.0):
        self.defs_dir = Path(defs_dir)
        self.reload_seconds = reload_seconds
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._fingerprint: tuple | None = None
        self._by_tenant: dict[str, list[Pipeline]] | None = None
        self._sources: dict[tuple[str, str], Connection] = {}
        self._specs: dict[tuple[str, str], PipelinesSpec] = {}
        self._error: str | None = None

    def _scan(self) -> tuple:
        files = sorted(self.defs_dir.rglob("defs.yaml")) if self.defs_dir.is_dir() else []
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.reload_seconds and self._by_tenant is not None:
            return
        with self._lock:
            if now - self._checked_at < self.reload_seconds and self._by_tenant is not None:
                return
            self._checked_at = now
            try:
                fingerprint = self._scan()
                if fingerprint == self._fingerprint:
                    return
                by_tenant: dict[str, list[Pipeline]] = {}
                sources: dict[tuple[str, str], Connection] = {}
                specs: dict[tuple[str, str], PipelinesSpec] = {}
                for declared in load_declared_pipelines(self.defs_dir):
                    pipeline = declared.pipeline
                    by_tenant.setdefault(pipeline.tenant, []).append(pipeline)
                    sources[(pipeline.tenant, pipeline.name)] = declared.spec.connections[pipeline.source.connection]
                    specs[(pipeline.tenant, pipeline.name)] = declared.spec
                for pipelines in by_tenant.values():
                    pipelines.sort(key=lambda p: p.name)
                self._by_tenant, self._sources, self._specs = by_tenant, sources, specs
                self._fingerprint, self._error = fingerprint, None
            except Exception as exc:  # a bad edit must not take the API down
                self._error = str(exc)
                log.error("cannot load pipeline declarations from %s: %s", self.defs_dir, exc)

    def for_tenant(self, tenant: str) -> list[Pipeline]:
        """The tenant's declared pipelines, sorted by name (empty for an unknown tenant)."""
        self._refresh()
        if self._by_tenant is None:
            raise DeclarationsUnavailable(self._error or "not loaded")
        return list(self._by_tenant.get(tenant, ()))

    def all(self) -> list[Pipeline]:
        self._refresh()
        return [p for pipelines in (self._by_tenant or {}).values() for p in pipelines]

    def find(self, tenant: str, name: str) -> Pipeline | None:
        return next((p for p in self.for_tenant(tenant) if p.name == name), None)

    def source(self, pipeline: Pipeline) -> Connection | None:
        """The connection the pipeline's source is declared with."""
        self._refresh()
        return self._sources.get((pipeline.tenant, pipeline.name))

    def spec(self, pipeline: Pipeline) -> PipelinesSpec | None:
        """The project spec (connections, state store) the pipeline is declared in."""
        self._refresh()
        return self._specs.get((pipeline.tenant, pipeline.name))

    def check(self) -> str | None:
        """None when declarations are loaded, else the reason."""
        self._refresh()
        return None if self._by_tenant is not None else (self._error or "not loaded")
