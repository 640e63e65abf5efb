"""A client-side deadline for a query on an ordinary connection.

TCP keepalives notice a peer that stopped answering, but not a connection whose far end still
acknowledges packets and forwards nothing (a wedged proxy or NAT, a frozen network path). A query
on such a connection would wait forever; `io_deadline` shuts the socket down when the block
outlasts its bound, so the query fails with `psycopg.OperationalError` and the run reconnects.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

QUERY_DEADLINE_S = 15.0


def _shutdown(fd: int) -> None:
    with suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))  # shutdown acts on the socket, not the duplicate fd
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


@contextmanager
def io_deadline(conn: psycopg.Connection[Any], seconds: float = QUERY_DEADLINE_S) -> Iterator[None]:
    """Break `conn` if the block takes longer than `seconds`."""
    if conn.closed:
        yield
        return
    timer = threading.Timer(seconds, _shutdown, (conn.pgconn.socket,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
