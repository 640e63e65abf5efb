"""Everything a request needs, built once per app from `Settings`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from dagster import DagsterInstance
from sqlalchemy import event
from sqlalchemy.pool import QueuePool

from nilus_dagster.api.auth import TokenRegistry
from nilus_dagster.api.declarations import Declarations
from nilus_dagster.api.read_model import ReadModel
from nilus_dagster.api.runs import RunReader
from nilus_dagster.api.settings import Settings
from nilus_dagster.state.store import StateStore, StateStoreError

log = logging.getLogger(__name__)


STATEMENT_TIMEOUT_MS = 15_000
POOL_RECYCLE_S = 3600
MAX_OVERFLOW = 20
# Connections the API keeps open to Dagster's PostgreSQL run storage. dagster-webserver keeps one
# (`optimize_for_webserver` hard-codes pool_size=1): with concurrent requests every connection
# beyond it is opened and closed again per query, a new PostgreSQL backend each time.
RUN_STORAGE_POOL_SIZE = 8
# Seconds a new connection to Dagster's PostgreSQL storage may take before the request gets a 503.
CONNECT_TIMEOUT_S = 3


def open_instance(settings: Settings) -> DagsterInstance:
    """The Dagster instance of DAGSTER_HOME, tuned like dagster-webserver's, with a wider pool."""
    if settings.dagster_home is not None:
        instance = DagsterInstance.from_config(str(settings.dagster_home))
    else:
        instance = DagsterInstance.get()
    instance.optimize_for_webserver(
        statement_timeout=STATEMENT_TIMEOUT_MS, pool_recycle=POOL_RECYCLE_S, max_overflow=MAX_OVERFLOW
    )
    widen_run_storage_pool(instance, RUN_STORAGE_POOL_SIZE)
    connect_once(instance)
    return instance


def connect_once(instance: DagsterInstance) -> bool:
    """Make a PostgreSQL run storage try each connection once; True if changed.

    dagster-postgres retries a failed connect five times with backoff (~12 s per request when
    the database is down, then an exception the API can only answer with 500). The API answers
    503 at once instead (the SQLAlchemy error maps to it) and the client retries.
    """
    try:
        from dagster_postgres.run_storage import PostgresRunStorage
    except ImportError:
        return False
    storage = instance.run_storage
    if not isinstance(storage, PostgresRunStorage):
        return False

    @contextmanager
    def connect() -> Iterator[Any]:
        with storage._engine.connect() as conn:
            yield conn

    storage.connect = connect  # type: ignore[method-assign]
    return True


def widen_run_storage_pool(instance: DagsterInstance, pool_size: int) -> bool:
    """Give a PostgreSQL run storage a pool of `pool_size` kept connections; True if replaced.

    Builds the engine exactly as dagster-postgres' `optimize_for_webserver` does (same URL, token
    provider, AUTOCOMMIT, recycle, overflow, `options`, statement timeout on connect) except for
    the pool size, and swaps it in. Other storages (SQLite, or a future dagster-postgres whose
    storage looks different) are left as they are.
    """
    try:
        from dagster_postgres.run_storage import PostgresRunStorage
        from dagster_postgres.utils import create_pg_engine, set_pg_statement_timeout
    except ImportError:
        return False
    storage = instance.run_storage
    old = getattr(storage, "_engine", None)
    if not isinstance(storage, PostgresRunStorage) or not isinstance(getattr(old, "pool", None), QueuePool):
        return False
    if old.pool.size() >= pool_size:
        return False
    kwargs: dict[str, Any] = {
        "isolation_level": "AUTOCOMMIT",
        "pool_size": pool_size,
        "pool_recycle": POOL_RECYCLE_S,
        "max_overflow": MAX_OVERFLOW,
    }
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in old.url.query:  # the URL's own wins
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    options = old.url.query.get("options")
    if options:
        connect_args["options"] = options
    kwargs["connect_args"] = connect_args
    engine = create_pg_engine(storage.postgres_url, getattr(storage, "_token_provider", None), **kwargs)
    event.listen(engine, "connect", lambda conn, _: set_pg_statement_timeout(conn, STATEMENT_TIMEOUT_MS))
    storage._engine = engine
    old.dispose()
    return True


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
