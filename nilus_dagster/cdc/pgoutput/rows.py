"""Row changes as plain tuples (the stream's hot path): `decode_row_change`.

It returns Insert, Update and Delete as `(kind, relation_id, new, old, old_is_key_only, special)`:
kind is the message type byte (b"I"[0], b"U"[0], b"D"[0]), `new` is None for a Delete, `old` None
unless sent, `special` True when a tuple holds an UNCHANGED_TOAST or a binary value. Same checks as
`decode`, without an object per message; every other message comes from `decode`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from nilus_dagster.cdc.pgoutput.messages import Message, PgOutputError, TupleData
from nilus_dagster.cdc.pgoutput.wire import _KEY, _NEW, _OLD, _UINT32, _ends, _expect, _tuple_flagged, decode

RowChange = tuple[int, int, TupleData | None, TupleData | None, bool, bool]
_INSERT_KIND, _UPDATE_KIND, _DELETE_KIND = b"I"[0], b"U"[0], b"D"[0]


def _insert_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    if buf[pos + 4] != _NEW:
        _expect(buf, pos + 4, _NEW, "Insert")
    new, end, special = _tuple_flagged(buf, pos + 5)
    _ends(buf, end)
    return (_INSERT_KIND, relation_id, new, None, False, special)


def _update_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    pos += 4
    marker = buf[pos]
    if marker == _NEW:
        new, end, special = _tuple_flagged(buf, pos + 1)
        _ends(buf, end)
        return (_UPDATE_KIND, relation_id, new, None, False, special)
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Update: expected 'K', 'O' or 'N' at offset {pos}, got {chr(marker)!r}")
    old, pos, old_special = _tuple_flagged(buf, pos + 1)
    _expect(buf, pos, _NEW, "Update")
    new, end, special = _tuple_flagged(buf, pos + 1)
    _ends(buf, end)
    return (_UPDATE_KIND, relation_id, new, old, marker == _KEY, special or old_special)


def _delete_row(buf: bytes, pos: int) -> RowChange:
    (relation_id,) = _UINT32(buf, pos)
    marker = buf[pos + 4]
    if marker not in (_KEY, _OLD):
        raise PgOutputError(f"Delete: expected 'K' or 'O' at offset {pos + 4}, got {chr(marker)!r}")
    old, end, special = _tuple_flagged(buf, pos + 5)
    _ends(buf, end)
    return (_DELETE_KIND, relation_id, None, old, marker == _KEY, special)


_ROW_DECODERS: dict[int, Callable[[bytes, int], RowChange]] = {
    _INSERT_KIND: _insert_row,
    _UPDATE_KIND: _update_row,
    _DELETE_KIND: _delete_row,
}


def decode_row_change(payload: bytes | bytearray | memoryview, offset: int = 0) -> Message | RowChange:
    """Like `decode`, but Insert, Update and Delete come as `RowChange` tuples (see above)."""
    buf = payload if type(payload) is bytes else bytes(payload)
    try:
        row_decoder = _ROW_DECODERS.get(buf[offset])
    except IndexError:
        raise PgOutputError("empty pgoutput message") from None
    if row_decoder is None:
        return decode(buf, offset)
    try:
        return row_decoder(buf, offset + 1)
    except PgOutputError:
        raise
    except IndexError:
        raise PgOutputError(f"truncated pgoutput {chr(buf[offset])!r} message") from None
    except (struct.error, ValueError) as error:  # UnicodeDecodeError is a ValueError
        raise PgOutputError(f"malformed pgoutput {chr(buf[offset])!r} message: {error}") from error

