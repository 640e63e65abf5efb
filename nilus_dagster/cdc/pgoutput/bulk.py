"""`decode_many`: many XLogData payloads at once, the row changes' values parsed by Arrow kernels.

Decoding a tuple value by value in Python costs most of a stream's CPU (a loop step, a struct
unpack, a slice and a UTF-8 decode per value). Here the payloads are joined into one buffer and
each column of a run of row changes with the same column count is located for all rows at once
(Arrow compute over the rows' positions), gathered with one `take` and checked as UTF-8 by one
cast; only the resulting Python strings are made per value. The result is exactly what
`decode_row_change` returns for each payload: a message it does not cover (Begin, Commit,
Relation, an Update carrying its old tuple, a tuple with an unchanged TOAST or binary value, a
malformed one) is decoded by `decode_row_change`, which also raises the precise error.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nilus_dagster.cdc.pgoutput.messages import Message, TupleData
from nilus_dagster.cdc.pgoutput.rows import _DELETE_KIND, _INSERT_KIND, _UPDATE_KIND, RowChange, decode_row_change
from nilus_dagster.cdc.pgoutput.wire import _KEY, _NEW, _OLD

# Fewer row changes than this in a poll are decoded one by one (the kernels' fixed cost).
MIN_BULK_ROWS = 64
_TEXT, _NULL = ord("t"), ord("n")
# Kind and tuple marker of the row changes parsed here (an Update carrying an old tuple is not).
_SIMPLE_HEADS = pa.array(
    [_INSERT_KIND << 8 | _NEW, _UPDATE_KIND << 8 | _NEW, _DELETE_KIND << 8 | _KEY, _DELETE_KIND << 8 | _OLD], pa.int64()
)
_FALSE = repeat(False)
_PAD = 8  # zero bytes after the joined payloads: reads up to 7 bytes past a clamped position
_ARANGE: list[pa.Array] = [pa.array(range(1 << 15), pa.int64())]


def _arange(n: int) -> pa.Array:
    """0, 1, ..., n - 1 (a slice of a cached array: building one from a range costs ~0.5 us a value)."""
    if len(_ARANGE[0]) < n:
        _ARANGE[0] = pa.array(range(max(n, 2 * len(_ARANGE[0]))), pa.int64())
    return _ARANGE[0].slice(0, n)


class _NotBulk(Exception):
    """The group needs the value-by-value decoder (a TOAST/binary value, a malformed tuple)."""


def decode_many(payloads: Sequence[bytes], offset: int) -> list[Message | RowChange]:
    """`[decode_row_change(p, offset) for p in payloads]`, the common row changes in bulk."""
    if len(payloads) < MIN_BULK_ROWS:
        return [decode_row_change(buf, offset) for buf in payloads]
    try:
        heads, tuples, simple = _parse(payloads, offset)
    except _NotBulk:
        return [decode_row_change(buf, offset) for buf in payloads]
    kinds, relation_ids, markers = heads
    if _INSERT_KIND not in kinds and _UPDATE_KIND not in kinds:  # deletes only (or nothing simple)
        decoded: list[Any] = list(zip(kinds, relation_ids, repeat(None), tuples, map(_KEY.__eq__, markers), _FALSE))
    elif _DELETE_KIND not in kinds:
        decoded = list(zip(kinds, relation_ids, tuples, repeat(None), _FALSE, _FALSE))
    else:
        decoded = [
            (k, r, None, t, m == _KEY, False) if k == _DELETE_KIND else (k, r, t, None, False, False)
            for k, r, t, m in zip(kinds, relation_ids, tuples, markers, strict=True)
        ]
    if simple is not None:  # the others one by one
        for index, ok in enumerate(simple):
            if not ok:
                decoded[index] = decode_row_change(payloads[index], offset)
    return decoded


def _parse(
    payloads: Sequence[bytes], offset: int
) -> tuple[tuple[list[int], list[int], list[int]], list[TupleData], list[bool] | None]:
    """Kinds, relation ids and tuple markers; the tuples; which payloads were parsed here (None: all)."""
    sizes = pa.array(map(len, payloads), pa.int64())
    ends = pc.cumulative_sum(sizes)
    joined = b"".join(payloads)
    if len(joined) >= 1 << 31:
        raise _NotBulk
    last = len(joined) - 1  # positions are clamped to it; the padding makes reads past it safe
    data = pa.py_buffer(joined + bytes(_PAD))
    byte = pa.Array.from_buffers(pa.uint8(), last + 1 + _PAD, [None, data])
    base = pc.add(pc.subtract(ends, sizes), offset)  # each payload's message
    message = pc.min_element_wise(base, last)
    kind, marker = _at(byte, message), _at(byte, pc.add(message, 5))
    count = _uint(byte, pc.add(message, 6), 2)
    head = pc.bit_wise_or(pc.shift_left(kind, 8), marker)
    simple = pc.and_(pc.greater_equal(sizes, offset + 8), pc.is_in(head, value_set=_SIMPLE_HEADS))
    columns = pc.max(pc.if_else(simple, count, 0)).as_py() or 0
    position = pc.add(base, 8)  # the first value
    located: list[tuple[pa.Array, pa.Array, pa.Array]] = []
    for column in range(columns):
        active = pc.greater(count, column)
        at = pc.min_element_wise(position, last)
        kind_of_value = _at(byte, at)
        text = pc.and_(active, pc.equal(kind_of_value, _TEXT))
        simple = pc.and_(simple, pc.or_(pc.invert(active), pc.or_(text, pc.equal(kind_of_value, _NULL))))
        length = pc.if_else(text, _uint(byte, pc.add(at, 1), 4), 0)
        simple = pc.and_(simple, pc.less(length, 1 << 31))  # (a negative length: malformed)
        located.append((pc.add(position, 5), length, text))
        after = pc.if_else(active, pc.add(position, 1), position)  # past a NULL, or no value at all
        position = pc.if_else(text, pc.add(pc.add(position, 5), length), after)
    simple = pc.and_(simple, pc.equal(position, ends))  # the tuple ends its payload exactly
    if not pc.any(simple).as_py():
        raise _NotBulk
    start_of = pc.subtract(base, offset)
    values = [_strings(data, start_of, begin, length, pc.and_(text, simple)) for begin, length, text in located]
    tuples: list[Any] = list(zip(*values, strict=True)) if values else [() for _ in payloads]
    if pc.min(pc.if_else(simple, count, columns)).as_py() != columns:  # tables with fewer columns in the same poll
        tuples = [t[:c] for t, c in zip(tuples, count.to_pylist(), strict=True)]
    heads = (kind.to_pylist(), _uint(byte, pc.add(message, 1), 4).to_pylist(), marker.to_pylist())
    return heads, tuples, None if pc.all(simple).as_py() else simple.to_pylist()


def _at(byte: pa.Array, position: pa.Array) -> pa.Array:
    """The bytes at `position` (within the padded buffer: clamped by the caller)."""
    return pc.take(byte, position).cast(pa.int64())


def _uint(byte: pa.Array, position: pa.Array, size: int) -> pa.Array:
    """The big-endian unsigned integer of `size` bytes at each position."""
    value = _at(byte, position)
    for shift in range(1, size):
        value = pc.bit_wise_or(pc.shift_left(value, 8), _at(byte, pc.add(position, shift)))
    return value


def _strings(data: pa.Buffer, base: pa.Array, value_start: pa.Array, length: pa.Array, text: pa.Array) -> list:
    """The values (None where not `text`) as Python strings; one UTF-8 check for all of them."""
    rows = len(value_start)
    # One binary array over the joined buffer whose even elements are the values and odd ones the
    # bytes between them: offsets start, end, start, end..., ascending (a value that is not taken:
    # empty, at its payload's start).
    start = pc.if_else(text, value_start, base)
    end = pc.if_else(text, pc.add(value_start, length), base)
    both = pa.concat_arrays([start, end])
    order = _arange(2 * rows)
    interleave = pc.add(pc.multiply(pc.bit_wise_and(order, 1), rows), pc.shift_right(order, 1))
    offsets = pc.take(both, interleave).cast(pa.int32())
    spans = pa.Array.from_buffers(pa.binary(), 2 * rows - 1, [None, offsets.buffers()[1], data])
    picks = pc.if_else(text, pc.multiply(_arange(rows), 2), pa.scalar(None, pa.int64()))
    try:
        return pc.take(spans, picks).cast(pa.string()).to_pylist()
    except pa.ArrowInvalid:  # not UTF-8: the value-by-value decoder names the message
        raise _NotBulk from None
