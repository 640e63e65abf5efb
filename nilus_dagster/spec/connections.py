"""Connection declarations. Secrets are named by environment variable, never written in YAML."""

from __future__ import annotations

import os
from typing import Annotated, Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SpecModel(BaseModel):
    """Base of every declaration model: unknown fields are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MissingSecret(Exception):
    """An environment variable a connection names is not set."""


def read_env(connection: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise MissingSecret(
            f"connection '{connection}': environment variable {variable} is not set "
            f"(export {variable}=... before starting Dagster)"
        )
    return value


class PostgresConnection(SpecModel):
    """A PostgreSQL database: either a whole DSN from an env var, or parts plus a password env var."""

    type: Literal["postgres"]
    dsn_env: str | None = Field(default=None, description="Env var holding a full postgresql:// DSN.")
    host: str | None = None
    port: int = 5432
    database: str | None = None
    user: str | None = None
    password_env: str | None = Field(default=None, description="Env var holding the password.")
    sslmode: str | None = None

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> PostgresConnection:
        if self.dsn_env and (self.host or self.database):
            raise ValueError("give either dsn_env or host/database, not both")
        if not self.dsn_env and not (self.host and self.database):
            raise ValueError(
                "a postgres connection needs dsn_env (an environment variable holding the DSN) or host and database"
            )
        return self

    def dsn(self, name: str) -> str:
        """The DSN, with secrets read from the environment now (at run time, not load time)."""
        if self.dsn_env:
            return read_env(name, self.dsn_env)
        password = quote(read_env(name, self.password_env), safe="") if self.password_env else ""
        auth = quote(self.user or "", safe="") + (f":{password}" if password else "")
        dsn = f"postgresql://{auth}{'@' if auth else ''}{self.host}:{self.port}/{self.database}"
        return dsn + (f"?sslmode={self.sslmode}" if self.sslmode else "")


class DuckDBConnection(SpecModel):
    """A DuckDB database file (created on first load)."""

    type: Literal["duckdb"]
    path: str = Field(description="Path of the .duckdb file; relative paths are relative to the working dir.")

    @field_validator("path")
    @classmethod
    def _not_memory(cls, value: str) -> str:
        if value.strip() in ("", ":memory:"):
            raise ValueError("a DuckDB sink needs a file path (':memory:' would lose every load)")
        return value


class BigQueryConnection(SpecModel):
    """A BigQuery project. Credentials: ADC, or a service-account key file named by an env var."""

    type: Literal["bigquery"]
    project: str
    location: str | None = None
    dataset: str | None = Field(
        default=None, description="Where checkpoints go when no pipeline dataset applies (pipelines name theirs)."
    )
    credentials_env: str | None = Field(
        default=None, description="Env var holding the path of a service-account key file."
    )
    api_endpoint: str | None = Field(default=None, description="Override, e.g. a private endpoint or an emulator.")

    @field_validator("api_endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"api_endpoint must be an http(s) URL, got '{value}'")
        return value


Connection = Annotated[PostgresConnection | DuckDBConnection | BigQueryConnection, Field(discriminator="type")]
SINK_CONNECTION_TYPES = ("duckdb", "postgres", "bigquery")
