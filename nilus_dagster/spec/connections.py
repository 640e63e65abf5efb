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
    port: int = Field(default=5432, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password_env: str | None = Field(default=None, description="Env var holding the password.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None, description="libpq's sslmode."
    )

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


class MySQLConnection(SpecModel):
    """A MySQL 8 or MariaDB 10.6+ server: a whole DSN from an env var, or parts plus a password env var.

    A pipeline's table `shop.orders` is table `orders` of MySQL database `shop` (MySQL's databases
    are the schemas of a table name); `database` is only the login's default database."""

    type: Literal["mysql"]
    dsn_env: str | None = Field(
        default=None, description="Env var holding a full mysql://user:password@host:port/database DSN."
    )
    host: str | None = None
    port: int = Field(default=3306, ge=1, le=65535)
    database: str | None = None
    user: str | None = None
    password_env: str | None = Field(default=None, description="Env var holding the password.")
    ssl_mode: Literal["disabled", "preferred", "required", "verify_ca", "verify_identity"] | None = Field(
        default=None, description="TLS to the server, as MySQL's --ssl-mode (default: the driver's, no TLS)."
    )
    ssl_ca: str | None = Field(default=None, description="CA certificate file for verify_ca/verify_identity.")

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> MySQLConnection:
        if self.dsn_env and (self.host or self.database or self.user or self.password_env):
            raise ValueError("give either dsn_env or host/user/password_env/database, not both")
        if not self.dsn_env and not (self.host and self.user):
            raise ValueError(
                "a mysql connection needs dsn_env (an environment variable holding "
                "mysql://user:password@host:3306/database) or host and user (with password_env)"
            )
        if self.ssl_mode in ("verify_ca", "verify_identity") and not self.ssl_ca:
            raise ValueError(f"ssl_mode {self.ssl_mode} needs ssl_ca (the CA certificate file to verify with)")
        return self

    def dsn(self, name: str) -> str:
        """A mysql:// DSN, with secrets read from the environment now (at run time, not load time).
        TLS settings travel as query parameters (`ssl_mode`, `ssl_ca`)."""
        if self.dsn_env:
            dsn = read_env(name, self.dsn_env)
            if urlsplit(dsn).scheme not in ("mysql", "mariadb"):
                raise MissingSecret(
                    f"connection '{name}': environment variable {self.dsn_env} must hold a "
                    "mysql://user:password@host:port/database DSN"
                )
        else:
            password = quote(read_env(name, self.password_env), safe="") if self.password_env else ""
            auth = quote(self.user or "", safe="") + (f":{password}" if password else "")
            dsn = f"mysql://{auth}@{self.host}:{self.port}/{quote(self.database or '', safe='')}"
        query = [f"{key}={quote(value, safe='')}" for key, value in
                 (("ssl_mode", self.ssl_mode), ("ssl_ca", self.ssl_ca)) if value]
        return dsn + ("&" if "?" in dsn else "?") + "&".join(query) if query else dsn


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


Connection = Annotated[
    PostgresConnection | MySQLConnection | DuckDBConnection | BigQueryConnection, Field(discriminator="type")
]
SINK_CONNECTION_TYPES = ("duckdb", "postgres", "bigquery")
# Source connection types by pipeline type (MySQL CDC reads a MariaDB binlog: cdc/mysql/).
SOURCE_CONNECTION_TYPES: dict[str, tuple[str, ...]] = {"batch": ("postgres", "mysql"), "cdc": ("postgres", "mysql")}
