"""The `NilusPipelines` component: connections and pipelines declared in a defs.yaml."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from nilus_dagster.components.definitions import build_definitions
from nilus_dagster.components.scaffold import NilusPipelinesScaffolder
from nilus_dagster.spec.errors import validate_spec
from nilus_dagster.spec.project import PipelinesSpec


@dg.scaffold_with(NilusPipelinesScaffolder)
class NilusPipelines(dg.Component, dg.Model, dg.Resolvable):
    """Batch and CDC pipelines from PostgreSQL into DuckDB, PostgreSQL or BigQuery.

    Each pipeline becomes one asset per source table, a job, and a schedule (batch) or a
    keep-alive sensor (cdc). Every field is documented in the project README.

    Example defs.yaml:

    .. code-block:: yaml

        type: nilus_dagster.components.NilusPipelines
        attributes:
          connections:
            shop: {type: postgres, dsn_env: SHOP_DSN}
            warehouse: {type: duckdb, path: warehouse.duckdb}
          pipelines:
            - name: orders
              tenant: acme
              source: {connection: shop, tables: [public.orders]}
              sink: {connection: warehouse, dataset: acme}
              schedule: "0 * * * *"
    """

    connections: dict[str, Any] = Field(description="Connections by name: type postgres, duckdb or bigquery.")
    pipelines: list[dict[str, Any]] = Field(default_factory=list, description="Pipeline declarations.")
    state_store: dict[str, Any] = Field(
        default_factory=dict, description="dsn_env (default NILUS_STATE_DSN) and schema_name (default nilus)."
    )

    def spec(self, source: str) -> PipelinesSpec:
        data = {"connections": self.connections, "pipelines": self.pipelines, "state_store": self.state_store}
        return validate_spec(PipelinesSpec, data, source)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return build_definitions(self.spec(str(context.path / "defs.yaml")))
