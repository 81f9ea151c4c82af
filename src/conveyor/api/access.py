"""Who may call what: the role every RPC needs, the bearer-token gate in front of every handler,
per-key rate limits, and the audit entry every write call leaves.

`Gate.admit` runs for every call before its request is checked or handled (the error
interceptor calls it): it reads `authorization: Bearer <token>`, resolves the token to its key
(cached, engine/keys.py), checks the key's role against `RPC_ROLES` and takes a token from the
key's bucket. The resulting `Caller` is bound to the call (api/caller.py) for the servicers.
Missing, unknown, revoked or expired token: UNAUTHENTICATED (401 over REST); a key whose role
is too low: PERMISSION_DENIED (403); over the key's rate: RESOURCE_EXHAUSTED (429) with a
`retry-after` header. Project isolation is not decided here: every use case scopes by the
caller's project, so a foreign resource answers NOT_FOUND as if absent.

Anonymous traffic is bounded per client address (api/clients.py says which address): calls
without a valid key (none, malformed, unknown) share one bucket of `anonymous_rate` per second,
webhook deliveries another of `webhook_rate`; beyond, RESOURCE_EXHAUSTED RATE_LIMITED with
`retry-after`, before the token is looked up. A token the key cache knows skips the address's
bucket, so a flood from an address never refuses a working key's cached calls. Calls refused
with no valid key behind them (and deliveries whose token names no webhook) are counted in
`conveyor_refused_requests_total{reason}`, not written to the audit log one entry each: the log
records what callers who proved who they are did, refusals of theirs included.

Worker RPCs need a `worker` key of the project, or an operator's or admin's (decision, README):
a worker key may lease, heartbeat, report and release its project's tasks and do nothing else,
so a process that runs tasks holds no right to read, cancel or steer the project's runs.

A stream outlives its admission: it holds its key (engine/keys.py `KeyHolds`) and ends with
UNAUTHENTICATED once the key is revoked or expires, on every replica (the engine's streams check
it; see there).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import TTLCache
from google.protobuf.descriptor import FieldDescriptor

from conveyor.api.caller import ANONYMOUS, WEBHOOK, bind, bound
from conveyor.api.clients import client_address
from conveyor.api.errors import INTERNAL_MESSAGE, STATUS_CODES
from conveyor.domain.access import AuditEntry, Role, well_formed_token
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller
from conveyor.engine.facade import Engine

W, V, OP, A = Role.WORKER, Role.VIEWER, Role.OPERATOR, Role.ADMIN

# The role each RPC needs, by service then method; None: no key (the webhook's URL carries its
# own secret). A test checks every RPC of the descriptors has an entry, so a new RPC cannot be
# served without a decision.
_ROLES: dict[str, dict[str, Role | None]] = {
    "WorkflowsService": {
        "CreateWorkflow": A, "UpdateWorkflow": A, "ArchiveWorkflow": A, "RotateWebhook": A,
        "DisableWebhook": A, "GetWorkflow": V, "ListWorkflows": V,
        "ListWorkflowVersions": V,
        # Pausing a schedule steers when runs start, as cancelling one does; the definition
        # stays as it is.
        "PauseSchedule": OP, "ResumeSchedule": OP,
    },
    "WorkflowRunsService": {
        "GetWorkflowRun": V, "ListWorkflowRuns": V, "ListRunEvents": V, "WatchWorkflowRun": V,
        "WatchProjectRuns": V, "ListRunComments": V,
        "TriggerWorkflowRun": OP, "CancelWorkflowRun": OP, "PauseWorkflowRun": OP, "ResumeWorkflowRun": OP,
        "RetryWorkflowRun": OP, "BulkCancelWorkflowRuns": OP, "BulkReplayWorkflowRuns": OP,
        "AddRunComment": OP,
    },
    "StepRunsService": {
        "ListStepRuns": V, "ApproveStep": OP, "SubmitStepInput": OP, "SkipStep": OP, "ForceCompleteStep": OP,
        "RetryStep": OP, "ReplaySubtree": OP,
    },
    "WorkersService": {
        "PollTasks": W, "StreamTasks": W, "HeartbeatTask": W, "HeartbeatTasks": W, "CompleteTask": W,
        "FailTask": W, "ReleaseTask": W,
    },
    "KeysService": {"CreateApiKey": A, "ListApiKeys": A, "RevokeApiKey": A},
    "AuditService": {"ListAuditEntries": A},
    # Secrets are credentials: only admins set them; nobody reads a value back (SPEC §11).
    "SecretsService": {"PutSecret": A, "ListSecrets": A, "DeleteSecret": A},
    # Publishing starts runs, as a trigger does (a worker key may not: it only works tasks).
    "EventsService": {"PublishEvent": OP, "ListEvents": V},
    "WebhooksService": {"DeliverWebhook": None},
}
RPC_ROLES: dict[str, Role | None] = {
    f"/conveyor.v1.{service}/{method}": role
    for service, methods in _ROLES.items() for method, role in methods.items()
}
# Calls the audit log records: every write (any RPC an operator or admin needs, and webhook
# deliveries), but not the workers' lease traffic, which is high-volume and already recorded as
# run events naming the worker.
AUDITED: frozenset[str] = frozenset(
    m for m, role in RPC_ROLES.items() if role is None or role in (OP, A))
# Served without a key: grpc's health checks and reflection.
_PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Buckets the rate limiter holds at once (keys and client addresses); beyond, the least recently
# used is dropped, which only gives that key or address a full burst again.
MAX_BUCKETS = 100_000


class RateLimiter:
    """Token buckets per key: `rate` requests per second, bursts of up to one second's worth.
    A bucket untouched for a second is full again, the same as none: it is then forgotten."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        # key -> (tokens, when counted)
        self._buckets: TTLCache[str, tuple[float, float]] = TTLCache(MAX_BUCKETS, 1.0, timer=now)

    def take(self, key: str, rate: int) -> float:
        """0 when the request may go ahead; else seconds until the bucket holds a token."""
        now = self._now()
        tokens, then = self._buckets.get(key, (float(rate), now))
        tokens = min(float(rate), tokens + (now - then) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / rate

    def refund(self, key: str) -> None:
        """Give back the token a request took (it turned out not to count)."""
        if (bucket := self._buckets.get(key)) is not None:
            self._buckets[key] = (bucket[0] + 1.0, bucket[1])


def _bearer(metadata: Sequence[tuple[str, Any]]) -> str:
    for name, value in metadata:
        if name == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ConveyorError(ErrorKind.UNAUTHENTICATED, "MALFORMED_TOKEN",
                                    "the authorization header must be 'Bearer <API key>'")
            # grpc hands over a value that is not UTF-8 decoded as Latin-1 (and logs it; see
            # logs.py), and one with a line break or NUL as it came: whatever it holds, it is no
            # key, and it is never quoted. Only spaces around it are forgiven.
            if not well_formed_token(token := token.strip(" ")):
                raise ConveyorError(ErrorKind.UNAUTHENTICATED, "MALFORMED_TOKEN",
                                    "the API key holds characters no API key has (only printable ASCII)")
            return token
    raise ConveyorError(ErrorKind.UNAUTHENTICATED, "MISSING_TOKEN",
                        "this call needs an API key: send 'authorization: Bearer <API key>'")


class Gate:
    """Admits calls (authentication, role, rate) and records the audit entries of writes."""

    def __init__(self, engine: Engine, enabled: bool, default_rate: int,
                 limiter: RateLimiter | None = None, *, anonymous_rate: int = 0, webhook_rate: int = 0,
                 gateway_secret: str = "") -> None:
        self._engine = engine
        self._enabled = enabled
        self._default_rate = default_rate
        self._limiter = limiter or RateLimiter()
        self._anonymous_rate = anonymous_rate
        self._webhook_rate = webhook_rate
        self._gateway_secret = gateway_secret

    async def admit(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str = "") -> None:
        """Bind the call's Caller, or raise the ConveyorError that refuses it (`peer`: the
        connection's, grpc's `context.peer()`)."""
        try:
            await self._admit(method, metadata, peer)
        except ConveyorError as e:
            if bound() is None:  # no valid key behind it: counted, never audited
                self._engine.metrics.refused(e.reason)
            raise

    async def _admit(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> None:
        if method.startswith(_PUBLIC_PREFIXES):
            return
        needed = RPC_ROLES.get(method, A)  # an RPC missing from the table is admin-only
        if needed is None:
            self._limit_address("webhook deliveries", metadata, peer, self._webhook_rate)
            bind(WEBHOOK)
            return
        if not self._enabled:
            bind(ANONYMOUS)
            return
        try:
            token = _bearer(metadata)
        except ConveyorError:
            self._limit_address("calls without a valid API key", metadata, peer, self._anonymous_rate)
            raise
        key = self._engine.keys.known(token)
        if key is None:
            # Taken before the lookup, so a flood is refused before it costs the database
            # anything; given back when the token turns out to name a working key.
            bucket = self._limit_address("calls without a valid API key", metadata, peer,
                                         self._anonymous_rate)
            key = await self._engine.keys.resolve(token)
            if key is None:
                raise ConveyorError(ErrorKind.UNAUTHENTICATED, "INVALID_TOKEN",
                                    "the API key is unknown, revoked or expired")
            if bucket:
                self._limiter.refund(bucket)
        caller = key.caller()
        bind(caller)
        if not key.role.includes(needed):
            raise ConveyorError(ErrorKind.PERMISSION_DENIED, "ROLE_TOO_LOW",
                                f"{method.rsplit('/', 1)[-1]} needs the {needed.label} role; "
                                f"key {key.name!r} is {key.role.label}",
                                metadata={"needed": needed.label, "role": key.role.label})
        rate = key.rate_limit or self._default_rate
        if rate > 0 and (wait := self._limiter.take(key.id, rate)) > 0:
            seconds = max(1, int(wait + 0.999))
            raise ConveyorError(ErrorKind.RESOURCE_EXHAUSTED, "RATE_LIMITED",
                                f"key {key.name!r} is over its limit of {rate} requests per second",
                                metadata={"retry_after": str(seconds), "limit": str(rate)})

    def _limit_address(self, what: str, metadata: Sequence[tuple[str, Any]], peer: str, rate: int) -> str:
        """Take a token from the client address's bucket of `what` (RATE_LIMITED when it is
        empty); the bucket's name, "" when there is no limit."""
        if rate <= 0:
            return ""
        address = client_address(metadata, peer, self._gateway_secret)
        bucket = f"{what} from {address}"
        if (wait := self._limiter.take(bucket, rate)) > 0:
            seconds = max(1, int(wait + 0.999))
            raise ConveyorError(ErrorKind.RESOURCE_EXHAUSTED, "RATE_LIMITED",
                                f"too many {what} from {address}: at most {rate} per second",
                                metadata={"retry_after": str(seconds), "limit": str(rate)})
        return bucket

    def audit(self, method: str, request: Any, response: Any, error: BaseException | None) -> None:
        """Record a write call's outcome, refused by the gate or not (called by the interceptor
        once the call ended)."""
        caller = bound()
        if error is not None and (caller is None or caller is WEBHOOK):
            # No valid key, or a webhook token that named no workflow (the servicer binds the
            # delivery's own caller once it did): counted, not recorded one entry each. The
            # gate counted its own refusals already.
            if caller is WEBHOOK:
                self._engine.metrics.refused(getattr(error, "reason", "INTERNAL"))
            return
        if method not in AUDITED:
            return
        if isinstance(error, ConveyorError):
            if error.kind is ErrorKind.RESOURCE_EXHAUSTED and error.reason == "RATE_LIMITED":
                return  # a flood of refusals would be a flood of entries; the limit is the record
            code, reason, message = STATUS_CODES[error.kind].name, error.reason, error.message
        elif error is not None:
            code, reason, message = "INTERNAL", "INTERNAL", INTERNAL_MESSAGE
        else:
            code, reason, message = "OK", "", ""
        self._engine.audit.record(AuditEntry(
            at=self._engine.clock.now(), actor=caller.name if caller is not None else "",
            project_id=_project(request, response, caller), method=method.removeprefix("/conveyor.v1."),
            resource_id=_resource(request, response), code=code, reason=reason, message=message))


@functools.cache
def _has_string(descriptor: Any, name: str) -> bool:
    """True when messages of this type have a singular string field `name` (cached per type:
    this runs for every audited call)."""
    found = descriptor.fields_by_name.get(name)
    return (found is not None and found.type == FieldDescriptor.TYPE_STRING
            and not found.is_repeated)


def _field(message: Any, name: str) -> str:
    return str(getattr(message, name)) if _has_string(message.DESCRIPTOR, name) else ""


@functools.cache
def _wrapped(descriptor: Any) -> str:
    """The field holding the resource a response wraps (CreateApiKeyResponse.key,
    RotateWebhookResponse.workflow), or ""."""
    return next((n for n in ("key", "workflow") if n in descriptor.fields_by_name
                 and descriptor.fields_by_name[n].message_type is not None), "")


def _sub(message: Any) -> Any:
    name = _wrapped(message.DESCRIPTOR)
    return getattr(message, name) if name and message.HasField(name) else None


def _resource(request: Any, response: Any) -> str:
    for message in (response, _sub(response) if response is not None else None):
        if message is not None and (found := _field(message, "id")):
            return found
    for name in ("workflow_run_id", "workflow_id", "key_id", "task_id", "name"):
        if request is not None and (found := _field(request, name)):
            return found
    return ""


def _project(request: Any, response: Any, caller: Caller | None) -> str:
    # A project's key acts only in its project: its entries are that project's, whatever project
    # its request named (else a key could write entries into another project's log).
    if caller is not None and caller.project is not None:
        return caller.project
    for message in (response, _sub(response) if response is not None else None, request):
        if message is not None and (found := _field(message, "project_id")):
            return found
    return caller.project or "" if caller is not None else ""
