"""Who may call what, proven over the real server (issue 7 items 2 and 3, SPEC §6).

The role table: every RPC of the descriptors has an entry in `RPC_ROLES` (and no entry names
an RPC that does not exist), each role is refused exactly the RPCs it does not include (the
worker role: everything but the task leases and reports), and every way of
not presenting a usable key (none, garbage, the wrong scheme, revoked, expired) is
UNAUTHENTICATED, for every RPC but the webhook delivery (its URL's token is the credential).

The isolation matrix, generated from the descriptors so a new RPC cannot escape it: every RPC x
every role x (key of alpha, key of another project, `*` key), each called with a request that
names alpha's resource (`CASES`, one per RPC, checked to cover them all). A sufficient role of
alpha or `*` behaves as an admin would (the cell's own fresh resource where the call changes
state, so no cell breaks the next); too low a role is PERMISSION_DENIED; a foreign key gets
exactly what the same call gets for an id that does not exist (code, reason, message, details),
empty lists, PROJECT_FORBIDDEN where it names alpha as the project to act in (secrets: what
naming a project that does not exist gets), and changes nothing of alpha's (checked against a
snapshot after the whole matrix).
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.api.access import RPC_ROLES
from conveyor.api.server import PENDING_RPCS, build_server
from conveyor.domain.access import Role
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.engine.ids import new_id
from conveyor.settings import Settings
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import events_service_pb2 as events_pb
from conveyor.v1 import keys_service_pb2 as keys_pb
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import secrets_service_pb2 as secrets_pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import workers_service_pb2 as workers_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from tests.api.support import Api, decode
from tests.api.test_server import contract_methods, path
from tests.auth import TEST_ADMIN, bearer, bearer_interceptors, key

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
STRUCT = "google.protobuf.Struct"
ALPHA, BETA = "alpha", "beta"
# The project feed's first position (storage/run_changes.py's cursor of (txid 0, id 0)).
FEED_START = base64.urlsafe_b64encode(json.dumps([0, 0]).encode()).decode().rstrip("=")
ROLES = ("worker", "viewer", "operator", "admin")
SCOPES = {"own": ALPHA, "foreign": BETA, "star": "*"}
YEARLY = {"cron": "0 0 1 1 *"}
WORKER = "w-alpha"


# -- calling any RPC -------------------------------------------------------------------------


@dataclass
class Outcome:
    """How a call ended, as a client sees it: its status, the ErrorInfo, what was received."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.message!r} ({len(self.items)} messages)"


async def invoke(channel: grpc.aio.Channel, method: MethodDescriptor, request: Message,
                 metadata: Sequence[tuple[str, str]] = (), first_only: bool = False,
                 deadline: float = 10.0) -> Outcome:
    """Call `method`; a stream is drained (or, `first_only`, cancelled after its first message)."""
    response_class: Any = GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = {"request_serializer": lambda m: m.SerializeToString(),
                              "response_deserializer": response_class.FromString}
    items: list[Any] = []
    try:
        if method.server_streaming:
            call = channel.unary_stream(path(method), **kwargs)(request, metadata=tuple(metadata),
                                                                timeout=deadline)
            async for item in call:
                items.append(item)
                if first_only:
                    call.cancel()
                    break
        else:
            items.append(await channel.unary_unary(path(method), **kwargs)(
                request, metadata=tuple(metadata), timeout=deadline))
    except grpc.aio.AioRpcError as error:
        rich = decode(error)
        info = rich.info
        return Outcome(rich.code, info.reason if info else "", rich.message,
                       dict(info.metadata) if info else {}, items)
    return Outcome(OK, items=items)


def method_named(name: str) -> MethodDescriptor:
    (method,) = [m for m in contract_methods() if m.name == name]
    return method


async def as_admin(api: Api, name: str, request: Message) -> list[Any]:
    """Call `name` as the test's `*` admin; the messages it answered (it must succeed)."""
    outcome = await invoke(api.channel, method_named(name), request)
    assert outcome.code == OK, f"{name}: {outcome}"
    return outcome.items


def substitute(message: Message, mapping: dict[str, str]) -> Message:
    """A copy of `message` with every string field (at any depth, Structs aside) that is a key
    of `mapping` replaced by its value."""
    out = type(message)()
    out.CopyFrom(message)
    _swap(out, mapping)
    return out


def _swap(message: Message, mapping: dict[str, str]) -> None:
    for fd, value in message.ListFields():
        repeated = fd.is_repeated
        if fd.type == FieldDescriptor.TYPE_STRING:
            if repeated:
                swapped = [mapping.get(v, v) for v in value]
                del value[:]
                value.extend(swapped)
            else:
                setattr(message, fd.name, mapping.get(value, value))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry or fd.message_type.full_name == STRUCT:
                continue
            for item in (value if repeated else [value]):
                _swap(item, mapping)


