"""Binlog positions: where a MariaDB stream is, as a checkpoint text and as an ordered number.

A position is a binlog file and the byte offset of the next event in it, with the server's GTID
state there (MariaDB's `BINLOG_GTID_POS(file, pos)`, e.g. `0-17-42`). The checkpoint text is
`<file>:<pos> gtid=<state>`; the GTID state lets a restart check that the binlog at that file and
offset is still the one the pipeline read (not a new server, nor a `RESET MASTER`).

`ordinal` orders positions of one server's binlog (files are numbered, offsets grow within a
file): it is the `_nilus_lsn` the sink rows carry and what a table's checkpoint is compared with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FILE_NUMBER = re.compile(r"\.(\d+)$")
_TEXT = re.compile(r"^(?P<file>[^:\s]+):(?P<pos>\d+)(?: gtid=(?P<gtid>\S*))?$")
_OFFSET_BITS = 32  # a binlog event header's position is 4 bytes: an offset never reaches 2**32


class BadPosition(ValueError):
    """A checkpoint that is not a binlog position (e.g. one a PostgreSQL pipeline wrote)."""


@dataclass(frozen=True, order=False)
class BinlogPosition:
    file: str
    pos: int
    gtid: str = ""  # the GTID state at the position (MariaDB: comma-separated domain-server-seq)

    @property
    def ordinal(self) -> int:
        match = _FILE_NUMBER.search(self.file)
        if match is None:
            raise BadPosition(f"binlog file name {self.file!r} has no sequence number")
        return (int(match.group(1)) << _OFFSET_BITS) | self.pos

    def text(self) -> str:
        return f"{self.file}:{self.pos}" + (f" gtid={self.gtid}" if self.gtid else "")

    @classmethod
    def parse(cls, text: str) -> BinlogPosition:
        match = _TEXT.match(text.strip())
        if match is None:
            raise BadPosition(f"{text!r} is not a binlog position (<file>:<offset> gtid=<state>)")
        return cls(match.group("file"), int(match.group("pos")), match.group("gtid") or "")

    def __str__(self) -> str:
        return self.text()


def gtid_state(text: str) -> dict[int, str]:
    """A MariaDB GTID state (`0-1-5,1-2-9`) as domain → GTID."""
    state: dict[int, str] = {}
    for gtid in filter(None, (part.strip() for part in text.split(","))):
        state[int(gtid.split("-", 1)[0])] = gtid
    return state


def advance_gtid(state: str, gtid: str) -> str:
    """The GTID state after the transaction `gtid` (its domain's entry replaced)."""
    domains = gtid_state(state)
    domains[int(gtid.split("-", 1)[0])] = gtid
    return ",".join(domains[d] for d in sorted(domains))
