"""What a cdc pipeline checks before it starts, and how its publication follows the YAML."""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
from batch_project import SinkTarget, failure_message
from cdc_project import cdc_pipeline, cdc_project, run_until_caught_up
from table_compare import assert_same_rows, duckdb_rows, source_rows

from nilus_dagster.embedded.postgres import EmbeddedPostgres


@pytest.fixture
def sink(duckdb_sink: SinkTarget) -> SinkTarget:
    return duckdb_sink


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A cluster with one replication slot in all (and logical WAL)."""
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("pg_small"), settings={"max_replication_slots": "1"}).start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="module")
def replica_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A cluster whose wal_level is replica: it cannot decode changes."""
    cluster = EmbeddedPostgres(tmp_path_factory.mktemp("pg_replica"), settings={"wal_level": "replica"}).start()
    yield cluster
    cluster.destroy()


def _use_source(dsn: str, state_dsn: str, monkeypatch: pytest.MonkeyPatch, *, create: bool = True) -> None:
    monkeypatch.setenv("SOURCE_DSN", dsn)
    monkeypatch.setenv("NILUS_STATE_DSN", state_dsn)
    if create:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.t (id int PRIMARY KEY, v text)")


def _fails_with(sink: SinkTarget, instance: dg.DagsterInstance, expected: str) -> None:
    result = run_until_caught_up(cdc_project(sink, cdc_pipeline("p", ["public.t"])), "acme__p", instance)
    assert not result.success
    assert expected in failure_message(result)


def test_wal_level_must_be_logical(
    replica_cluster: EmbeddedPostgres, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_source(replica_cluster.dsn(), state_dsn, monkeypatch)
    _fails_with(sink, instance, "the source's wal_level is not logical: run ALTER SYSTEM SET wal_level = logical")


def test_role_needs_the_replication_privilege(
    source_db: str, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("DO $$ BEGIN CREATE ROLE plain_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        conn.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
        conn.execute("GRANT SELECT ON public.t TO plain_reader")
    _use_source(source_db.replace("postgres@", "plain_reader@"), state_dsn, monkeypatch, create=False)
    _fails_with(sink, instance, "the source role may not replicate: ALTER ROLE <user> WITH REPLICATION")


def test_no_free_replication_slot(
    small_cluster: EmbeddedPostgres, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _use_source(small_cluster.dsn(), state_dsn, monkeypatch)
    with psycopg.connect(small_cluster.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')")
    try:
        _fails_with(sink, instance, "no free replication slot (1 of max_replication_slots = 1 in use)")
    finally:
        with psycopg.connect(small_cluster.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot('someone_else')")


def test_tables_added_to_and_removed_from_the_yaml(
    source_db: str, state_dsn: str, sink: SinkTarget, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_source(source_db, state_dsn, monkeypatch)
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.extra (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO public.t VALUES (1, 'a')")
        conn.execute("INSERT INTO public.extra SELECT g, 'before it was added' FROM generate_series(1, 50) g")
    first = cdc_project(sink, cdc_pipeline("p", ["public.t"]))
    assert run_until_caught_up(first, "acme__p", instance).success

    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("INSERT INTO public.t VALUES (2, 'b')")
    both = cdc_project(sink, cdc_pipeline("p", ["public.t", "public.extra"]))
    assert run_until_caught_up(both, "acme__p", instance).success
    with psycopg.connect(source_db, autocommit=True) as conn:
        conn.execute("UPDATE public.extra SET note = 'streamed' WHERE id <= 10")
        conn.execute("DELETE FROM public.extra WHERE id > 45")
        conn.execute("INSERT INTO public.t VALUES (3, 'c')")
    result = run_until_caught_up(both, "acme__p", instance)
    assert result.success, failure_message(result)
    for table, columns in (("extra", ["id", "note"]), ("t", ["id", "v"])):
        assert_same_rows(
            source_rows(source_db, f"public.{table}", columns, "id"),
            duckdb_rows(sink.location, f"replica.{table}", columns, "id"),
        )

    only_extra = cdc_project(sink, cdc_pipeline("p", ["public.extra"]))
    assert run_until_caught_up(only_extra, "acme__p", instance).success
    with psycopg.connect(source_db, autocommit=True) as conn:
        published = conn.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = 'nilus_acme_p'").fetchall()
    assert published == [("extra",)]