def swap_text(text: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        text = text.replace(old, new)
    return text


def struct(data: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(data, struct_pb2.Struct())


# -- the server and its keys -----------------------------------------------------------------


@dataclass
class Served:
    """The server's stubs as the test's `*` admin, and a channel that sends no credentials."""

    api: Api
    bare: grpc.aio.Channel


@pytest.fixture
async def served(engine: Engine, settings: Settings, clock: ManualClock) -> AsyncIterator[Served]:
    server, port = await build_server(engine, settings)
    await server.start()
    token = await key(engine, "test-admin")
    target = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(token)) as channel, \
                grpc.aio.insecure_channel(target) as bare:
            yield Served(Api(channel, engine, clock), bare)
    finally:
        await server.stop(grace=None)


def needed(method: MethodDescriptor) -> Role | None:
    return RPC_ROLES[path(method)]


def role_below(method: MethodDescriptor, role: str) -> bool:
    """Whether a key of `role` is too low for `method` (never for a keyless RPC)."""
    need = needed(method)
    return need is not None and not Role[role.upper()].includes(need)


# -- the role table --------------------------------------------------------------------------


def test_the_role_table_has_an_entry_for_every_rpc_and_for_nothing_else() -> None:
    served_rpcs = {path(m) for m in contract_methods()}

    assert sorted(served_rpcs - RPC_ROLES.keys()) == [], "RPCs without a role decision"
    assert sorted(RPC_ROLES.keys() - served_rpcs) == [], "role entries naming no RPC"
    assert all(role is None or isinstance(role, Role) for role in RPC_ROLES.values())
    # The only RPC served without a key is the webhook delivery (its URL carries its secret).
    keyless = [m for m, role in RPC_ROLES.items() if role is None]
    assert keyless == ["/conveyor.v1.WebhooksService/DeliverWebhook"]


# Workflow RPCs an operator may call: pausing a schedule steers when runs start, as cancelling
# one does; the definition stays as it is (api/access.py).
_OPERATOR_WORKFLOW_RPCS = {"PauseSchedule", "ResumeSchedule"}


def rule_role(method: MethodDescriptor) -> Role | None:
    """The role issues 7 and 16 and SPEC §6 give an RPC: worker leases, heartbeats, reports and
    releases tasks (and operators and admins may too); viewer reads and watches; operator
    triggers, operates runs and steps, comments; admin changes definitions and webhooks, manages
    keys and reads the audit log."""
    service, name = method.containing_service.name, method.name
    if service == "WebhooksService":
        return None
    if service in ("KeysService", "AuditService", "SecretsService"):
        return Role.ADMIN
    if service == "WorkersService":
        return Role.WORKER
    if name.startswith(("Get", "List", "Watch")):
        return Role.VIEWER
    if service == "WorkflowsService" and name not in _OPERATOR_WORKFLOW_RPCS:
        return Role.ADMIN
    return Role.OPERATOR


def test_the_role_table_follows_the_rule_of_the_roles() -> None:
    differ = {m.name: (RPC_ROLES[path(m)], rule_role(m)) for m in contract_methods()
              if RPC_ROLES[path(m)] != rule_role(m)}
    assert differ == {}, "(table, rule) of the RPCs whose role breaks the rule"


def test_a_worker_may_work_tasks_and_nothing_else_and_operators_keep_that_right() -> None:
    def may(role: Role) -> list[str]:
        return sorted(m.rsplit("/", 1)[-1] for m, need in RPC_ROLES.items()
                      if need is not None and role.includes(need))

    worker_rpcs = ["CompleteTask", "FailTask", "HeartbeatTask", "HeartbeatTasks", "PollTasks", "ReleaseTask",
                   "StreamTasks"]
    assert may(Role.WORKER) == worker_rpcs
    assert set(may(Role.VIEWER)).isdisjoint(worker_rpcs)
    assert set(worker_rpcs) <= set(may(Role.OPERATOR)) <= set(may(Role.ADMIN))


async def test_each_role_is_refused_exactly_the_rpcs_above_it(served: Served) -> None:
    """Worker: task leases and reports only; viewer read and watch; operator + trigger, run/step
    operations, worker leases; admin + definitions, keys, the audit log. Empty requests: the
    gate decides before anything else."""
    engine = served.api.engine
    tokens = {role: await key(engine, f"any-{role}", "*", role) for role in ROLES}
    wrong: list[str] = []

    for role, token in tokens.items():
        for method in contract_methods():
            request = GetMessageClass(method.input_type)()
            # The gate refuses before any handler runs: an admitted stream (an empty project
            # watch streams on) needs no more than a second to show it was admitted.
            outcome = await invoke(served.bare, method, request, bearer(token),
                                   deadline=1.0 if method.server_streaming else 10.0)
            denied = outcome.code == grpc.StatusCode.PERMISSION_DENIED and outcome.reason == "ROLE_TOO_LOW"
            if role_below(method, role):
                need = needed(method)
                assert need is not None
                if not denied or outcome.metadata != {"needed": need.label, "role": role}:
                    wrong.append(f"{role} {method.name}: {outcome} {outcome.metadata}, expected ROLE_TOO_LOW")
            elif outcome.code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                wrong.append(f"{role} {method.name}: {outcome}, expected to be admitted")

    assert wrong == []


async def test_calls_without_a_usable_key_are_unauthenticated(served: Served) -> None:
    api = served.api
    engine, clock = api.engine, api.clock
    revoked_key, revoked = await engine.keys.create(
        TEST_ADMIN, "soon-revoked", "*", "admin")
    expiring = await key(engine, "soon-expired", "*", "admin",
                         expires_at=clock.now() + timedelta(seconds=30))
    get = method_named("ListWorkflows")
    # Both work, and are now in the token cache.
    for token in (revoked, expiring):
        assert (await invoke(served.bare, get, wf_pb.ListWorkflowsRequest(), bearer(token))).code == OK
    await as_admin(api, "RevokeApiKey", keys_pb.RevokeApiKeyRequest(key_id=revoked_key.id))
    clock.advance(30)  # expires exactly now; the cache entry is stale too (5 s)

    variants: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
        "no token": ((), "MISSING_TOKEN"),
        "garbage token": (bearer("cvk_not-a-key"), "INVALID_TOKEN"),
        "other scheme": ((("authorization", "Basic xyz"),), "MALFORMED_TOKEN"),
        "bearer without token": ((("authorization", "Bearer"),), "MALFORMED_TOKEN"),
        "revoked key": (bearer(revoked), "INVALID_TOKEN"),
        "expired key": (bearer(expiring), "INVALID_TOKEN"),
    }
    wrong: list[str] = []
    for method in contract_methods():
        request = GetMessageClass(method.input_type)()
        for variant, (metadata, reason) in variants.items():
            outcome = await invoke(served.bare, method, request, metadata)
            if needed(method) is None:
                # The webhook delivery asks for no key: an unknown webhook token, whatever is sent.
                expected = (grpc.StatusCode.NOT_FOUND, "WEBHOOK_NOT_FOUND")
            else:
                expected = (grpc.StatusCode.UNAUTHENTICATED, reason)
            if (outcome.code, outcome.reason) != expected or outcome.items:
                wrong.append(f"{method.name} with {variant}: {outcome}, expected {expected}")
    assert wrong == []


