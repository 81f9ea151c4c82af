"""API keys: creating, listing and revoking them, and resolving a bearer token to its key.

Resolving is on every request's path, so it is cached: a token's key (or the fact that it names
none) is remembered for `cache_seconds`, and a key revoked on another replica stops working
within that time (revoking on this one evicts at once). Tokens that name no key are remembered
apart, in a bounded cache (least recently used out first, entries stale after the same time on
the engine's clock), so a client repeating a wrong token costs no lookup and a flood of random
ones cannot push the keys out; a token without a key's `cvk_` prefix is refused with no
lookup at all. When a key was last used is remembered
in memory and written in one batched UPDATE by `flush_usage` (housekeeping, once a minute), not
once per request.

A stream is admitted once but lives for hours, so the engine's streams (task streams, long
polls, run and project watches) hold their caller's key (`KeyHolds.hold`) and end with
UNAUTHENTICATED (KEY_REVOKED, KEY_EXPIRED) once it stops working: at once when it is revoked on
this replica; within `HOLD_CHECK_SECONDS` when it expires or another replica revokes it, since
one loop re-reads every held key (one query for all of them) that often while streams are open.
A stream waits on its hold's feed key besides its own and checks the hold whenever it wakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta

from cachetools import TTLCache

from conveyor.domain.access import (
    ALL_PROJECTS,
    KEY_TOKEN_PREFIX,
    TOKEN_PREFIX_LENGTH,
    ApiKey,
    Role,
    check_name,
    grantable,
    new_token,
    parse_role,
    same_hash,
    token_hash,
)
from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.feed import Key, api_key_key
from conveyor.domain.records import Caller, Page
from conveyor.engine.background import Background, log_loop_failure
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.pulse import KeyedPulses
from conveyor.engine.workflows import project_of

# The name of the key `conveyor serve` creates on its first start.
BOOTSTRAP_NAME = "admin"
# Entries the token cache holds before it starts over.
_CACHE_ENTRIES = 10_000
# Tokens naming no key remembered at once (the least recently used go first).
UNKNOWN_ENTRIES = 10_000
# Open streams' keys are re-read this often: a key that expires or is revoked on another replica
# ends its streams within it (well inside the 5 s SPEC §6 promises).
HOLD_CHECK_SECONDS = 1.0
# Held keys read per query.
_HOLD_CHUNK = 500

log = logging.getLogger(__name__)


def _revoked(name: str) -> ConveyorError:
    return ConveyorError(ErrorKind.UNAUTHENTICATED, "KEY_REVOKED",
                         f"API key {name!r} was revoked; the stream ended")


def _stopped(key: ApiKey | None, name: str, now: datetime) -> ConveyorError | None:
    """Why a held key no longer works (None: it does)."""
    if key is None or key.revoked_at is not None:
        return _revoked(name)
    if not key.usable_at(now):
        return ConveyorError(ErrorKind.UNAUTHENTICATED, "KEY_EXPIRED",
                             f"API key {name!r} expired; the stream ended")
    return None


class Hold:
    """An open stream's hold on the API key it was admitted with (a caller without a key holds
    nothing, and its hold never ends). The stream waits on `keys` besides its own, which fire
    when the key stops working, and calls `check()` whenever it wakes; `on_lost`, when set, is
    told at that moment too (a run watch stops its subscription with it)."""

    __slots__ = ("error", "keys", "on_lost")

    def __init__(self, key_id: str) -> None:
        self.keys: tuple[Key, ...] = (api_key_key(key_id),) if key_id else ()
        self.error: ConveyorError | None = None
        self.on_lost: Callable[[ConveyorError], None] | None = None

    def check(self) -> None:
        """Raise UNAUTHENTICATED (KEY_REVOKED, KEY_EXPIRED) once the key stopped working."""
        if self.error is not None:
            raise self.error


class KeyHolds:
    """The keys open streams hold, and the loop that ends the streams of keys that stopped
    working (running only while some stream is open)."""

    def __init__(self, store: Store, clock: Clock, pulses: KeyedPulses,
                 forget: Callable[[ApiKey], None] = lambda key: None,
                 check_seconds: float = HOLD_CHECK_SECONDS) -> None:
        self.store = store
        self.clock = clock
        self.pulses = pulses
        self.check_seconds = check_seconds
        self._forget = forget
        self._held: dict[str, tuple[str, set[Hold]]] = {}  # key id -> (its name, the holds)
        self._loop = Background("conveyor-key-holds", self._run)

    def __len__(self) -> int:
        """How many streams hold a key."""
        return sum(len(holds) for _, holds in self._held.values())

    @contextlib.contextmanager
    def hold(self, caller: Caller) -> Iterator[Hold]:
        """Hold the caller's key while the stream runs."""
        hold = Hold(caller.key_id)
        if not caller.key_id:
            yield hold
            return
        self._held.setdefault(caller.key_id, (caller.name, set()))[1].add(hold)
        self._loop.start()
        try:
            yield hold
        finally:
            entry = self._held.get(caller.key_id)
            if entry is not None:
                entry[1].discard(hold)
                if not entry[1]:
                    del self._held[caller.key_id]

    def lose(self, key_id: str, error: ConveyorError) -> None:
        """The key stopped working: every stream holding it ends."""
        _, holds = self._held.pop(key_id, ("", set()))
        for hold in holds:
            hold.error = error
            if hold.on_lost is not None:
                hold.on_lost(error)
        self.pulses.fire([api_key_key(key_id)])

    async def check(self) -> int:
        """Re-read every held key and end the streams of those revoked or expired since;
        how many keys that ended."""
        ids = list(self._held)
        found: dict[str, ApiKey] = {}
        for start in range(0, len(ids), _HOLD_CHUNK):
            async with self.store.read() as repo:
                found |= await repo.keys_by_id(ids[start:start + _HOLD_CHUNK])
        now = self.clock.now()
        ended = 0
        for key_id in ids:
            entry = self._held.get(key_id)
            key = found.get(key_id)
            if entry is None or (error := _stopped(key, entry[0], now)) is None:
                continue
            if key is not None:
                self._forget(key)  # new calls with it are refused here at once, too
            self.lose(key_id, error)
            ended += 1
        return ended

    async def _run(self) -> None:
        while self._held:
            await asyncio.sleep(self.check_seconds)
            try:
                await self.check()
            except Exception as e:
                # The streams go on until the next pass reads the keys (an outage ends them anyway).
                log_loop_failure(log, "re-reading the API keys of open streams failed", e)

    async def stop(self) -> None:
        await self._loop.stop()


