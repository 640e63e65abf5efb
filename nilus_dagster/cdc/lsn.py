"""PostgreSQL log sequence numbers (LSNs): 64-bit WAL positions, written `XXXXXXXX/XXXXXXXX`.

Everywhere in the CDC code an LSN is a plain `int`; these helpers convert at the edges (SQL,
state store, logs).
"""

from __future__ import annotations

import re

Lsn = int

INVALID_LSN: Lsn = 0
_MAX_LSN = (1 << 64) - 1
_LSN_TEXT = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str) -> Lsn:
    """`'16/B374D848'` → `0x16B374D848`; raises ValueError on anything else."""
    match = _LSN_TEXT.match(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not an LSN: expected two hex numbers like '16/B374D848'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: Lsn) -> str:
    """`0x16B374D848` → `'16/B374D848'` (PostgreSQL's own spelling)."""
    if not 0 <= lsn <= _MAX_LSN:
        raise ValueError(f"{lsn} is not an LSN: it must fit in 64 unsigned bits")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
