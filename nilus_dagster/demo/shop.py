"""A small two-tenant "shop" database with the types real sources have."""

from __future__ import annotations

import psycopg

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {t};
DO $$ BEGIN
    CREATE TYPE {t}.order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE IF NOT EXISTS {t}.customers (
    id bigint PRIMARY KEY,
    email text NOT NULL,
    name text,
    tags text[],
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {t}.products (
    id integer PRIMARY KEY,
    sku uuid NOT NULL,
    title text NOT NULL,
    price numeric(12, 2) NOT NULL,
    attributes jsonb,
    active boolean NOT NULL DEFAULT true
);
CREATE TABLE IF NOT EXISTS {t}.orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL,
    status {t}.order_status NOT NULL,
    total numeric(38, 9) NOT NULL,
    ordered_on date NOT NULL,
    note text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

_EVENTS = """
CREATE SCHEMA IF NOT EXISTS {t};
CREATE TABLE IF NOT EXISTS {t}.events (
    id bigserial PRIMARY KEY,
    session uuid NOT NULL,
    kind text NOT NULL,
    payload jsonb,
    happened_at timestamptz NOT NULL DEFAULT now()
);
"""


def _seed_tenant_shop(conn: psycopg.Connection, tenant: str, customers: int) -> None:
    conn.execute(_SCHEMA.format(t=tenant))
    conn.execute(
        f"""
        INSERT INTO {tenant}.customers (id, email, name, tags, created_at, updated_at)
        SELECT g, 'customer' || g || '@{tenant}.example', 'Customer ' || g,
               ARRAY['segment-' || (mod(g, 3)), 'since-' || (2020 + mod(g, 5))],
               now() - (g || ' hours')::interval, now() - (g || ' minutes')::interval
        FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
        (customers,),
    )
    conn.execute(
        f"""
        INSERT INTO {tenant}.products (id, sku, title, price, attributes, active)
        SELECT g, md5('{tenant}' || g)::uuid, 'Product ' || g, (g * 3.5)::numeric(12, 2),
               jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[1 + mod(g, 3)], 'weight_g', g * 10),
               mod(g, 7) <> 0
        FROM generate_series(1, 50) g ON CONFLICT DO NOTHING"""
    )
    conn.execute(
        f"""
        INSERT INTO {tenant}.orders (id, customer_id, status, total, ordered_on, note, updated_at)
        SELECT g, 1 + mod(g, %s), (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + mod(g, 4)]::{tenant}.order_status,
               (g * 12.345678901)::numeric(38, 9), current_date - (mod(g, 90)),
               CASE WHEN mod(g, 5) = 0 THEN NULL ELSE 'note ' || g END, now() - (g || ' seconds')::interval
        FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
        (customers, customers * 4),
    )


def seed_shop(dsn: str, *, customers: int = 200) -> None:
    """Create and fill the demo tables (idempotent: a second call adds nothing)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _seed_tenant_shop(conn, "acme", customers)
        conn.execute(_EVENTS.format(t="globex"))
        conn.execute(
            """
            INSERT INTO globex.events (session, kind, payload, happened_at)
            SELECT md5('s' || (mod(g, 40)))::uuid, (ARRAY['view', 'click', 'buy'])[1 + mod(g, 3)],
                   jsonb_build_object('page', '/p/' || (mod(g, 17))), now() - (g || ' seconds')::interval
            FROM generate_series(1, 1000) g
            WHERE NOT EXISTS (SELECT 1 FROM globex.events)"""
        )


def add_activity(dsn: str, *, orders: int = 20) -> None:
    """New and changed rows, so incremental loads have something to pick up."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO acme.orders (id, customer_id, status, total, ordered_on, note)
            SELECT coalesce((SELECT max(id) FROM acme.orders), 0) + g, 1 + mod(g, 10), 'new', g * 9.99,
                   current_date, 'fresh'
            FROM generate_series(1, %s) g""",
            (orders,),
        )
        conn.execute("UPDATE acme.orders SET status = 'paid', updated_at = now() WHERE mod(id, 50) = 0")
        conn.execute(
            """
            INSERT INTO globex.events (session, kind, payload)
            SELECT gen_random_uuid(), 'view', jsonb_build_object('page', '/new') FROM generate_series(1, %s)""",
            (orders,),
        )


def generate_changes(dsn: str, *, interval_s: float = 1.0, rounds: int | None = None) -> int:
    """Keep changing the shop (new orders, status updates, cancellations) so CDC has a stream.

    Runs until interrupted, or for `rounds` rounds; returns the rounds made.
    """
    import time

    done = 0
    while rounds is None or done < rounds:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(
                """
                INSERT INTO acme.orders (id, customer_id, status, total, ordered_on, note)
                SELECT coalesce(max(id), 0) + 1, 1 + floor(random() * 100)::int, 'new',
                       round((random() * 500)::numeric, 2), current_date, 'live'
                FROM acme.orders"""
            )
            conn.execute(
                "UPDATE acme.orders SET status = 'shipped', updated_at = now() "
                "WHERE id = (SELECT id FROM acme.orders WHERE status = 'paid' ORDER BY random() LIMIT 1)"
            )
            conn.execute(
                "DELETE FROM acme.orders WHERE id = (SELECT id FROM acme.orders WHERE status = 'cancelled' "
                "ORDER BY random() LIMIT 1)"
            )
        done += 1
        time.sleep(interval_s)
    return done
