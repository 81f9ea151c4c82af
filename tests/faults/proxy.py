"""A TCP proxy between a server and PostgreSQL that can fail the way networks and databases do.

`FaultProxy` listens on a free local port and forwards every connection to the real
PostgreSQL. Its mode says what happens to the bytes, for connections open now and new ones:

- ``pass``: forwarded as they come.
- ``drop``: every open connection is closed at once (as a database restart or
  pg_terminate_backend would leave them) and new ones are closed as soon as they are accepted.
- ``blackhole``: connections are accepted but nothing is forwarded either way (a network
  partition, a hung server): a peer waits for an answer that never comes. Back in ``pass``, what
  waited is forwarded, as TCP retransmits once a partition heals.
- ``delay``: every chunk is forwarded `delay` seconds late (a slow or congested link).

Used in the tests' own process (asyncio) and by bench/faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

Mode = Literal["pass", "drop", "blackhole", "delay"]

_CHUNK = 64 * 1024


class FaultProxy:
    """``async with FaultProxy(upstream_port) as proxy``: ``proxy.port`` forwards to it."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "pass"
        self.delay = 0.0
        self.port = 0
        # Connections accepted in all (a new one per reconnect of the server's pool).
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._healed = asyncio.Event()
        self._healed.set()

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        """Switch what happens to the bytes, for open connections and new ones alike."""
        self.mode, self.delay = mode, delay
        if mode == "drop":
            for link in list(self._links):
                link.close()
        if mode == "blackhole":
            self._healed.clear()
        else:
            self._healed.set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "drop":
            writer.close()
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            await self._healed.wait()  # black-holed: accepted, never answered
            if self.mode == "drop":
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            link.writers.append(up_writer)
            await asyncio.gather(self._pump(reader, up_writer, link), self._pump(up_reader, writer, link))
        except asyncio.CancelledError:
            pass  # the proxy is closing
        finally:
            link.close()
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while not link.closed:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                await self._healed.wait()
                if self.mode == "delay" and self.delay > 0:
                    await asyncio.sleep(self.delay)
                if link.closed:
                    break
                writer.write(data)
                await writer.drain()
        link.close()


class _Link:
    """The two sockets of one proxied connection, closed together."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()  # at once, like a reset: no FIN handshake to wait for
