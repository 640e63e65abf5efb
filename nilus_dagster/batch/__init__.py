"""Batch loads: full or incremental table copies from a PostgreSQL source into a sink."""

from nilus_dagster.batch.loader import BatchLoadError, BatchLoadResult, BatchTableLoad, load_table

__all__ = ["BatchLoadError", "BatchLoadResult", "BatchTableLoad", "load_table"]
