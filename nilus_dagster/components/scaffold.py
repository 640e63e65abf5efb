"""`dg scaffold defs nilus_dagster.components.NilusPipelines <path>`: a working, commented defs.yaml."""

from __future__ import annotations

import dagster as dg

TEMPLATE = """\
# Pipelines from PostgreSQL into DuckDB, PostgreSQL or BigQuery (every field: the nilus-dagster README).
# Secrets never go here: connections name the environment variables that hold them, read when a
# run starts. `dg check defs` validates this file.
type: {type_name}
attributes:
  connections:
    shop:                             # a name of your choice, used by the pipelines below
      type: postgres
      dsn_env: SHOP_DSN               # env var holding postgresql://user:password@host:5432/db
    warehouse:
      type: duckdb
      path: warehouse.duckdb          # relative to the working directory of the runs
    # bq: {{type: bigquery, project: my-project, location: EU, credentials_env: BQ_KEY_FILE}}

  pipelines:
    - name: orders_example            # unique per tenant: letters, digits, _
      tenant: example                 # owner: scopes run history and the monitoring API
      type: batch                     # batch (scheduled loads) or cdc (continuous)
      source:
        connection: shop
        tables:
          - public.orders             # schema.table: a full load every run
          # - {{name: public.events, cursor: updated_at}}   # incremental by a cursor column
      sink:
        connection: warehouse
        dataset: analytics            # target schema (DuckDB/PostgreSQL) or dataset (BigQuery)
        strategy: merge               # merge (upsert by key) | append | replace
      schedule: "0 * * * *"           # cron, batch only
      # checks: {{severity: warn}}

    # - name: orders_live             # CDC: needs wal_level=logical and a role that may replicate
    #   tenant: example
    #   type: cdc
    #   source: {{connection: shop, tables: [public.orders]}}
    #   sink: {{connection: warehouse, dataset: live}}
    #   checks: {{max_lag: 5m, row_count_interval: 10m}}   # lag bound; how often source and sink rows are counted

  # state_store: {{dsn_env: NILUS_STATE_DSN}}   # where cursors, offsets and schema history live
"""


class NilusPipelinesScaffolder(dg.Scaffolder):
    """Writes the commented template above as the new folder's defs.yaml."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        request.target_path.mkdir(parents=True, exist_ok=True)
        (request.target_path / "defs.yaml").write_text(TEMPLATE.format(type_name=request.type_name))
