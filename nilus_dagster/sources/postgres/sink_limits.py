"""Values a sink refuses although their Arrow type holds them (`SinkLimits`: BigQuery's year 9999,
NULL inside an ARRAY), found with one vectorized pass over a decoded column. A refused value raises
`ValueDecodeError` naming the column, the value and the sink, like a value the type cannot hold, so
the CDC run treats its row as a poison row (`on_error`) and a snapshot or batch read refuses it
before anything is written."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.schema.table import ColumnType, SinkLimits

_DATED = ("date", "timestamp", "timestamptz")


def check_limits(
    texts: pa.Array, values: pa.Array, column_type: ColumnType, column: str | None, error: Callable[[str], Exception]
) -> None:
    """Raise `error(message)` for the first value of `values` (decoded from `texts`) the sink refuses."""
    limits = column_type.limits
    if limits is None or len(values) == 0:
        return
    refused = _refused(values, column_type, limits)
    if refused is None:
        return
    index, why = refused
    name = f"column '{column}'" if column else "value"
    raise error(f"{name}: value {texts[index].as_py()!r} cannot be written to {limits.sink}: {why}")


def _refused(values: pa.Array, column_type: ColumnType, limits: SinkLimits) -> tuple[int, str] | None:
    if column_type.kind in _DATED and limits.max_year is not None:
        late = pc.greater(pc.year(values), limits.max_year)
        if pc.any(late).as_py():
            where = "in UTC " if column_type.kind == "timestamptz" else ""
            return _first(late), f"it is {where}past the year {limits.max_year}"
    if column_type.kind == "list" and not limits.null_elements:
        nulls = pc.is_null(pc.list_flatten(values))
        if pc.any(nulls).as_py():
            parents = pc.list_parent_indices(values)
            return int(parents[_first(nulls)].as_py()), "an array cannot hold a NULL element"
    return None


def _first(mask: pa.Array) -> int:
    return int(pc.index(mask, True).as_py())
