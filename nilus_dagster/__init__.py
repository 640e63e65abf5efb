"""nilus-dagster: batch and CDC pipelines declared in YAML as Dagster Components."""

__version__ = "0.1.0"
