"""Embedded services for the demo and the tests (no Docker, no system PostgreSQL needed)."""