async def test_the_webhook_and_health_need_no_key(served: Served) -> None:
    api = served.api
    wf = await api.create_workflow({"name": "hooked", "project_id": ALPHA,
                                    "steps": [{"ref": "a", "kind": "noop"}]})
    rotated = await api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id))
    token = rotated.webhook_url.rsplit("/", 1)[-1]

    outcome = await invoke(served.bare, method_named("DeliverWebhook"),
                           hooks_pb.DeliverWebhookRequest(token=token, payload=struct({"n": 1})))

    assert outcome.code == OK, outcome
    (run,) = outcome.items
    assert (run.project_id, run.workflow_id, run.triggered_by) == (ALPHA, wf.id, "webhook")
    health = health_pb2_grpc.HealthStub(served.bare)
    response = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_key_revoked_elsewhere_stops_working_when_its_cache_entry_goes_stale(served: Served) -> None:
    api = served.api
    engine, clock = api.engine, api.clock
    revoked_key, token = await engine.keys.create(TEST_ADMIN, "revoked-elsewhere", ALPHA, "viewer")
    get = method_named("ListWorkflows")
    assert (await invoke(served.bare, get, wf_pb.ListWorkflowsRequest(), bearer(token))).code == OK

    # Another replica revokes it: this one's cache still holds the key ...
    async with engine.store.write() as repo:
        await repo.revoke_key(revoked_key.id, clock.now())
    clock.advance(4.9)
    assert (await invoke(served.bare, get, wf_pb.ListWorkflowsRequest(), bearer(token))).code == OK
    # ... for at most the cache's 5 seconds.
    clock.advance(0.1)
    outcome = await invoke(served.bare, get, wf_pb.ListWorkflowsRequest(), bearer(token))
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


async def test_a_key_works_until_the_instant_it_expires(served: Served) -> None:
    api = served.api
    clock = api.clock
    create = method_named("CreateApiKey")
    past = keys_pb.CreateApiKeyRequest(name="too-late", project_id=ALPHA, role="viewer")
    past.expires_at.FromDatetime(clock.now() - timedelta(seconds=1))

    refused = await invoke(api.channel, create, past)

    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
    keys = await invoke(api.channel, method_named("ListApiKeys"),
                        keys_pb.ListApiKeysRequest(include_revoked=True))
    assert "too-late" not in {k.name for k in keys.items}

    soon = keys_pb.CreateApiKeyRequest(name="short-lived", project_id=ALPHA, role="viewer")
    soon.expires_at.FromDatetime(clock.now() + timedelta(seconds=60))
    created = await invoke(api.channel, create, soon)
    assert created.code == OK, created
    token = created.items[0].token
    get = method_named("GetWorkflowRun")
    missing = runs_pb.GetWorkflowRunRequest(workflow_run_id="nope")

    clock.advance(59.9)
    assert (await invoke(served.bare, get, missing, bearer(token))).reason == "RUN_NOT_FOUND"
    clock.advance(0.1)  # the cache entry is fresh (0.1 s old): expiry is checked on every call
    outcome = await invoke(served.bare, get, missing, bearer(token))
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")


# -- the isolation matrix: alpha's world -----------------------------------------------------


def pipeline(name: str, project: str, queue: str = "q", **extra: Any) -> dict[str, Any]:
    """build, then an approval gate, an input step and a task step, then ship."""
    return {
        "name": name, "project_id": project, **extra,
        "steps": [
            {"ref": "build", "kind": "noop"},
            {"ref": "gate", "kind": "approval", "depends_on": ["build"]},
            {"ref": "answer", "kind": "input", "depends_on": ["build"]},
            {"ref": "t", "kind": "task", "queue": queue, "depends_on": ["build"]},
            {"ref": "ship", "kind": "noop", "depends_on": ["gate", "answer", "t"]},
        ],
    }


@dataclass
class Fresh:
    """A run of alpha's `fresh` workflow for one cell to change: gate and answer waiting, its
    task `t` leased by WORKER."""

    run_id: str
    task: pb.Task


@dataclass
class World:
    api: Api
    bare: grpc.aio.Channel
    tokens: dict[tuple[str, str], str]
    wf: pb.Workflow  # alpha's "pipeline", scheduled, webhook enabled
    run_id: str  # its run: gate and answer waiting, t leased by WORKER, one comment
    task: pb.Task
    key_id: str  # alpha's key "alpha-ci"
    key_token: str
    hook_token: str
    fake: dict[str, str]  # each of alpha's ids -> an id of the same shape that names nothing
    pool: list[Fresh]
    serial: itertools.count[int] = field(default_factory=itertools.count)

    def next(self, prefix: str) -> str:
        return f"{prefix}-{next(self.serial)}"

    def fresh_run(self) -> Fresh:
        return self.pool.pop()

    async def fresh_workflow(self, **extra: Any) -> pb.Workflow:
        return await self.api.create_workflow(pipeline(self.next("wf"), ALPHA, **extra))


Build = Callable[[World, bool], Awaitable[Message]]
Check = Callable[[World, Message, Outcome], None]

ABSENT, FORBIDDEN, EMPTY = "absent", "forbidden", "empty"
# Secrets live under a project's path: a foreign key naming alpha gets what naming no project gets.
NO_PROJECT = "no project"


@dataclass
class Case:
    """One RPC's request naming alpha's resource. `build(world, fresh)`: with fresh=True (a
    cell allowed to act) on a resource of the cell's own where the call changes state; with
    fresh=False on the shared one. `foreign`: what a foreign key with the role gets — ABSENT
    (what the same request gets with ids that do not exist), FORBIDDEN (PROJECT_FORBIDDEN:
    the request names alpha as the project to act in), EMPTY (a list: nothing of alpha's) or
    NO_PROJECT (what the same request gets naming a project that does not exist).
    `ok`: checks an allowed cell's result. `pool`/`work`: allowed cells use a fresh run /
    a ready task of queue "work" (counted up front)."""

    build: Build
    foreign: str = ABSENT
    ok: Check | None = None
    first_only: bool = False
    pool: bool = False
    work: bool = False


def run_case(make: Callable[[str], Message], ok: Check | None = None,
             prepare: Callable[[World, Fresh], Awaitable[None]] | None = None) -> Case:
    async def build(w: World, fresh: bool) -> Message:
        if not fresh:
            return make(w.run_id)
        f = w.fresh_run()
        if prepare is not None:
            await prepare(w, f)
        return make(f.run_id)
    return Case(build, ok=ok, pool=True)


