"""PostgreSQL text values to Arrow arrays of the logical type's Arrow type.

Two entry points:

* `text_to_arrow` decodes PostgreSQL's own text output format: what pgoutput sends for a column,
  what `value::text` returns, what COPY writes for bytea/interval. Examples: booleans `t`/`f`
  (also `true`/`false`), bytea `\\x0a0b` (or the legacy escape format), timestamptz
  `2024-01-01 10:00:00.123+05:30`, intervals in the `postgres` IntervalStyle
  (`1 year 2 mons -3 days +04:05:06.5`), arrays `{1,2,"a b",NULL}`. Dates, timestamps and
  intervals must be in DateStyle ISO / IntervalStyle postgres (the server defaults).
* `json_text_array_to_arrow` decodes the batch reader's array form, `array_to_json(col::text[])`:
  a JSON array of the elements' text forms, parsed by Arrow's JSON reader; the elements then go
  through `text_to_arrow`.

Both are vectorized (Arrow casts and compute) except array literals, intervals, bytea and rare
fallbacks (zone offsets with seconds), which are decoded value by value. A value that does not fit
the logical type (a NUMERIC too wide for its decimal, `infinity` dates, NaN numerics, 24:00:00
times...) raises `ValueDecodeError` naming the column and the value: nothing is rounded or dropped.
A decimal carried as text (`ColumnType.as_text`, for sinks whose numeric holds every value) stays
PostgreSQL's text, so NaN, ±Infinity and any number of digits arrive exactly. A value the sink
refuses at write time (`ColumnType.limits`, see sink_limits.py) raises `ValueDecodeError` too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from nilus_dagster.schema.arrow import arrow_type
from nilus_dagster.schema.table import ColumnType
from nilus_dagster.sources.errors import ValueDecodeError
from nilus_dagster.sources.postgres.sink_limits import check_limits


def text_to_arrow(values: pa.Array, column_type: ColumnType, *, column: str | None = None) -> pa.Array:
    """Decode PostgreSQL text-format values (nulls stay null) into `arrow_type(column_type)`.

    `column` only names the column in error messages.
    """
    values = _as_string(values)
    decoder = _DECODERS.get(column_type.kind, _decode_by_cast)
    decoded = decoder(values, column_type, column)
    check_limits(values, decoded, column_type, column, ValueDecodeError)  # what the sink refuses
    return decoded


def json_text_array_to_arrow(
    values: pa.Array, column_type: ColumnType, *, column: str | None = None
) -> pa.Array:
    """Decode `array_to_json(col::text[])` output (JSON arrays of element text) into a list array."""
    assert column_type.kind == "list" and column_type.element is not None
    values = _as_string(values)
    lines = pc.binary_join_element_wise('{"v":', pc.fill_null(values, "null"), "}\n", "")
    # A freshly computed array's data buffer starts at its first value: it is the NDJSON text.
    size = pc.sum(pc.binary_length(lines)).as_py() or 0
    ndjson = lines.buffers()[2][:size] if size else pa.py_buffer(b"")
    parse_options = pa_json.ParseOptions(explicit_schema=pa.schema([("v", pa.list_(pa.string()))]))
    read_options = pa_json.ReadOptions(block_size=max(len(ndjson) + 1, 1 << 20), use_threads=False)
    try:
        lists = pa_json.read_json(pa.BufferReader(ndjson), read_options, parse_options).column("v")
    except pa.ArrowInvalid as error:
        raise ValueDecodeError(
            f"{_name(column)}: cannot read arrays as {_type_name(column_type)} "
            f"(multidimensional arrays are not supported): {error}"
        ) from None
    text_lists = lists.combine_chunks() if lists.num_chunks != 1 else lists.chunk(0)
    decoded = _decode_list_elements(text_lists, column_type, column)
    check_limits(values, decoded, column_type, column, ValueDecodeError)  # what the sink refuses
    return decoded


# --- scalars ---------------------------------------------------------------------------------------


def _decode_by_cast(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    return _cast(values, arrow_type(column_type), column_type, column)


def _decode_decimal(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    if column_type.as_text:  # PostgreSQL's own numeric output: exact, NaN and ±Infinity included
        return values
    return _decode_by_cast(values, column_type, column)


def _decode_string(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    return values


def _decode_bool(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    is_true = pc.is_in(values, pa.array(["t", "true"]))
    is_false = pc.is_in(values, pa.array(["f", "false"]))
    invalid = pc.and_(values.is_valid(), pc.invert(pc.or_(is_true, is_false)))
    if pc.any(invalid).as_py():
        bad = values.filter(invalid)[0].as_py()
        raise ValueDecodeError(f"{_name(column)}: {bad!r} is not a boolean")
    return pc.if_else(values.is_null(), pa.scalar(None, pa.bool_()), is_true)


def _decode_time(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    try:
        return _time_from_text(values)
    except pa.ArrowInvalid:
        raise _first_failure(values, _time_from_text, column_type, column) from None


def _time_from_text(values: pa.StringArray) -> pa.Array:
    # Arrow cannot cast string -> time64: parse a timestamp on 1970-01-01 and keep its time of day.
    as_timestamps = pc.binary_join_element_wise("1970-01-01 ", values, "")
    return as_timestamps.cast(pa.timestamp("us")).cast(pa.time64("us"))


def _decode_timestamptz(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    target = pa.timestamp("us", tz="UTC")
    try:
        return values.cast(target)
    except pa.ArrowInvalid:
        # Offsets with seconds (e.g. LMT zones, `+05:53:28`) are valid PostgreSQL output Arrow rejects.
        parsed = [None if text is None else _parse_timestamptz(text, column) for text in values.to_pylist()]
        return pa.array(parsed, target)


def _parse_timestamptz(text: str, column: str | None) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValueDecodeError(f"{_name(column)}: {text!r} is not a timestamptz Arrow can hold "
                               "(years 1-9999, no infinity)")
    return parsed


def _decode_bytes(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    """bytea in the hex format `\\x0a0b` (bytes.fromhex per value) or the legacy escape format."""
    decoded = [None if text is None else _bytea_from_text(text, column) for text in values.to_pylist()]
    return pa.array(decoded, pa.binary())


_BYTEA_ESCAPE = re.compile(rb"\\(\\|[0-7]{3})")


def _bytea_from_text(text: str, column: str | None) -> bytes:
    try:
        if text.startswith("\\x"):
            return bytes.fromhex(text[2:])
        raw = text.encode("ascii")
    except (ValueError, UnicodeEncodeError):
        raise ValueDecodeError(f"{_name(column)}: {text[:40]!r} is not bytea text output") from None
    return _BYTEA_ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1], 8)]), raw)


_INTERVAL = re.compile(
    r"(?:(?P<years>[+-]?\d+) years? ?)?(?:(?P<months>[+-]?\d+) mons? ?)?(?:(?P<days>[+-]?\d+) days? ?)?"
    r"(?:(?P<sign>[+-])?(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d)(?:\.(?P<fraction>\d{1,6}))?)?"
)


def _decode_interval(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    parsed = [None if text is None else _parse_interval(text, column) for text in values.to_pylist()]
    return pa.array(parsed, pa.month_day_nano_interval())


def _parse_interval(text: str, column: str | None) -> tuple[int, int, int]:
    """An interval in IntervalStyle `postgres` as (months, days, nanoseconds)."""
    match = _INTERVAL.fullmatch(text)
    if not text or match is None:
        raise ValueDecodeError(f"{_name(column)}: {text!r} is not an interval in IntervalStyle 'postgres'")
    part = match.groupdict()
    months = int(part["years"] or 0) * 12 + int(part["months"] or 0)
    micros = 0
    if part["hours"] is not None:
        seconds = int(part["hours"]) * 3600 + int(part["minutes"]) * 60 + int(part["seconds"])
        micros = seconds * 1_000_000 + int((part["fraction"] or "").ljust(6, "0"))
        if part["sign"] == "-":
            micros = -micros
    return months, int(part["days"] or 0), micros * 1000


# --- arrays ----------------------------------------------------------------------------------------


def _decode_array_literal(values: pa.StringArray, column_type: ColumnType, column: str | None) -> pa.Array:
    assert column_type.element is not None
    elements: list[str | None] = []
    offsets = [0]
    for text in values.to_pylist():
        if text is not None:
            elements.extend(parse_array_literal(text, column=column))
        offsets.append(len(elements))
    text_lists = pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(elements, pa.string()), mask=values.is_null()
    )
    return _decode_list_elements(text_lists, column_type, column)


def _decode_list_elements(text_lists: pa.ListArray, column_type: ColumnType, column: str | None) -> pa.Array:
    assert column_type.element is not None
    offsets = text_lists.offsets
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    elements = text_to_arrow(text_lists.values.slice(first, last - first), column_type.element, column=column)
    return pa.ListArray.from_arrays(
        pc.subtract(offsets, first) if first else offsets, elements, type=arrow_type(column_type),
        mask=text_lists.is_null(),
    )


_ARRAY_ELEMENT = re.compile(r'"((?:[^"\\]|\\.)*)"|([^,]*)', re.DOTALL)
_BACKSLASH_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def parse_array_literal(text: str, *, column: str | None = None) -> list[str | None]:
    """Elements of a one-dimensional array in PostgreSQL text format, e.g. `{1,"a b",NULL}`."""
    if text.startswith("["):  # explicit bounds, e.g. `[0:1]={1,2}`
        text = text[text.index("=") + 1 :]
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueDecodeError(f"{_name(column)}: {text[:40]!r} is not an array literal")
    inner = text[1:-1]
    if not inner:
        return []
    if inner.startswith("{"):
        raise ValueDecodeError(f"{_name(column)}: multidimensional arrays are not supported ({text[:40]!r})")
    elements: list[str | None] = []
    position = 0
    while True:
        match = _ARRAY_ELEMENT.match(inner, position)
        assert match is not None  # the second alternative matches anything
        quoted, bare = match.groups()
        if quoted is not None:
            elements.append(_BACKSLASH_ESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted)
        else:
            elements.append(None if bare == "NULL" else bare)
        position = match.end()
        if position == len(inner):
            return elements
        if inner[position] != ",":
            raise ValueDecodeError(f"{_name(column)}: malformed array literal {text[:40]!r}")
        position += 1


# --- helpers ---------------------------------------------------------------------------------------

_Decoder = Callable[[pa.StringArray, ColumnType, "str | None"], pa.Array]

_DECODERS: dict[str, _Decoder] = {
    "decimal": _decode_decimal,
    "text": _decode_string,
    "json": _decode_string,
    "uuid": _decode_string,
    "bool": _decode_bool,
    "time": _decode_time,
    "timestamptz": _decode_timestamptz,
    "bytes": _decode_bytes,
    "interval": _decode_interval,
    "list": _decode_array_literal,
}


def _as_string(values: pa.Array) -> pa.StringArray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values if values.type == pa.string() else values.cast(pa.string())


def _cast(
    values: pa.StringArray, target: pa.DataType, column_type: ColumnType, column: str | None
) -> pa.Array:
    try:
        return values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise _first_failure(values, lambda one: one.cast(target), column_type, column) from None


def _first_failure(
    values: pa.StringArray, convert: Callable[[pa.StringArray], pa.Array], column_type: ColumnType,
    column: str | None,
) -> ValueDecodeError:
    """The error naming the first value that `convert` rejects (an error path: value by value)."""
    for index in range(len(values)):
        try:
            convert(values.slice(index, 1))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            return ValueDecodeError(
                f"{_name(column)}: value {values[index].as_py()!r} does not fit {_type_name(column_type)} "
                f"({error})"
            )
    return ValueDecodeError(f"{_name(column)}: values do not convert to {_type_name(column_type)}")


def _type_name(column_type: ColumnType) -> str:
    if column_type.kind == "decimal" and column_type.precision is None:
        target = arrow_type(column_type)
        return f"decimal({target.precision},{target.scale}), where unconstrained NUMERIC lands,"
    if column_type.kind == "list" and column_type.element is not None:
        return f"list<{_type_name(column_type.element)}>"
    return column_type.describe()


def _name(column: str | None) -> str:
    return f"column '{column}'" if column else "value"
