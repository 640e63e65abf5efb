"""A TCP proxy on loopback that injects network faults between a client and a server.

`cut()` drops every open connection at once (as a reset would), `freeze()` silently stops
forwarding in both directions (connections stay open and nothing arrives: a wedged NAT or a dead
path), `thaw()` resumes, `refuse()` turns new connections away, `delay_s` adds latency per chunk.
The proxy runs an asyncio loop in a thread of its own; its controls are called from the test.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Self


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.delay_s = 0.0
        self.refusing = False
        self.connections = 0  # accepted so far
        self._frozen = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=5)
        return self

    def dsn(self, dsn: str) -> str:
        """`dsn` (postgresql://user@127.0.0.1:port/db) pointed at the proxy instead."""
        head, _, tail = dsn.partition("@")
        _, _, path = tail.partition("/")
        return f"{head}@127.0.0.1:{self.port}/{path}"

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._forward(reader, writer)
        except (ConnectionError, OSError):
            writer.transport.abort()  # one side dropped: so does the other

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            while self._frozen.is_set():  # hold the data: nothing arrives, nothing is refused
                await asyncio.sleep(0.02)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if writer.transport.is_closing():
                return
            writer.write(data)
            await writer.drain()
        writer.transport.abort()

    def cut(self) -> None:
        """Drop every open connection (both sides see it closed)."""

        def abort_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(abort_all)

    def freeze(self) -> None:
        self._frozen.set()

    def thaw(self) -> None:
        self._frozen.clear()

    def refuse(self, refusing: bool = True) -> None:
        self.refusing = refusing

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        for task in asyncio.all_tasks(self._loop):  # connections still open: end them quietly
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()
