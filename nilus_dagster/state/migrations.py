"""The state store's own schema, versioned. Append a migration; never edit an applied one."""

from __future__ import annotations

# Each entry: (version, SQL). `{schema}` is the state store's schema name (already quoted).
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE {schema}.pipeline_state (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            state text NOT NULL,
            detail jsonb NOT NULL DEFAULT '{{}}',
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline)
        );
        CREATE TABLE {schema}.batch_cursors (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            table_name text NOT NULL,
            cursor_column text NOT NULL,
            cursor_value text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline, table_name)
        );
        CREATE TABLE {schema}.cdc_offsets (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            connector_name text NOT NULL,
            offset_key text NOT NULL,
            offset_value jsonb NOT NULL,
            run_id text,
            record_insert_ts timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.cdc_offsets (tenant, pipeline, id DESC);
        CREATE INDEX ON {schema}.cdc_offsets (tenant, record_insert_ts);
        CREATE TABLE {schema}.schema_history (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            connector_name text NOT NULL,
            table_name text NOT NULL,
            table_schema jsonb NOT NULL,
            lsn text,
            record_insert_ts timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.schema_history (tenant, pipeline, table_name, id DESC);
        CREATE INDEX ON {schema}.schema_history (tenant, record_insert_ts);
        CREATE TABLE {schema}.snapshot_partitions (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            table_name text NOT NULL,
            partition_no integer NOT NULL,
            start_block bigint NOT NULL,
            end_block bigint NOT NULL,
            rows_estimate bigint NOT NULL DEFAULT 0,
            rows_done bigint NOT NULL DEFAULT 0,
            done boolean NOT NULL DEFAULT false,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline, table_name, partition_no)
        );
        CREATE TABLE {schema}.heartbeats (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            run_id text NOT NULL,
            detail jsonb NOT NULL DEFAULT '{{}}',
            beat_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline)
        );
        CREATE TABLE {schema}.pipeline_runs (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            run_id text NOT NULL,
            payload jsonb NOT NULL,
            record_insert_ts timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.pipeline_runs (tenant, pipeline, id DESC);
        """,
    ),
    (
        2,
        """
        CREATE TABLE {schema}.resync_requests (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            table_name text NOT NULL,
            reason text NOT NULL DEFAULT '',
            status text NOT NULL DEFAULT 'pending',
            run_id text,
            error text,
            requested_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.resync_requests (tenant, pipeline, status);
        """,
    ),
    (
        3,
        """
        CREATE INDEX ON {schema}.cdc_offsets (tenant, pipeline, connector_name, offset_key, id DESC);
        """,
    ),
    (
        4,
        """
        CREATE TABLE {schema}.dead_letters (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            table_name text NOT NULL,
            commit_lsn bigint NOT NULL,
            key_hash text NOT NULL,
            row_key jsonb NOT NULL,
            row_data jsonb NOT NULL,
            op text NOT NULL,
            error_kind text NOT NULL,
            column_name text,
            message text NOT NULL,
            run_id text,
            created_at timestamptz NOT NULL DEFAULT now(),
            acked_at timestamptz,
            UNIQUE (tenant, pipeline, table_name, commit_lsn, key_hash)
        );
        CREATE INDEX ON {schema}.dead_letters (tenant, pipeline, table_name, id) WHERE acked_at IS NULL;
        """,
    ),
    (
        5,
        """
        CREATE TABLE IF NOT EXISTS {schema}.table_failures (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            table_name text NOT NULL,
            status text NOT NULL,
            reason text NOT NULL,
            checkpoint text,
            run_id text,
            failed_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline, table_name)
        );
        """,
    ),
    (
        6,  # operator surface (issue 15): a pipeline held stopped/paused, and the audit trail
        """
        CREATE TABLE {schema}.pipeline_control (
            tenant text NOT NULL,
            pipeline text NOT NULL,
            resource_id text NOT NULL,
            desired text NOT NULL,
            actor text NOT NULL,
            audit_id bigint,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, pipeline)
        );
        CREATE TABLE {schema}.operator_audit (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text,
            resource_id text,
            actor text NOT NULL,
            action text NOT NULL,
            params jsonb NOT NULL DEFAULT '{{}}',
            result text NOT NULL DEFAULT 'pending',
            detail jsonb NOT NULL DEFAULT '{{}}',
            run_ids jsonb NOT NULL DEFAULT '[]',
            at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.operator_audit (tenant, id DESC);
        CREATE INDEX ON {schema}.operator_audit (tenant, pipeline, id DESC);
        """,
    ),
    (
        7,  # issue 12: replaying dead-letter entries once their cause is fixed (cdc/dlq_replay.py)
        """
        CREATE TABLE {schema}.dlq_replays (
            id bigserial PRIMARY KEY,
            tenant text NOT NULL,
            pipeline text NOT NULL,
            entry_ids jsonb NOT NULL,
            status text NOT NULL DEFAULT 'pending',
            message text,
            run_id text,
            requested_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.dlq_replays (tenant, pipeline) WHERE status = 'pending';
        ALTER TABLE {schema}.dead_letters ADD COLUMN replay_id bigint;
        """,
    ),
]