def task_case(make: Callable[[pb.Task], Message], ok: Check | None = None) -> Case:
    async def build(w: World, fresh: bool) -> Message:
        return make(w.fresh_run().task if fresh else w.task)
    return Case(build, ok=ok, pool=True)


def workflow_case(make: Callable[[pb.Workflow], Message], ok: Check | None = None,
                  prepare: Callable[[World, pb.Workflow], Awaitable[None]] | None = None,
                  **extra: Any) -> Case:
    async def build(w: World, fresh: bool) -> Message:
        if not fresh:
            return make(w.wf)
        wf = await w.fresh_workflow(**extra)
        if prepare is not None:
            await prepare(w, wf)
        return make(wf)
    return Case(build, ok=ok)


def shared(make: Callable[[World], Message], ok: Check | None = None, **kw: Any) -> Case:
    async def build(w: World, fresh: bool) -> Message:
        return make(w)
    return Case(build, ok=ok, **kw)


# Preconditions an admin sets up on a cell's fresh run before the cell acts on it.
async def _pause(w: World, f: Fresh) -> None:
    await w.api.runs.PauseWorkflowRun(runs_pb.PauseWorkflowRunRequest(workflow_run_id=f.run_id))


async def _cancel(w: World, f: Fresh) -> None:
    await w.api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id=f.run_id))


async def _fail_task(w: World, f: Fresh) -> None:
    await w.api.workers.FailTask(workers_pb.FailTaskRequest(
        task_id=f.task.task_id, attempt=f.task.attempt, worker_id=WORKER, error="boom", non_retryable=True))


async def _pause_schedule(w: World, wf: pb.Workflow) -> None:
    await w.api.workflows.PauseSchedule(wf_pb.PauseScheduleRequest(workflow_id=wf.id))


async def _create_workflow(w: World, fresh: bool) -> Message:
    return wf_pb.CreateWorkflowRequest(workflow=json_format.ParseDict(
        pipeline(w.next("created") if fresh else "refused-workflow", ALPHA), pb.Workflow()))


async def _create_key(w: World, fresh: bool) -> Message:
    return keys_pb.CreateApiKeyRequest(name=w.next("key") if fresh else "refused-key",
                                       project_id=ALPHA, role="viewer")


async def _put_secret(w: World, fresh: bool) -> Message:
    name = f"S_{next(w.serial)}" if fresh else "TOKEN"  # a refused call must not replace alpha's
    return secrets_pb.PutSecretRequest(project_id=ALPHA, name=name, value="v")


async def _delete_secret(w: World, fresh: bool) -> Message:
    if not fresh:
        return secrets_pb.DeleteSecretRequest(project_id=ALPHA, name="TOKEN")
    name = f"D_{next(w.serial)}"
    await w.api.engine.secrets.put(TEST_ADMIN, ALPHA, name, "v")
    return secrets_pb.DeleteSecretRequest(project_id=ALPHA, name=name)


async def _publish_event(w: World, fresh: bool) -> Message:
    ident = w.next("event") if fresh else "refused-event"
    return events_pb.PublishEventRequest(project_id=ALPHA, name="deployed", key="svc", id=ident)


async def _revoke_key(w: World, fresh: bool) -> Message:
    if not fresh:
        return keys_pb.RevokeApiKeyRequest(key_id=w.key_id)
    fresh_key, _ = await w.api.engine.keys.create(TEST_ADMIN, w.next("revocable"), ALPHA, "viewer")
    return keys_pb.RevokeApiKeyRequest(key_id=fresh_key.id)


def _first(outcome: Outcome) -> Any:
    assert len(outcome.items) == 1, outcome
    return outcome.items[0]


def _ids(outcome: Outcome) -> set[str]:
    return {item.id for item in outcome.items}


def _all_of(project: str, outcome: Outcome) -> None:
    assert outcome.items, "nothing listed"
    assert {item.project_id for item in outcome.items} == {project}


def _alpha_listing(outcome: Outcome, ident: str) -> None:
    _all_of(ALPHA, outcome)
    assert ident in _ids(outcome)


def _snapshot_of_run(w: World, _r: Message, o: Outcome) -> None:
    first = _first(o)
    assert first.WhichOneof("message") == "snapshot" and first.snapshot.run.id == w.run_id


def _ok_list_runs(w: World, _r: Message, o: Outcome) -> None:
    assert w.run_id in _ids(o)
    _all_of(ALPHA, o)


def _ok_steps(w: World, _r: Message, o: Outcome) -> None:
    status = pb.StepStatus
    assert {s.step_ref: s.status for s in o.items} == {
        "build": status.completed, "gate": status.waiting, "answer": status.waiting,
        "t": status.running, "ship": status.pending}


