"""API settings, read from the environment (see `Settings.from_env`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

API_PREFIX = "/nilus-manager/api/v1"
SERVICE_NAME = "nilus-manager"


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Everything the API process needs; `create_app(settings)` takes one of these.

    Environment: `DAGSTER_HOME`, `NILUS_STATE_DSN` (+ `NILUS_STATE_SCHEMA`), `NILUS_DEFS_DIR`,
    `NILUS_API_TOKENS_FILE` or `NILUS_API_TOKENS`, `NILUS_DAGSTER_UI_URL`, `NILUS_API_HOST`,
    `NILUS_API_PORT`, `NILUS_METRICS_HOST`, `NILUS_METRICS_PORT`, `NILUS_IMAGE`, `NILUS_COMMIT`.
    """

    dagster_home: Path | None = None
    state_dsn: str | None = None
    state_schema: str = "nilus"
    defs_dir: Path = Path("pipelines")
    tokens_file: Path | None = None
    tokens_env: str | None = None
    dagster_ui_url: str = "http://localhost:3000"
    host: str = "0.0.0.0"
    port: int = 8000
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    image: str | None = None
    commit: str | None = None
    # Seconds a scrape's storage reads are reused (protects run storage from eager scrapers).
    metrics_cache_seconds: float = 10.0
    # Seconds between checks of the defs folder for changed declarations.
    defs_reload_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        home = env("DAGSTER_HOME")
        tokens_file = env("NILUS_API_TOKENS_FILE")
        return cls(
            dagster_home=Path(home) if home else None,
            state_dsn=env("NILUS_STATE_DSN") or None,
            state_schema=env("NILUS_STATE_SCHEMA") or "nilus",
            defs_dir=Path(env("NILUS_DEFS_DIR") or "pipelines"),
            tokens_file=Path(tokens_file) if tokens_file else None,
            tokens_env=env("NILUS_API_TOKENS") or None,
            dagster_ui_url=(env("NILUS_DAGSTER_UI_URL") or "http://localhost:3000").rstrip("/"),
            host=env("NILUS_API_HOST") or "0.0.0.0",
            port=_int_env("NILUS_API_PORT", 8000),
            metrics_host=env("NILUS_METRICS_HOST") or "0.0.0.0",
            metrics_port=_int_env("NILUS_METRICS_PORT", 9090),
            image=env("NILUS_IMAGE") or None,
            commit=env("NILUS_COMMIT") or None,
        )
