"""Everything a request needs, built once per app from `Settings`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dagster import DagsterInstance

from nilus_dagster.api.auth import TokenRegistry
from nilus_dagster.api.declarations import Declarations
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.runs import RunReader
from nilus_dagster.api.settings import Settings
from nilus_dagster.state.store import StateStore, StateStoreError

log = logging.getLogger(__name__)


def open_instance(settings: Settings) -> DagsterInstance:
    """The Dagster instance of DAGSTER_HOME, tuned like dagster-webserver's (one pooled connection)."""
    if settings.dagster_home is not None:
        instance = DagsterInstance.from_config(str(settings.dagster_home))
    else:
        instance = DagsterInstance.get()
    instance.optimize_for_webserver(statement_timeout=15_000, pool_recycle=3600, max_overflow=20)
    return instance


def open_store(settings: Settings) -> StateStore | None:
    if not settings.state_dsn:
        log.warning("NILUS_STATE_DSN is not set: CDC endpoints and the runtime API answer 503")
        return None
    # A short wait and a cooldown: with the store down, requests get a 503 at once, not after 30 s.
    store = StateStore(settings.state_dsn, schema=settings.state_schema, max_connections=8, wait_s=3.0, cooldown_s=5.0)
    try:
        return store.open(migrate=True)  # idempotent; the runtime API may be the first writer
    except StateStoreError as exc:
        log.warning("state store not reachable at startup (%s); will retry per request", exc)
        return store.open(migrate=False)


@dataclass
class Services:
    settings: Settings
    instance: DagsterInstance
    store: StateStore | None
    declarations: Declarations
    read_model: ReadModel
    tokens: TokenRegistry

    @classmethod
    def build(cls, settings: Settings) -> Services:
        instance = open_instance(settings)
        store = open_store(settings)
        declarations = Declarations(settings.defs_dir, settings.defs_reload_seconds)
        read_model = ReadModel(declarations, RunReader(instance), store, settings.dagster_ui_url)
        tokens = TokenRegistry.load(settings.tokens_file, settings.tokens_env)
        if not len(tokens):
            log.warning("no API tokens configured: every request will get 401")
        return cls(settings, instance, store, declarations, read_model, tokens)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.instance.dispose()
