"""The Nilus Manager monitoring API (FastAPI + strawberry GraphQL + a Prometheus metrics server)."""

from nilus_dagster.api.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):  # lazy: `python -m nilus_dagster.api.auth` must not import FastAPI/Dagster
    if name == "create_app":
        from nilus_dagster.api.app import create_app

        return create_app
    raise AttributeError(name)
