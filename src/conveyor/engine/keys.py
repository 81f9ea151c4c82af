"""API keys: creating, listing and revoking them, and resolving a bearer token to its key.

Resolving is on every request's path, so it is cached: a token's key (or the fact that it names
none) is remembered for `cache_seconds`, and a key revoked on another replica stops working
within that time (revoking on this one evicts at once). When a key was last used is remembered
in memory and written in one batched UPDATE by `flush_usage` (housekeeping, once a minute), not
once per request.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

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
from conveyor.domain.records import Caller, Page
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.workflows import project_of

# The name of the key `conveyor serve` creates on its first start.
BOOTSTRAP_NAME = "admin"
# Entries the token cache holds before it starts over (a flood of random tokens must not grow it).
_CACHE_ENTRIES = 10_000


class Keys:
    """Use cases on API keys, and the cached token resolver."""

    def __init__(self, store: Store, clock: Clock, cache_seconds: float = 5.0) -> None:
        self.store = store
        self.clock = clock
        self._ttl = timedelta(seconds=cache_seconds)
        # token hash -> (its key or None, when the entry goes stale)
        self._cache: dict[str, tuple[ApiKey | None, datetime]] = {}
        self._used: dict[str, datetime] = {}

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
        self._cache.pop(key.token_hash, None)
        return key

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

    async def resolve(self, token: str) -> ApiKey | None:
        """The usable key whose token this is, or None (unknown, revoked or expired)."""
        now = self.clock.now()
        digest = token_hash(token)
        hit = self._cache.get(digest)
        if hit is not None and now < hit[1]:
            key = hit[0]
        else:
            async with self.store.read() as repo:
                key = await repo.key_by_hash(digest)
            if key is not None and not same_hash(key.token_hash, digest):
                key = None
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