class Keys:
    """Use cases on API keys, the cached token resolver, and the keys open streams hold."""

    def __init__(self, store: Store, clock: Clock, cache_seconds: float = 5.0,
                 pulses: KeyedPulses | None = None) -> None:
        self.store = store
        self.clock = clock
        self._ttl = timedelta(seconds=cache_seconds)
        # token hash -> (its key or None, when the entry goes stale)
        self._cache: dict[str, tuple[ApiKey | None, datetime]] = {}
        # token hashes that named no key when looked up
        self._unknown: TTLCache[str, bool] = TTLCache(UNKNOWN_ENTRIES, cache_seconds,
                                                      timer=lambda: clock.now().timestamp())
        self._used: dict[str, datetime] = {}
        self.holds = KeyHolds(store, clock, pulses if pulses is not None else KeyedPulses(), self._forget)

    async def create(self, caller: Caller, name: str, project_id: str, role: str,
                     expires_at: datetime | None = None, rate_limit: int = 0) -> tuple[ApiKey, str]:
        """A new key and its token (the only time the token exists outside the client)."""
        now = self.clock.now()
        level = parse_role(role)
        project = ALL_PROJECTS if project_id == ALL_PROJECTS else project_of(project_id, caller)
        grantable(caller, project, level)
        if expires_at is not None and expires_at <= now:
            raise invalid("expires_at must be in the future",
                          [FieldViolation("expires_at", "is not in the future")])
        if rate_limit < 0:
            raise invalid("rate_limit must not be negative", [FieldViolation("rate_limit", "is negative")])
        token = new_token(KEY_TOKEN_PREFIX)
        key = ApiKey(id=new_id(), name=check_name(name), project_id=project, role=level,
                     token_hash=token_hash(token), token_prefix=token[:TOKEN_PREFIX_LENGTH], created_at=now,
                     created_by=caller.name, rate_limit=rate_limit, expires_at=expires_at)
        async with self.store.write() as repo:
            await repo.insert_key(key)
        return key, token

    async def list(self, caller: Caller, project_id: str, include_revoked: bool, limit: int,
                   token: str) -> Page[ApiKey]:
        async with self.store.read() as repo:
            return await repo.list_keys(caller.project, project_id, include_revoked, limit, token)

    async def revoke(self, caller: Caller, ident: str) -> ApiKey:
        """Revoke a key by id or name; revoking a revoked key is a no-op that returns it."""
        now = self.clock.now()
        async with self.store.write() as repo:
            key = await repo.find_key(ident, caller.project, lock=True)
            if key.revoked_at is None:
                await repo.revoke_key(key.id, now)
                key = replace(key, revoked_at=now)
        self._forget(key)
        self.holds.lose(key.id, _revoked(key.name))
        return key

    def _forget(self, key: ApiKey) -> None:
        """Drop the key's cache entry: it is read again on its next use."""
        self._cache.pop(key.token_hash, None)

    async def bootstrap(self) -> str | None:
        """On a database without a usable admin key of every project: create one named "admin"
        and return its token (None when one exists). Two replicas starting at once on one
        PostgreSQL race on the unique name; the loser creates nothing."""
        async with self.store.read() as repo:
            if await repo.has_admin_key():
                return None
        system = Caller(name="conveyor", project=None, role=Role.ADMIN.label)
        try:
            _, token = await self.create(system, BOOTSTRAP_NAME, ALL_PROJECTS, Role.ADMIN.label)
        except ConveyorError as e:
            if e.kind is ErrorKind.ALREADY_EXISTS:
                return None
            raise
        return token

    def known(self, token: str) -> ApiKey | None:
        """The usable key whose token this is when the cache remembers it (no lookup); None:
        not remembered, or not usable."""
        now = self.clock.now()
        hit = self._cache.get(token_hash(token))
        if hit is None or now >= hit[1] or hit[0] is None or not hit[0].usable_at(now):
            return None
        self._used[hit[0].id] = now
        return hit[0]

    async def resolve(self, token: str) -> ApiKey | None:
        """The usable key whose token this is, or None (unknown, revoked or expired)."""
        now = self.clock.now()
        digest = token_hash(token)
        hit = self._cache.get(digest)
        if hit is not None and now < hit[1]:
            key = hit[0]
        elif not token.startswith(KEY_TOKEN_PREFIX) or digest in self._unknown:
            return None
        else:
            async with self.store.read() as repo:
                key = await repo.key_by_hash(digest)
            if key is not None and not same_hash(key.token_hash, digest):
                key = None
            if key is None:
                self._unknown[digest] = True
                return None
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (key, now + self._ttl)
        if key is None or not key.usable_at(now):
            return None
        self._used[key.id] = now
        return key

    async def flush_usage(self) -> None:
        """Write when each key used since the last flush was last used."""
        used, self._used = self._used, {}
        if used:
            async with self.store.write() as repo:
                await repo.touch_keys(used)