CASES: dict[str, Case] = {
    # WorkflowsService
    "CreateWorkflow": Case(_create_workflow, foreign=FORBIDDEN,
                           ok=lambda w, r, o: _all_of(ALPHA, o)),
    "GetWorkflow": shared(lambda w: wf_pb.GetWorkflowRequest(workflow_id=w.wf.id),
                          ok=lambda w, r, o: _all_of(ALPHA, o)),
    "ListWorkflows": shared(lambda w: wf_pb.ListWorkflowsRequest(project_id=ALPHA), foreign=EMPTY,
                            ok=lambda w, r, o: _alpha_listing(o, w.wf.id)),
    "ListWorkflowVersions": shared(lambda w: wf_pb.ListWorkflowVersionsRequest(workflow_id=w.wf.id),
                                   ok=lambda w, r, o: _check([(x.id, x.version) for x in o.items]
                                                             == [(w.wf.id, 1)])),
    "UpdateWorkflow": workflow_case(
        lambda wf: wf_pb.UpdateWorkflowRequest(workflow_id=wf.id, workflow=wf),
        ok=lambda w, r, o: _check(_first(o).version == 2)),
    "ArchiveWorkflow": workflow_case(lambda wf: wf_pb.ArchiveWorkflowRequest(workflow_id=wf.id)),
    "RotateWebhook": workflow_case(lambda wf: wf_pb.RotateWebhookRequest(workflow_id=wf.id),
                                   ok=lambda w, r, o: _check(_first(o).workflow.webhook_enabled)),
    "DisableWebhook": workflow_case(lambda wf: wf_pb.DisableWebhookRequest(workflow_id=wf.id),
                                    ok=lambda w, r, o: _check(not _first(o).webhook_enabled)),
    "PauseSchedule": workflow_case(lambda wf: wf_pb.PauseScheduleRequest(workflow_id=wf.id),
                                   ok=lambda w, r, o: _check(_first(o).schedule_paused), schedule=YEARLY),
    "ResumeSchedule": workflow_case(lambda wf: wf_pb.ResumeScheduleRequest(workflow_id=wf.id),
                                    ok=lambda w, r, o: _check(not _first(o).schedule_paused),
                                    prepare=_pause_schedule, schedule=YEARLY),
    # WorkflowRunsService
    "TriggerWorkflowRun": shared(
        lambda w: runs_pb.TriggerWorkflowRunRequest(workflow_id=w.wf.id),
        ok=lambda w, r, o: _check((_first(o).project_id, _first(o).workflow_id) == (ALPHA, w.wf.id))),
    "GetWorkflowRun": shared(lambda w: runs_pb.GetWorkflowRunRequest(workflow_run_id=w.run_id),
                             ok=lambda w, r, o: _check(_ids(o) == {w.run_id})),
    "ListWorkflowRuns": shared(
        lambda w: runs_pb.ListWorkflowRunsRequest(project_id=ALPHA, workflow_id=[w.wf.id]),
        foreign=EMPTY, ok=_ok_list_runs),
    "CancelWorkflowRun": run_case(lambda i: runs_pb.CancelWorkflowRunRequest(workflow_run_id=i)),
    "PauseWorkflowRun": run_case(lambda i: runs_pb.PauseWorkflowRunRequest(workflow_run_id=i)),
    "ResumeWorkflowRun": run_case(lambda i: runs_pb.ResumeWorkflowRunRequest(workflow_run_id=i),
                                  prepare=_pause),
    "RetryWorkflowRun": run_case(lambda i: runs_pb.RetryWorkflowRunRequest(workflow_run_id=i),
                                 prepare=_cancel, ok=lambda w, r, o: _all_of(ALPHA, o)),
    "BulkCancelWorkflowRuns": run_case(
        lambda i: runs_pb.BulkCancelWorkflowRunsRequest(workflow_run_ids=[i]),
        ok=lambda w, r, o: _check((_first(o).canceled, _first(o).failed) == (1, 0))),
    "BulkReplayWorkflowRuns": run_case(
        lambda i: runs_pb.BulkReplayWorkflowRunsRequest(workflow_run_ids=[i]), prepare=_cancel,
        ok=lambda w, r, o: _check((_first(o).replayed, _first(o).failed) == (1, 0))),
    "ListRunEvents": shared(lambda w: runs_pb.ListRunEventsRequest(workflow_run_id=w.run_id),
                            ok=lambda w, r, o: _check(len(o.items) > 3)),
    "WatchWorkflowRun": shared(lambda w: runs_pb.WatchWorkflowRunRequest(workflow_run_id=w.run_id),
                               ok=_snapshot_of_run, first_only=True),
    "AddRunComment": run_case(lambda i: runs_pb.AddRunCommentRequest(workflow_run_id=i, content="hi"),
                              ok=lambda w, r, o: _check(_first(o).content == "hi")),
    "ListRunComments": shared(lambda w: runs_pb.ListRunCommentsRequest(workflow_run_id=w.run_id),
                              ok=lambda w, r, o: _check([c.content for c in o.items] == ["looks good"])),
    # From the feed's first position: alpha's changes so far arrive at once. Naming alpha as the
    # project to watch is what a foreign key may not do.
    "WatchProjectRuns": shared(lambda w: runs_pb.WatchProjectRunsRequest(project_id=ALPHA,
                                                                          cursor=FEED_START),
                               foreign=FORBIDDEN, first_only=True,
                               ok=lambda w, r, o: _check(_first(o).run.project_id == ALPHA)),
    # StepRunsService
    "ListStepRuns": shared(lambda w: steps_pb.ListStepRunsRequest(workflow_run_id=w.run_id), ok=_ok_steps),
    "ApproveStep": run_case(lambda i: steps_pb.ApproveStepRequest(workflow_run_id=i, step_ref="gate")),
    "SubmitStepInput": run_case(lambda i: steps_pb.SubmitStepInputRequest(
        workflow_run_id=i, step_ref="answer", data=struct({"ok": True}))),
    "SkipStep": run_case(lambda i: steps_pb.SkipStepRequest(workflow_run_id=i, step_ref="gate")),
    "ForceCompleteStep": run_case(
        lambda i: steps_pb.ForceCompleteStepRequest(workflow_run_id=i, step_ref="gate")),
    "RetryStep": run_case(lambda i: steps_pb.RetryStepRequest(workflow_run_id=i, step_ref="t"),
                          prepare=_fail_task,
                          ok=lambda w, r, o: _check(_first(o).step_run.status == pb.StepStatus.queued)),
    "ReplaySubtree": run_case(lambda i: steps_pb.ReplaySubtreeRequest(workflow_run_id=i, step_ref="gate"),
                              ok=lambda w, r, o: _check(_first(o).reset_steps == 2)),
    # WorkersService: a worker names the project it works for.
    "PollTasks": shared(lambda w: workers_pb.PollTasksRequest(project_id=ALPHA, queue="work", worker_id="w2",
                                                              max_tasks=1),
                        foreign=FORBIDDEN, work=True,
                        ok=lambda w, r, o: _check([t.project_id for t in _first(o).tasks] == [ALPHA])),
    "StreamTasks": shared(lambda w: workers_pb.StreamTasksRequest(project_id=ALPHA, queue="work",
                                                                  worker_id="w3", max_in_flight=1),
                          foreign=FORBIDDEN, work=True, first_only=True,
                          ok=lambda w, r, o: _check(_first(o).task.project_id == ALPHA)),
    "HeartbeatTask": shared(lambda w: workers_pb.HeartbeatTaskRequest(
        task_id=w.task.task_id, attempt=w.task.attempt, worker_id=WORKER),
        ok=lambda w, r, o: _check(_first(o).HasField("lease_expires_at") and not _first(o).revoked)),
    "HeartbeatTasks": shared(lambda w: workers_pb.HeartbeatTasksRequest(
        worker_id=WORKER, leases=[workers_pb.TaskLease(task_id=w.task.task_id, attempt=w.task.attempt)]),
        ok=lambda w, r, o: _check([s.revoked for s in _first(o).leases] == [False])),
    "CompleteTask": task_case(lambda t: workers_pb.CompleteTaskRequest(
        task_id=t.task_id, attempt=t.attempt, worker_id=WORKER, result=struct({"done": True}))),
    "FailTask": task_case(lambda t: workers_pb.FailTaskRequest(
        task_id=t.task_id, attempt=t.attempt, worker_id=WORKER, error="boom")),
    "ReleaseTask": task_case(lambda t: workers_pb.ReleaseTaskRequest(
        task_id=t.task_id, attempt=t.attempt, worker_id=WORKER, reason="deploying")),
    # KeysService
    "CreateApiKey": Case(_create_key, foreign=FORBIDDEN,
                         ok=lambda w, r, o: _check(_first(o).key.project_id == ALPHA
                                                   and _first(o).token.startswith("cvk_"))),
    "ListApiKeys": shared(lambda w: keys_pb.ListApiKeysRequest(project_id=ALPHA), foreign=EMPTY,
                          ok=lambda w, r, o: _alpha_listing(o, w.key_id)),
    "RevokeApiKey": Case(_revoke_key, ok=lambda w, r, o: _check(_first(o).HasField("revoked_at"))),
    # AuditService
    "ListAuditEntries": shared(lambda w: audit_pb.ListAuditEntriesRequest(project_id=ALPHA), foreign=EMPTY,
                               ok=lambda w, r, o: _all_of(ALPHA, o)),
    # SecretsService: names and dates come back, never a value.
    "PutSecret": Case(_put_secret, foreign=NO_PROJECT,
                      ok=lambda w, r, o: _check((_first(o).project_id, _first(o).name) == (ALPHA, r.name))),
    "ListSecrets": shared(lambda w: secrets_pb.ListSecretsRequest(project_id=ALPHA), foreign=NO_PROJECT,
                          ok=lambda w, r, o: _check("TOKEN" in {s.name for s in o.items}
                                                    and {s.project_id for s in o.items} == {ALPHA})),
    "DeleteSecret": Case(_delete_secret, foreign=NO_PROJECT),
    # EventsService: a key publishes into and lists its own project.
    "PublishEvent": Case(_publish_event, foreign=FORBIDDEN,
                         ok=lambda w, r, o: _check((_first(o).project_id, _first(o).id) == (ALPHA, r.id))),
    "ListEvents": shared(lambda w: events_pb.ListEventsRequest(project_id=ALPHA), foreign=EMPTY,
                         ok=lambda w, r, o: _all_of(ALPHA, o)),
    # WebhooksService: the URL's token is the credential, whoever sends it.
    "DeliverWebhook": shared(lambda w: hooks_pb.DeliverWebhookRequest(token=w.hook_token),
                             ok=lambda w, r, o: _check((_first(o).project_id, _first(o).workflow_id)
                                                       == (ALPHA, w.wf.id))),
}


