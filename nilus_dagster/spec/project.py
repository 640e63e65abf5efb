"""A set of connections and the pipelines that use them, with the cross-checks between them."""

from __future__ import annotations

from pydantic import Field, model_validator

from nilus_dagster.spec.connections import SINK_CONNECTION_TYPES, SOURCE_CONNECTION_TYPES, Connection, SpecModel
from nilus_dagster.spec.pipelines import Pipeline, check_name


class StateStoreSettings(SpecModel):
    dsn_env: str = Field(default="NILUS_STATE_DSN", description="Env var holding the state store's DSN.")
    schema_name: str = "nilus"


class PipelinesSpec(SpecModel):
    """What one `defs.yaml` declares: connections (by name) and pipelines."""

    connections: dict[str, Connection]
    pipelines: list[Pipeline] = Field(default_factory=list)
    state_store: StateStoreSettings = Field(default_factory=StateStoreSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelinesSpec:
        for name in self.connections:
            check_name(name, "connection name")
        seen: dict[tuple[str, str], int] = {}
        landed: dict[tuple[str, str, str], str] = {}
        for index, p in enumerate(self.pipelines):
            where = f"pipelines[{index}] ({p.name})"
            self._check_connection(
                where + ".source.connection", p.source.connection, SOURCE_CONNECTION_TYPES[p.type], p.type
            )
            self._check_connection(where + ".sink.connection", p.sink.connection, SINK_CONNECTION_TYPES)
            if (p.tenant, p.name) in seen:
                raise ValueError(
                    f"{where}: pipeline name '{p.name}' is used twice in tenant '{p.tenant}' "
                    f"(also pipelines[{seen[(p.tenant, p.name)]}]); pipeline names must be unique per tenant"
                )
            seen[(p.tenant, p.name)] = index
            self._check_sink_tables(where, p, landed)
            if p.sink.strategy == "merge":
                self._check_merge_keys(where, p)
            if p.type == "cdc" and self.connections[p.source.connection].type == "mysql":
                self._check_binlog_options(where, p)
            sink_type = self.connections[p.sink.connection].type
            if p.sink.table_options is not None and sink_type != "bigquery":
                raise ValueError(f"{where}.sink.table_options: only BigQuery sinks take table_options")
        return self

    def _check_connection(self, where: str, name: str, allowed: tuple[str, ...], mode: str = "") -> None:
        if name not in self.connections:
            known = ", ".join(sorted(self.connections)) or "none declared"
            raise ValueError(f"{where}: unknown connection '{name}' (declared connections: {known})")
        kind = self.connections[name].type
        if kind not in allowed:
            needs = f"a {mode} pipeline's source" if mode else "this"
            raise ValueError(f"{where}: connection '{name}' is {kind}; {needs} needs one of {', '.join(allowed)}")

    @staticmethod
    def _check_binlog_options(where: str, pipeline: Pipeline) -> None:
        """A MySQL CDC pipeline reads the binlog: PostgreSQL's replication names mean nothing there."""
        for option in ("slot_name", "publication_name"):
            if getattr(pipeline.cdc, option):
                raise ValueError(f"{where}.cdc.{option}: a mysql source streams its binlog; it has no {option}")

    @staticmethod
    def _check_sink_tables(where: str, pipeline: Pipeline, landed: dict[tuple[str, str, str], str]) -> None:
        """Two pipelines writing one sink table would overwrite each other's rows and checkpoints."""
        for t in pipeline.source.tables:
            target = (pipeline.sink.connection, pipeline.sink.dataset, t.target_name)
            if target in landed:
                raise ValueError(
                    f"{where}: {t.name} would land in {pipeline.sink.dataset}.{t.target_name} of connection "
                    f"'{pipeline.sink.connection}', which {landed[target]} already writes: give it a sink_table "
                    "or another sink.dataset"
                )
            landed[target] = f"{where} ({t.name})"

    @staticmethod
    def _check_merge_keys(where: str, pipeline: Pipeline) -> None:
        """`merge` needs a key: declared here, or read from the source catalog at run time.

        An explicitly empty `primary_key: []` is the one case we can reject before any run.
        """
        for t in pipeline.source.tables:
            if t.primary_key is not None and not t.primary_key:
                raise ValueError(
                    f"{where}.source.tables ({t.name}): strategy merge needs a key: give primary_key "
                    "columns, or use strategy append or replace"
                )
