"""Notifier: delivers the notification outbox (domain/notifications.py) to its webhooks.

Owns everything between "an outbox row is due" and "its outcome is recorded": claiming due rows
in a short write transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas share the work
and never take the same row; the claim moves the row's timer past the attempt, a lease that
lets another replica take it over if this one dies mid-request), POSTing the signed JSON with one
aiohttp session whose resolver enforces the engine's egress policy (engine/egress.py, the same
policy as `http` steps), and recording the outcome as a run event in one transaction with the
row's fate: `notification.delivered` (row deleted), `notification.failed` (due again after an
exponential backoff) or `notification.abandoned` (attempts used up, or a destination the policy
refuses; row deleted). Each outcome is fenced by the attempt it claimed, so a delivery taken over
after its lease ran out records nothing twice.

Loops through webhooks end (domain/families.py): every delivery carries its run's family in a
signed X-Conveyor-Lineage header, and Idempotency-Key: <delivery id>, so a Conveyor webhook it
reaches refuses a workflow the family reached before (WORKFLOW_LOOP) and starts one run however
often the delivery is sent; such a refusal in the response is given up at once, its reason in the
event. A target that is one of this server's own webhook URLs (under `rest_urls`) is not sent
over HTTP at all: it is delivered here, with the same cause and key, whatever the egress policy.

Never blocking the engine: no request runs inside a transaction; at most `notify_max_concurrency`
requests are in flight, at most `notify_per_url_concurrency` of them to one URL (a slow endpoint
delays only its own notifications), each bounded by `notify_timeout_seconds`. The loop sleeps
until the outbox's earliest timer (one read, no writer lock), woken early by the change feed's
NOTIFY_KEY: a commit whose events a target may ask for, on any replica, or a delivery of this
one finishing (a slot freed). A slow safety poll covers a feed that missed something.
At least once: a receiver de-duplicates by the delivery id (X-Conveyor-Delivery, `id` in the
body). Tests drive `run_once()` with a ManualClock instead of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor.domain.actors import NOTIFIER
from conveyor.domain.changes import Changes
from conveyor.domain.egress import BadUrl, EgressDenied, EgressPolicy, destination
from conveyor.domain.errors import ConcurrentChange, ConveyorError, ErrorKind
from conveyor.domain.families import (
    LINEAGE_HEADER,
    NESTING_TOO_DEEP,
    WORKFLOW_LOOP,
    Cause,
    cause_of,
    sign_cause,
)
from conveyor.domain.feed import NOTIFY_KEY
from conveyor.domain.notifications import (
    ABANDONED,
    DELIVERED,
    DELIVERY_HEADER,
    EVENT_HEADER,
    FAILED,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    OutboxEntry,
    conveyor_refusal,
    own_webhook_token,
    signature,
)
from conveyor.domain.records import RunRecord
from conveyor.domain.spec import RetryPolicy
from conveyor.engine.background import Background, abandon, log_loop_failure
from conveyor.engine.clock import Clock
from conveyor.engine.egress import EgressClient, Resolver, aiohttp_module, resolve
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.settings import Settings

log = logging.getLogger(__name__)

# Who the delivery events name as their actor.
ACTOR = NOTIFIER
# Added to the request timeout to make a claim's lease: covers the claim's commit before the
# request and the outcome's commit after it.
LEASE_MARGIN_SECONDS = 10.0
# Characters of an error or a response quoted in an event.
_EXCERPT_CHARS = 200
# Response bytes read (and dropped) so the connection can be reused.
_DRAIN_BYTES = 64 * 1024
# Tries of recording an outcome that keeps losing its compare-and-set on the run.
_RECORD_ATTEMPTS = 5
# The outbox is looked at at least this often, even if the feed said nothing.
SAFETY_POLL_SECONDS = 30.0
# A webhook's refusals that another attempt would meet again: given up at once.
_FINAL_REFUSALS = frozenset({WORKFLOW_LOOP, NESTING_TOO_DEEP})
# Refusals of a delivery made here that a later attempt may not meet (the database, the queue).
_PASSING_KINDS = frozenset({ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED, ErrorKind.ABORTED})

# Hands a delivery to this server's own webhook: (token, body, delivery id, cause) -> the run.
DeliverHere = Callable[[str, dict[str, object], str, Cause | None], Awaitable[RunRecord]]




@dataclass(frozen=True)
class _Outcome:
    ok: bool
    detail: str  # "HTTP 204", or why the attempt failed
    status_code: int = 0
    retryable: bool = True
    started_run_id: str = ""  # delivered here: the run it started


class Notifier:
    """Claims due outbox rows, POSTs them and records each outcome as a run event."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, settings: Settings,
                 resolver: Resolver = resolve, deliver_here: DeliverHere | None = None,
                 rest_urls: Callable[[], Sequence[str]] = lambda: ()) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.secret = settings.notify_secret  # the engine (facade.py) makes sure there is one
        self.deliver_here = deliver_here
        self.rest_urls = rest_urls
        self.max_concurrency = max(1, settings.notify_max_concurrency)
        self.per_url = max(1, settings.notify_per_url_concurrency)
        self.timeout = settings.notify_timeout_seconds
        self.retry = RetryPolicy(max_attempts=max(1, settings.notify_max_attempts),
                                 initial_interval_seconds=settings.notify_initial_backoff_seconds,
                                 backoff_coefficient=2.0,
                                 max_interval_seconds=settings.notify_max_backoff_seconds)
        self.max_url_length = settings.limits.max_url_length
        self._egress = EgressClient(EgressPolicy.parse(settings.http_allow), resolver, self.max_concurrency)
        # Deliveries in flight and the URL each one posts to.
        self._in_flight: dict[asyncio.Task[None], str] = {}
        self._background = Background("conveyor-notify", self._loop)

    # -- one round (tests drive this with a ManualClock) ------------------------------------

    async def run_once(self) -> int:
        """Claim what is due (up to the concurrency cap), deliver those and record each outcome;
        returns how many deliveries were attempted."""
        claimed = await self._claim(self.max_concurrency, Counter())
        await asyncio.gather(*(self._deliver(entry) for entry in claimed))
        return len(claimed)

    # -- background loop --------------------------------------------------------------------

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        """Stop claiming and abandon deliveries in flight unrecorded: their leases run out and
        they are sent again, as after a crash (at least once either way)."""
        await self._background.stop()  # first: the loop starts no new task after this
        await abandon(self._in_flight)
        await self._egress.close()

    async def _loop(self) -> None:
        pulses = self.runner.keyed
        while True:
            woken = pulses.next(NOTIFY_KEY)  # before reading: no commit is missed
            wait = SAFETY_POLL_SECONDS
            free = self.max_concurrency - len(self._in_flight)
            if free > 0:
                try:
                    claimed, next_due = await self._claim_if_due(free)
                except Exception as e:
                    # The database is unavailable: the rows wait in the outbox; look again later.
                    log_loop_failure(log, "notifications: claiming failed", e)
                    claimed, next_due = [], None
                for entry in claimed:
                    task = asyncio.create_task(self._deliver(entry), name=f"notify-{entry.id}")
                    self._in_flight[task] = entry.url
                    task.add_done_callback(self._finished)
                if len(claimed) == free:
                    continue  # every slot taken: more may be due at once
                if next_due is not None:
                    wait = min(wait, max((next_due - self.clock.now()).total_seconds(), 0.01))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await woken.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self.runner.keyed.fire([NOTIFY_KEY])  # a slot is free: look again

    async def _claim_if_due(self, limit: int) -> tuple[list[OutboxEntry], datetime | None]:
        """What was claimed, and when the earliest row not claimed now is due (None: no row)."""
        # A read first: an idle outbox costs no write transaction (SQLite's one writer).
        async with self.store.read() as repo:
            due = await repo.next_notification()
        if due is None or due > self.clock.now():
            return [], due
        return await self._claim(limit, Counter(self._in_flight.values())), None

    async def _claim(self, limit: int, busy: Counter[str]) -> list[OutboxEntry]:
        """Claim up to `limit` due rows, none to a URL already at its share of the slots, and at
        most its remaining share to any other (rows beyond it are handed back: due at once)."""
        now = self.clock.now()
        lease_until = now + timedelta(seconds=self.timeout + LEASE_MARGIN_SECONDS)
        full = {url for url, n in busy.items() if n >= self.per_url}
        async with self.store.write() as repo:
            claimed = await repo.claim_notifications(now, lease_until, limit, full)
            taken: list[OutboxEntry] = []
            for entry in claimed:
                if busy[entry.url] < self.per_url:
                    busy[entry.url] += 1
                    taken.append(entry)
                else:
                    # Over this URL's share: back to due now, its attempt not counted.
                    await repo.release_notification(entry.id, entry.attempt, now)
            if taken:
                runs = await repo.get_runs(sorted({e.run_id for e in taken}), None)
                causes = {r.id: cause_of(r) for r in runs}
                for entry in taken:
                    entry.cause = causes.get(entry.run_id)
        return taken

    # -- one delivery -------------------------------------------------------------------------

    async def _deliver(self, entry: OutboxEntry) -> None:
        outcome = await self._post(entry)
        try:
            await self._record(entry, outcome)
        except Exception:
            # Not recorded (database trouble): the lease runs out and the row is sent again.
            log.exception("notification %s attempt %d: recording its outcome failed", entry.id, entry.attempt)

    async def _post(self, entry: OutboxEntry) -> _Outcome:
        """POST the signed body; every way it can end becomes an outcome, never an exception."""
        token = own_webhook_token(entry.url, self.rest_urls()) if self.deliver_here is not None else None
        if token is not None:
            return await self._here(entry, token)
        aiohttp = aiohttp_module()
        body = json.dumps(entry.body, separators=(",", ":"), ensure_ascii=False).encode()
        stamp = int(self.clock.now().timestamp())
        headers = {"Content-Type": "application/json", "User-Agent": "conveyor-notify/1",
                   SIGNATURE_HEADER: signature(self.secret, stamp, body), DELIVERY_HEADER: entry.id,
                   EVENT_HEADER: entry.event_type, IDEMPOTENCY_HEADER: entry.id}
        if entry.cause is not None:
            headers[LINEAGE_HEADER] = sign_cause(self.secret, entry.cause)
        try:
            target = destination(entry.url, self.max_url_length)
            async with asyncio.timeout(self.timeout), self._egress.request(
                    "POST", target, data=body, headers=headers) as response:
                answer = await response.content.read(_DRAIN_BYTES)
                status = response.status
        except EgressDenied as e:
            return _Outcome(False, str(e), retryable=False)
        except BadUrl as e:
            # Checked when the target was named; one stored before that check could be anything.
            return _Outcome(False, f"INVALID_URL: the url {e}", retryable=False)
        except TimeoutError:
            return _Outcome(False, f"TimeoutError: no response within {self.timeout:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as e:
            detail = " ".join(str(e).split()) or "no detail"
            return _Outcome(False, f"{type(e).__name__}: {detail}"[:_EXCERPT_CHARS])
        if 200 <= status < 300:
            return _Outcome(True, f"HTTP {status}", status)
        if (refused := conveyor_refusal(answer)) is not None:
            # A Conveyor webhook's refusal: its reason says whether another attempt could pass.
            reason, message = refused
            return _Outcome(False, f"HTTP {status} {reason}: {message}"[:_EXCERPT_CHARS], status,
                            retryable=reason not in _FINAL_REFUSALS)
        return _Outcome(False, f"HTTP {status}", status)  # redirects are not followed either

    async def _here(self, entry: OutboxEntry, token: str) -> _Outcome:
        """Deliver to this server's own webhook without HTTP: the trigger a delivery over HTTP
        would make, with the same cause and idempotency key; a refusal is the outcome."""
        assert self.deliver_here is not None
        try:
            async with asyncio.timeout(self.timeout):
                run = await self.deliver_here(token, entry.body, entry.id, entry.cause)
        except ConveyorError as e:
            return _Outcome(False, f"{e.reason}: {e.message}"[:_EXCERPT_CHARS],
                            retryable=e.kind in _PASSING_KINDS)
        except TimeoutError:
            return _Outcome(False, f"TimeoutError: no run started within {self.timeout:g}s")
        return _Outcome(True, f"run {run.id} started here", started_run_id=run.id)

    async def _record(self, entry: OutboxEntry, outcome: _Outcome) -> None:
        """The outcome as a run event, with the row's fate, in one transaction; nothing when the
        claim was taken over meanwhile (that claim records its own outcome)."""
        data: dict[str, object] = {"url": entry.url, "attempt": entry.attempt, "delivery_id": entry.id,
                                   "event_type": entry.event_type, "event_seq": entry.event_seq}
        if outcome.status_code:
            data["status_code"] = outcome.status_code
        if outcome.started_run_id:
            data["started_run_id"] = outcome.started_run_id
        for _ in range(_RECORD_ATTEMPTS):
            now = self.clock.now()
            if outcome.ok:
                type_, message = DELIVERED, f"{entry.event_type} delivered to {entry.url}"
            elif outcome.retryable and self.retry.has_attempts_left(entry.attempt):
                retry_at = now + timedelta(seconds=self.retry.backoff_seconds(entry.attempt))
                type_, message = FAILED, f"{entry.event_type} to {entry.url}: {outcome.detail}; retried"
                data.update(error=outcome.detail, retry_at=retry_at.isoformat().replace("+00:00", "Z"))
            else:
                type_, message = ABANDONED, f"{entry.event_type} to {entry.url}: {outcome.detail}; given up"
                data["error"] = outcome.detail
            try:
                async with self.store.write() as repo:
                    if type_ == FAILED:
                        mine = await repo.retry_notification(entry.id, entry.attempt, retry_at,
                                                             outcome.detail)
                    else:
                        mine = await repo.finish_notification(entry.id, entry.attempt)
                    if not mine:
                        log.info("notification %s attempt %d: taken over; outcome dropped", entry.id,
                                 entry.attempt)
                        return
                    run = await repo.get_run(entry.run_id, None, lock=True)
                    c = Changes(run, now, ACTOR)
                    c.event(type_, message=message[:1000], data=dict(data))
                    await repo.save([c])
            except ConcurrentChange:
                continue
            self.runner.after_commit([c])
            return
        log.warning("notification %s attempt %d: the run kept changing; outcome left to the lease",
                    entry.id, entry.attempt)
