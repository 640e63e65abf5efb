"""The embedded demo: a seeded "shop" database and `dagster dev` with sample pipelines."""
