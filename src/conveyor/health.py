"""What operators probe: the readiness of the database and the HTTP endpoints `/metrics`
(Prometheus), `/ready` and `/healthz`.

`Readiness` probes the database every `interval` seconds (`Database.ping`: SELECT 1, bounded by
a timeout) and tells its listeners when the answer changes: the wiring turns that into the gRPC
health status (SERVING / NOT_SERVING) and `/ready` (200 / 503). Other parts of the server that
can be down while the process runs (Envoy, restarted by gateway/supervisor.py) are reported
with `set_down`: they make `/ready` 503 with their reason, and leave the gRPC health status
alone (gRPC does not pass through them). `/healthz` is liveness: the process answers at all.
The endpoints have their own small port (`metrics_port`), apart from Envoy's REST port and
behind no API key, as scrapers and orchestrators expect. The server is a few lines over asyncio
streams rather than aiohttp's web server, which would add ~8 MB to every server for three GET
routes; it answers one request per connection (HTTP/1.1, `Connection: close`), which is all a
scraper or a probe makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from conveyor.engine.background import Background

log = logging.getLogger(__name__)

# Seconds between probes, and how long one may take before the database counts as unreachable.
PROBE_INTERVAL_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 5.0
# A client that has not sent its request line and headers within this is dropped.
_REQUEST_TIMEOUT_SECONDS = 5.0
# Request headers beyond this many lines are not read (nothing here needs them).
_MAX_HEADER_LINES = 100

Listener = Callable[[bool], Awaitable[None]]


class Readiness:
    """Probes the database in the background; `ready` is the last answer."""

    def __init__(self, probe: Callable[[], Awaitable[None]], interval: float = PROBE_INTERVAL_SECONDS,
                 timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        self.probe = probe
        self.interval = interval
        self.timeout = timeout
        self.ready = False
        self.listeners: list[Listener] = []
        # Parts of the server not serving now, by name, with why (`set_down`).
        self._down: dict[str, str] = {}
        self._background = Background("conveyor-readiness", self._loop)

    async def check(self) -> bool:
        """Probe once now, tell the listeners if the answer changed, and return it."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.probe()
            ready = True
        except Exception as e:
            if self.ready:
                log.warning("readiness: the database is unreachable: %s: %s", type(e).__name__,
                            next(iter(str(e).splitlines()), ""))
            ready = False
        if ready != self.ready:
            self.ready = ready
            if ready:
                log.info("readiness: the database is reachable")
            for listener in self.listeners:
                try:
                    await listener(ready)
                except Exception:
                    log.exception("readiness: a listener failed")
        return ready

    def set_down(self, part: str, reason: str | None) -> None:
        """Record that `part` does not serve now and why, or (reason None) that it serves again."""
        if reason is None:
            self._down.pop(part, None)
        else:
            self._down[part] = reason

    @property
    def reasons(self) -> list[str]:
        """Why the server is not ready (the database first); empty when it is."""
        return ([] if self.ready else ["the database is unreachable"]) + list(self._down.values())

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval)


class OpsServer:
    """Serves /metrics, /ready and /healthz over plain HTTP."""

    def __init__(self, registry: CollectorRegistry, readiness: Readiness, host: str, port: int) -> None:
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/ready":
            if reasons := self.readiness.reasons:
                return 503, "text/plain; charset=utf-8", f"not ready: {'; '.join(reasons)}\n".encode()
            return 200, "text/plain; charset=utf-8", b"ready\n"
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        return 404, "text/plain; charset=utf-8", b"not found: /metrics, /ready, /healthz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_SECONDS):
                request = (await reader.readline()).decode("latin-1").split()
                for _ in range(_MAX_HEADER_LINES):  # the headers, up to the blank line
                    if (await reader.readline()).strip() == b"":
                        break
            if len(request) != 3 or not request[2].startswith("HTTP/"):
                status, ctype, body = 400, "text/plain; charset=utf-8", b"bad request\n"
                method = "GET"
            else:
                method, path = request[0], request[1]
                status, ctype, body = self.answer(method, path)
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # a client that hung up or dawdled, or a line beyond the reader's limit
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
