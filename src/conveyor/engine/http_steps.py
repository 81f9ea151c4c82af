"""HttpSteps: the engine's own executor of `http` steps, on the step-lease machinery.

Owns everything between "an http step is ready" and "its attempt is reported": leasing ready
http steps in batches (`Leases.acquire`, queue "", kind http) under a concurrency cap, making each
request with one shared aiohttp session whose resolver enforces the egress policy
(engine/egress.py), and reporting the attempt like any worker would, fenced by (step, attempt,
holder). aiohttp, not httpx, because the executor shares the engine's one core: measured here,
aiohttp costs ~0.1 ms of CPU per request, httpx ~1.9 ms (httpcore's pure-Python HTTP/1.1). No
request runs
inside a database transaction: the lease commits first, the request runs, the report is its own
unit of work.

Outcomes: 2xx completes the step with `{status, headers, body}` (body parsed when the response
says it is JSON, else text); any other status, a connection error or a timeout is a retryable
failure (retried per the step's policy); a body over the cap, a refused destination
(EGRESS_DENIED) or a config that renders to nonsense fails the attempt for good, since a retry
would meet the same answer. Redirects are not followed.

At-least-once: each lease covers its attempt's timeout plus a margin (extended once before the
request when the attempt's timeout is longer than the default). An executor that dies
mid-request never reports; the lease expires, and the attempt is lost (no retry spent) and offered
again with attempt+1. A server that stops gives its attempts back at once (`stop`), a loss too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.domain.egress import BadUrl, Destination, EgressDenied, EgressPolicy, destination
from conveyor.domain.errors import ConveyorError
from conveyor.domain.feed import HTTP_KEY
from conveyor.domain.kinds import http_problems
from conveyor.domain.records import Caller
from conveyor.domain.spec import StepKind
from conveyor.engine.background import Background, abandon, log_loop_failure
from conveyor.engine.egress import EgressClient, Resolver, aiohttp_module, resolve
from conveyor.engine.leases import MAX_RETRY_AFTER_SECONDS, Lease, Leases
from conveyor.engine.pulse import KeyedPulses
from conveyor.settings import Settings

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

# Added to an attempt's timeout to make its lease: covers the wait between the lease and the
# request and between the response and its report's commit. Short, because it is also how long
# a crashed executor's attempt waits before it is retried.
LEASE_MARGIN_SECONDS = 10.0
# Why an attempt cut by a server stop was given back, and how long the giving back may take
# (the database may be what is failing; a lease not given back expires, which is a loss too).
STOPPING = "server stopping"
RELEASE_TIMEOUT_SECONDS = 5.0
# Characters of a non-2xx response body quoted in the attempt's error.
_EXCERPT_CHARS = 200
_JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
# An attempt's error when the executor itself failed (the server's log has the traceback).
_INTERNAL = "INTERNAL: the request could not be made (see the server log)"




class _BadConfig(Exception):
    """The rendered config cannot be a request: the same render fails every attempt."""


class _TooLarge(Exception):
    """The response body is over the cap."""


@dataclass(frozen=True)
class _Request:
    method: str
    target: Destination
    headers: dict[str, str]
    body: Any
    timeout: float


@dataclass(frozen=True)
class _Outcome:
    """What an attempt reports: an output, or an error (retryable or not)."""

    output: dict[str, Any] | None = None
    error: str = ""
    retryable: bool = True
    retry_after: float = 0.0


class HttpSteps:
    """Leases ready http steps, performs their requests and reports them."""

    def __init__(self, leases: Leases, pulses: KeyedPulses, settings: Settings,
                 resolver: Resolver = resolve) -> None:
        self.leases = leases
        self.pulses = pulses
        self.max_concurrency = settings.http_max_concurrency
        self.max_body_bytes = settings.http_max_body_bytes
        self.default_timeout = settings.http_default_timeout_seconds
        self.max_url_length = settings.limits.max_url_length
        # The safety poll: a retry whose backoff ends is made ready by time passing, which no
        # commit announces, and a pulse of another process never reaches this one.
        self.idle_seconds = settings.engine_idle_seconds
        # Shown as the step's worker_id: which process ran the attempt.
        self.holder = f"engine:http:{socket.gethostname()}:{os.getpid()}"
        self._caller = Caller(name=self.holder)  # no project: http steps of every project
        self._egress = EgressClient(EgressPolicy.parse(settings.http_allow), resolver, self.max_concurrency)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._leases: dict[asyncio.Task[None], Lease] = {}  # of the tasks in flight
        self._slot_freed = asyncio.Event()
        self._background = Background("conveyor-http-steps", self._loop)

    # -- one round (tests drive this with a ManualClock) ------------------------------------

    async def run_once(self) -> int:
        """Lease what is ready (up to the concurrency cap), perform those requests concurrently
        and report them; returns how many attempts were handled."""
        leases = await self._lease(self.max_concurrency)
        await asyncio.gather(*(self._attempt(lease) for lease in leases))
        return len(leases)

    # -- background loop --------------------------------------------------------------------

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        """Stop leasing, cut the requests in flight and give their leases back: a server stop
        is no verdict on a request, so each attempt is lost, not failed (SPEC §4.3), and is
        offered again at once (to another replica, or to this one when it is back)."""
        await self._background.stop()  # first: the loop starts no new task after this
        cut = list(self._leases.values())  # before abandoning: their done callbacks forget them
        await abandon(self._in_flight)
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await asyncio.gather(*(self.leases.release(lease.step.id, lease.step.attempt, self.holder,
                                                           STOPPING, self._caller) for lease in cut),
                                     return_exceptions=True)  # LEASE_LOST: reported or ended anyway
        except TimeoutError:
            log.warning("http steps: giving back %d lease(s) at shutdown timed out; they will expire",
                        len(cut))
        await self._egress.close()

    async def _loop(self) -> None:
        probe = False
        while True:
            # Taken before leasing, so a step made ready while we lease is not missed.
            ready = self.pulses.next(HTTP_KEY)
            self._slot_freed.clear()
            free = self.max_concurrency - len(self._in_flight)
            saturated = free <= 0
            if free > 0:
                try:
                    leases = await self._lease(free, probe)
                except Exception as e:
                    # The database is unavailable or the lease failed: the steps stay ready in
                    # the database; look again after the idle wait.
                    log_loop_failure(log, "http steps: leasing failed", e)
                    leases = []
                for lease in leases:
                    task = asyncio.create_task(self._attempt(lease), name=f"http-step-{lease.step.id}")
                    self._in_flight.add(task)
                    self._leases[task] = lease
                    task.add_done_callback(self._finished)
                # Every free slot taken: more may be ready, worth a look as soon as a slot frees.
                saturated = len(leases) == free
            # Woken by nothing but the idle wait: the next look is a probe.
            probe = not await _first(ready, self._slot_freed if saturated else None, self.idle_seconds)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._leases.pop(task, None)
        self._slot_freed.set()

    # -- one attempt --------------------------------------------------------------------------

    async def _lease(self, max_steps: int, probe: bool = False) -> list[Lease]:
        return await self.leases.acquire("", self.holder, self.default_timeout + LEASE_MARGIN_SECONDS,
                                         max_steps, self._caller, kinds=(StepKind.HTTP,), probe=probe)

    async def _attempt(self, lease: Lease) -> None:
        step = lease.step
        try:
            request = self._request_of(lease)
        except _BadConfig as e:
            await self._report(lease, _Outcome(error=f"config: {e}", retryable=False))
            return
        except Exception:
            # A bug, not the config's fault; still the attempt is failed now, not left to strand
            # its lease (and the same config would meet the same bug on every retry).
            log.exception("http step %s attempt %d: building the request failed", step.id, step.attempt)
            await self._report(lease, _Outcome(error=_INTERNAL, retryable=False))
            return
        try:
            if request.timeout > self.default_timeout:
                # Acquired for the default timeout: extend the lease to cover this attempt's.
                await self.leases.heartbeat(step.id, step.attempt, self.holder,
                                            request.timeout + LEASE_MARGIN_SECONDS, self._caller)
        except ConveyorError as e:
            log.info("http step %s attempt %d: lease lost before the request (%s)", step.id, step.attempt, e)
            return
        await self._report(lease, await self._perform(request))

    async def _report(self, lease: Lease, outcome: _Outcome) -> None:
        step = lease.step
        try:
            if outcome.output is not None:
                await self.leases.complete(step.id, step.attempt, self.holder, outcome.output, self._caller)
            else:
                await self.leases.fail(step.id, step.attempt, self.holder, outcome.error, outcome.retryable,
                                       self._caller, retry_after=outcome.retry_after)
        except ConveyorError as e:
            # Usually LEASE_LOST: canceled, skipped, timed out or expired meanwhile; the result
            # is dropped, as a late worker's would be. Anything else leaves the lease to expire.
            log.info("http step %s attempt %d: report refused (%s: %s)", step.id, step.attempt, e.reason, e)
        except Exception:
            # The report did not commit (database trouble): the lease expires and the attempt
            # is retried, which at-least-once allows.
            log.exception("http step %s attempt %d: reporting failed", step.id, step.attempt)

    def _request_of(self, lease: Lease) -> _Request:
        """The request from the rendered config (templates may render anything, so it is
        checked again, by the same check as when it was written: domain/kinds.py); the timeout
        is the config's or the step's, the shorter if both."""
        config = lease.config  # rendered with its secrets; the stored input has them masked
        problem = next(http_problems(config, self.max_url_length, rendered=True), None)
        if problem is not None:
            raise _BadConfig(" ".join(problem))  # the first; it never quotes a value (secrets)
        headers = config.get("headers") or {}
        timeouts = [float(t) for t in (config.get("timeout_seconds"), lease.spec.timeout_seconds) if t]
        return _Request(config.get("method", "GET").upper(), destination(config["url"], self.max_url_length),
                        {str(k): _header_value(v) for k, v in headers.items()},
                        config.get("body"), min(timeouts, default=self.default_timeout))

    async def _perform(self, request: _Request) -> _Outcome:
        """Make the request; every way it can end becomes an outcome, never an exception."""
        aiohttp = aiohttp_module()
        body = request.body
        try:
            # The whole attempt is bounded: connect, send and every read, so a server dripping
            # bytes cannot outlast it either.
            async with asyncio.timeout(request.timeout), self._egress.request(
                    request.method, request.target, headers=request.headers,
                    data=body.encode() if isinstance(body, str) else None,
                    json=body if body is not None and not isinstance(body, str) else None) as response:
                content = await self._read_capped(response)
        except EgressDenied as e:
            return _Outcome(error=str(e), retryable=False)
        except BadUrl as e:
            return _Outcome(error=f"config: url {e}", retryable=False)
        except _TooLarge:
            return _Outcome(error=f"RESPONSE_TOO_LARGE: the response body exceeds {self.max_body_bytes} "
                                  f"bytes (http_max_body_bytes)", retryable=False)
        except TimeoutError as e:
            return _Outcome(error=f"{type(e).__name__}: no response within {request.timeout:g}s")
        except (aiohttp.ClientConnectorError, OSError) as e:
            # Named as the README documents it, whatever the client library calls it.
            return _Outcome(error=f"ConnectError: {_one_line(str(e)) or 'no detail'}")
        except (aiohttp.ClientError, ValueError) as e:
            return _Outcome(error=f"{type(e).__name__}: {_one_line(str(e)) or 'no detail'}")
        except Exception:
            log.exception("http step request to %s failed unexpectedly", request.target.host)
            return _Outcome(error=_INTERNAL, retryable=False)
        return self._outcome(response, content)

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self.max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(64 * 1024):  # decoded: the cap bounds what is kept
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _outcome(self, response: aiohttp.ClientResponse, content: bytes) -> _Outcome:
        text = content.decode(response.charset or "utf-8", errors="replace")
        headers: dict[str, str] = {}
        for name, value in response.headers.items():
            key = name.lower()  # names lowercased; a repeated header's values joined, as HTTP allows
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if 200 <= response.status < 300:
            return _Outcome(output={"status": response.status, "headers": headers,
                                    "body": _body(headers, content, text)})
        detail = _one_line(text)[:_EXCERPT_CHARS]
        if 300 <= response.status < 400 and "location" in headers:
            detail = f"redirects are not followed (location: {headers['location']})"
        return _Outcome(error=f"HTTP {response.status}: {detail}",
                        retry_after=_retry_after(headers.get("retry-after", "")))


def _body(headers: dict[str, str], content: bytes, text: str) -> Any:
    """The JSON value when the response says it is JSON and it parses, else the text."""
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if _JSON_TYPE.match(media_type):
        with contextlib.suppress(ValueError):
            # NaN and Infinity are not JSON and no database column would take them back.
            return json.loads(content, parse_constant=_refuse_constant)
    return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _header_value(value: object) -> str:
    """A header's value as sent (checked to be a string, number or boolean): a whole-string
    template keeps its JSON type when rendered, so a number or boolean is written as JSON
    writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _retry_after(value: str) -> float:
    """A Retry-After of delta-seconds (an HTTP date is ignored: the step's backoff applies)."""
    return min(float(value), MAX_RETRY_AFTER_SECONDS) if value.strip().isdigit() else 0.0


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def _first(ready: asyncio.Event, freed: asyncio.Event | None, seconds: float) -> bool:
    """Wait until an http step is announced ready, a slot frees (when given), or `seconds`;
    True unless only the time ran out."""
    waits = [asyncio.ensure_future(e.wait()) for e in (ready, freed) if e is not None]
    try:
        done, _ = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return bool(done)