def _check(condition: bool) -> None:
    assert condition


def test_the_matrix_has_a_request_for_every_rpc() -> None:
    names = [m.name for m in contract_methods()]
    assert len(names) == len(set(names)), "method names must be unique to key the table"
    assert sorted(set(names) - CASES.keys()) == [], "RPCs the matrix has no request for"
    assert sorted(CASES.keys() - set(names)) == [], "requests for RPCs that do not exist"


@dataclass(frozen=True)
class Cell:
    method: MethodDescriptor
    scope: str
    role: str

    @property
    def denied(self) -> bool:
        return role_below(self.method, self.role)

    @property
    def allowed(self) -> bool:
        return not self.denied and (needed(self.method) is None or self.scope != "foreign")

    def __str__(self) -> str:
        return f"{self.method.name} as {self.scope} {self.role}"


def cells() -> list[Cell]:
    return [Cell(m, scope, role) for m in contract_methods() for scope in SCOPES for role in ROLES]


async def build_world(served: Served) -> World:
    api = served.api
    engine = api.engine
    all_cells = cells()
    pool_size = sum(1 for c in all_cells if c.allowed and CASES[c.method.name].pool)
    work_size = sum(1 for c in all_cells if c.allowed and CASES[c.method.name].work) + 1

    tokens = {(scope, role): await key(engine, f"{scope}-{role}", project, role)
              for scope, project in SCOPES.items() for role in ROLES}
    wf = await api.create_workflow(pipeline("pipeline", ALPHA, schedule=YEARLY))
    beta_wf = await api.create_workflow(pipeline("pipeline", BETA))  # the same name in beta
    fresh_wf = await api.create_workflow(pipeline("fresh", ALPHA, queue="fresh"))
    work_wf = await api.create_workflow({"name": "work", "project_id": ALPHA,
                                         "steps": [{"ref": "w", "kind": "task", "queue": "work"}]})
    run = await api.trigger(wf.id)
    await api.trigger(beta_wf.id)
    pool_runs = [(await api.trigger(fresh_wf.id)).id for _ in range(pool_size)]
    for _ in range(work_size):
        await api.trigger(work_wf.id)
    beta_work = await api.create_workflow({"name": "work", "project_id": BETA,
                                           "steps": [{"ref": "w", "kind": "task", "queue": "work"}]})
    for _ in range(3):  # younger than alpha's: one for each foreign worker role's stream
        await api.trigger(beta_work.id)
    await engine.tick()

    (task,) = (await api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="q", worker_id=WORKER, max_tasks=10))).tasks
    assert task.workflow_run_id == run.id
    leased = (await api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="fresh", worker_id=WORKER, max_tasks=100))).tasks
    by_run = {t.workflow_run_id: t for t in leased}
    assert sorted(by_run) == sorted(pool_runs)
    (created,) = await as_admin(
        api, "CreateApiKey", keys_pb.CreateApiKeyRequest(name="alpha-ci", project_id=ALPHA, role="operator"))
    rotated = await api.workflows.RotateWebhook(wf_pb.RotateWebhookRequest(workflow_id=wf.id))
    await api.runs.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run.id, content="looks good"))
    await engine.secrets.put(TEST_ADMIN, ALPHA, "TOKEN", "alpha's value")
    for project in (ALPHA, BETA):
        await engine.events.publish(TEST_ADMIN, project, "deployed", "svc", {}, "seed")
    fake = {ident: new_id() for ident in (wf.id, run.id, task.task_id, created.key.id)}
    return World(api=api, bare=served.bare, tokens=tokens, wf=wf, run_id=run.id, task=task,
                 key_id=created.key.id, key_token=created.token,
                 hook_token=rotated.webhook_url.rsplit("/", 1)[-1], fake=fake,
                 pool=[Fresh(r, by_run[r]) for r in pool_runs])


