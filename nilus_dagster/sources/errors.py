"""Errors every source raises, worded for the pipeline's owner."""

from __future__ import annotations


class SourceError(Exception):
    """A problem with the source database or its data, worded for the pipeline's owner."""


class ValueDecodeError(SourceError):
    """A source value that cannot be represented in its column's logical type."""


class SourceUnreachable(Exception):
    """The source database could not be reached or refused the login."""
