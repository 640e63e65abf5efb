"""A correct decoder of binlog TIME values (MySQL 5.6 TIME2 format, which MariaDB uses too).

mysql-replication 1.0.17 decodes the integer part and the fraction of a negative TIME separately,
but a negative value is stored as one packed number: `-00:00:00.000001` came out as -0.999999 s, a
silent wrong value. This follows the server's `my_time_packed_from_binary` and replaces the
library's method (a class attribute, name-mangled: `RowsEvent.__read_time2`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymysqlreplication.row_event import RowsEvent

_TIMEF_OFS = 0x800000000000
_TIMEF_INT_OFS = 0x800000
_LIBRARY_METHOD = "_RowsEvent__read_time2"


def packed_time(raw: bytes, fsp: int) -> timedelta:
    """The TIME value of its binlog bytes (3 bytes, then (fsp + 1) // 2 of fraction)."""
    if fsp >= 5:
        packed = int.from_bytes(raw[:6], "big") - _TIMEF_OFS
    else:
        intpart = int.from_bytes(raw[:3], "big") - _TIMEF_INT_OFS
        frac_bytes = (fsp + 1) // 2
        frac = int.from_bytes(raw[3:3 + frac_bytes], "big") if frac_bytes else 0
        if intpart < 0 and frac:  # negative values keep their fraction in reverse order
            intpart += 1
            frac -= 1 << (8 * frac_bytes)
        packed = (intpart << 24) + frac * (10_000 if frac_bytes == 1 else 100 if frac_bytes == 2 else 0)
    negative, packed = packed < 0, abs(packed)
    hms, micros = packed >> 24, packed % (1 << 24)
    value = timedelta(hours=(hms >> 12) % (1 << 10), minutes=(hms >> 6) % (1 << 6), seconds=hms % (1 << 6),
                      microseconds=micros)
    return -value if negative else value


def _read_time2(self: Any, column: Any) -> timedelta:
    fsp = column.fsp or 0
    return packed_time(self.packet.read(3 + (fsp + 1) // 2), fsp)


def install() -> None:
    if not hasattr(RowsEvent, _LIBRARY_METHOD):
        raise RuntimeError(f"mysql-replication changed: RowsEvent has no {_LIBRARY_METHOD}; check its TIME decoding")
    setattr(RowsEvent, _LIBRARY_METHOD, _read_time2)