async def alpha_state(w: World) -> dict[str, Any]:
    """Everything of alpha's shared resources a foreign or refused call could have changed."""
    api = w.api
    run = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=w.run_id))
    steps = [s async for s in api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id=w.run_id))]
    events = [e async for e in api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id=w.run_id))]
    wf = await api.workflows.GetWorkflow(wf_pb.GetWorkflowRequest(workflow_id=w.wf.id))
    keys = await as_admin(api, "ListApiKeys",
                          keys_pb.ListApiKeysRequest(project_id=ALPHA, include_revoked=True))
    (alpha_ci,) = [k for k in keys if k.id == w.key_id]
    (token,) = [s for s in await as_admin(api, "ListSecrets", secrets_pb.ListSecretsRequest(
        project_id=ALPHA, limit=1000)) if s.name == "TOKEN"]
    return {
        "secret": token.updated_at.ToJsonString(),
        "run": (run.status, run.project_id),
        "steps": {s.step_ref: (s.status, s.attempt) for s in steps},
        "events": [(e.seq, e.type) for e in events],
        "workflow": (wf.version, wf.archived, wf.schedule_paused, wf.webhook_enabled, wf.webhook_url_hint),
        "key revoked": alpha_ci.HasField("revoked_at"),
    }


async def test_every_rpc_by_every_role_of_alpha_a_foreign_project_and_every_project(served: Served) -> None:
    w = await build_world(served)
    before = await alpha_state(w)
    bare = served.bare
    wrong: list[str] = []

    for cell in cells():
        case = CASES[cell.method.name]
        metadata = bearer(w.tokens[(cell.scope, cell.role)])
        request = await case.build(w, cell.allowed)
        outcome = await invoke(bare, cell.method, request, metadata, first_only=case.first_only,
                               deadline=5.0)
        try:
            if cell.denied:
                assert (outcome.code, outcome.reason) == (DENIED, "ROLE_TOO_LOW")
                assert not outcome.items
            elif path(cell.method) in PENDING_RPCS:
                assert (outcome.code, outcome.reason) == (grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED")
            elif cell.allowed:
                assert outcome.code == OK
                if case.ok is not None:
                    case.ok(w, request, outcome)
            elif case.foreign == FORBIDDEN:
                assert (outcome.code, outcome.reason) == (DENIED, "PROJECT_FORBIDDEN")
                assert not outcome.items
            elif case.foreign == EMPTY:
                await check_foreign_list(w, cell, request, outcome, metadata)
            elif case.foreign == NO_PROJECT:
                await check_as_if_absent(w, cell, request, outcome, metadata, {ALPHA: "nowhere"})
            else:
                await check_as_if_absent(w, cell, request, outcome, metadata)
        except Exception as e:
            wrong.append(f"{cell}: {outcome} {type(e).__name__} {e}")

    wrong += await check_foreign_workers_lease_nothing(w, bare)
    wrong += await check_foreign_names(w, bare)
    assert wrong == [], "\n".join(wrong)
    assert await alpha_state(w) == before
    # What refused calls (too low a role, a foreign key) asked to create in alpha does not exist.
    keys = [k.name for k in await as_admin(w.api, "ListApiKeys", keys_pb.ListApiKeysRequest(limit=1000))]
    workflows = [x.name async for x in w.api.workflows.ListWorkflows(
        wf_pb.ListWorkflowsRequest(include_archived=True, limit=1000))]
    assert "alpha-ci" in keys and "refused-key" not in keys
    assert "pipeline" in workflows and "refused-workflow" not in workflows
    # The shared key and webhook still work; the one ready task of "work" nobody allowed took is
    # still there (foreign pollers did not lease it).
    get = method_named("GetWorkflowRun")
    outcome = await invoke(bare, get, runs_pb.GetWorkflowRunRequest(workflow_run_id=w.run_id),
                           bearer(w.key_token))
    assert outcome.code == OK, outcome
    delivered = await invoke(bare, method_named("DeliverWebhook"),
                             hooks_pb.DeliverWebhookRequest(token=w.hook_token))
    assert delivered.code == OK, delivered
    left = await w.api.workers.PollTasks(workers_pb.PollTasksRequest(
        project_id=ALPHA, queue="work", worker_id="last", max_tasks=100))
    assert len(left.tasks) == 1


async def check_as_if_absent(w: World, cell: Cell, request: Message, outcome: Outcome,
                             metadata: Sequence[tuple[str, str]], fake: dict[str, str] | None = None) -> None:
    """The foreign key's answer is exactly the answer for ids that name nothing (`fake`: alpha's
    ids, or what else the request names, to what names nothing)."""
    fake = w.fake if fake is None else fake
    twin = substitute(request, fake)
    assert twin != request, "the request names none of alpha's ids"
    absent = await invoke(w.bare, cell.method, twin, metadata,
                          first_only=CASES[cell.method.name].first_only)
    seen = Outcome(outcome.code, outcome.reason, swap_text(outcome.message, fake),
                   {k: swap_text(v, fake) for k, v in outcome.metadata.items()},
                   [substitute(item, fake) for item in outcome.items])
    assert seen == absent, f"absent: {absent}"
    if absent.code != OK:
        assert absent.code == grpc.StatusCode.NOT_FOUND and not absent.items
    elif cell.method.name.startswith("Bulk"):  # counted as failed, touched nowhere (alpha_state)
        assert _first(outcome).failed == 1


async def check_foreign_list(w: World, cell: Cell, request: Message, outcome: Outcome,
                             metadata: Sequence[tuple[str, str]]) -> None:
    """Naming alpha lists nothing; naming no project lists the key's own project only."""
    assert outcome.code == OK and outcome.items == []
    unfiltered = type(request)()
    everything = await invoke(w.bare, cell.method, unfiltered, metadata)
    assert everything.code == OK, everything
    _all_of(BETA, everything)


async def check_foreign_workers_lease_nothing(w: World, bare: grpc.aio.Channel) -> list[str]:
    """A foreign worker key naming its own project (or none) never leases alpha's ready tasks,
    though alpha's "work" tasks are older than beta's (tasks are leased oldest first)."""
    wrong = []
    poll, stream = method_named("PollTasks"), method_named("StreamTasks")
    roles = ("worker", "operator", "admin")
    for role in roles:
        # Beta has one "work" task per foreign role: each stream's first message leases one.
        streamed = await invoke(bare, stream, workers_pb.StreamTasksRequest(
            queue="work", worker_id=f"spy-{role}", max_in_flight=1), bearer(w.tokens[("foreign", role)]),
            first_only=True, deadline=5.0)
        if streamed.code != OK or [m.task.project_id for m in streamed.items] != [BETA]:
            wrong.append(f"foreign {role} streaming its own work queue: {streamed}")
    for role in roles:
        metadata = bearer(w.tokens[("foreign", role)])
        for project in ("", BETA):
            for queue in ("work", "q", "fresh"):
                polled = await invoke(bare, poll, workers_pb.PollTasksRequest(
                    project_id=project, queue=queue, worker_id="spy", max_tasks=100), metadata)
                # Beta's own run has a task on "q": that one it may lease, never alpha's.
                if polled.code != OK or {t.project_id for t in polled.items[0].tasks} - {BETA}:
                    wrong.append(f"foreign {role} polling {project or '(own)'}/{queue}: {polled}")
    return wrong


async def check_foreign_names(w: World, bare: grpc.aio.Channel) -> list[str]:
    """Naming alpha's resources by name (and alpha as the project) is absent too; `*` keys are
    foreign to a project's admin; a foreign key still sees its own resource of the same name."""
    wrong = []
    metadata = bearer(w.tokens[("foreign", "admin")])
    pairs = [
        ("GetWorkflow", wf_pb.GetWorkflowRequest(workflow_id="pipeline", project_id=ALPHA),
         wf_pb.GetWorkflowRequest(workflow_id="nothing", project_id=ALPHA)),
        ("ListWorkflowVersions", wf_pb.ListWorkflowVersionsRequest(workflow_id="pipeline", project_id=ALPHA),
         wf_pb.ListWorkflowVersionsRequest(workflow_id="nothing", project_id=ALPHA)),
        ("TriggerWorkflowRun", runs_pb.TriggerWorkflowRunRequest(workflow_id="pipeline", project_id=ALPHA),
         runs_pb.TriggerWorkflowRunRequest(workflow_id="nothing", project_id=ALPHA)),
        ("ArchiveWorkflow", wf_pb.ArchiveWorkflowRequest(workflow_id="pipeline", project_id=ALPHA),
         wf_pb.ArchiveWorkflowRequest(workflow_id="nothing", project_id=ALPHA)),
        ("RevokeApiKey", keys_pb.RevokeApiKeyRequest(key_id="alpha-ci"),
         keys_pb.RevokeApiKeyRequest(key_id="nothing")),
    ]
    for name, named, missing in pairs:
        method = method_named(name)
        got = await invoke(bare, method, named, metadata)
        absent = await invoke(bare, method, missing, metadata)
        got.message = got.message.replace("pipeline", "nothing").replace("alpha-ci", "nothing")
        if got != absent or got.code != grpc.StatusCode.NOT_FOUND:
            wrong.append(f"foreign {name} by name: {got}; absent: {absent}")
    # Keys of every project are beyond a project admin: it cannot create one, see one or revoke one.
    own_admin = bearer(w.tokens[("own", "admin")])
    star_key = await w.api.engine.keys.resolve(w.tokens[("star", "admin")])
    assert star_key is not None
    escalate = await invoke(bare, method_named("CreateApiKey"),
                            keys_pb.CreateApiKeyRequest(name="escalated", project_id="*", role="viewer"),
                            own_admin)
    if (escalate.code, escalate.reason) != (DENIED, "PROJECT_FORBIDDEN"):
        wrong.append(f"alpha admin creating a * key: {escalate}")
    listed = await invoke(bare, method_named("ListApiKeys"), keys_pb.ListApiKeysRequest(project_id="*"),
                          own_admin)
    if listed.code != OK or listed.items:
        wrong.append(f"alpha admin listing * keys: {listed}")
    for ident in (star_key.id, star_key.name):
        revoke = method_named("RevokeApiKey")
        got = await invoke(bare, revoke, keys_pb.RevokeApiKeyRequest(key_id=ident), own_admin)
        absent = await invoke(bare, revoke, keys_pb.RevokeApiKeyRequest(key_id="nothing"), own_admin)
        got.message = got.message.replace(ident, "nothing")
        if got != absent or got.code != grpc.StatusCode.NOT_FOUND:
            wrong.append(f"alpha admin revoking the * key {ident}: {got}; absent: {absent}")
    # Its own "pipeline" (same name, project beta) it does see.
    own = await invoke(bare, method_named("GetWorkflow"), wf_pb.GetWorkflowRequest(workflow_id="pipeline"),
                       metadata)
    if own.code != OK or own.items[0].project_id != BETA:
        wrong.append(f"foreign GetWorkflow of its own pipeline: {own}")
    return wrong
