"""Triggers: turning trigger requests into runs, with group commit and idempotency (SPEC §3).

Concurrent triggers are queued and written together: one drain task takes up to `batch_size`
queued requests and writes all their runs, steps, first events and idempotency records in ONE
transaction, so the cost of a commit (an fsync on SQLite) is shared by every request in it. Each
request still gets its own answer: a request that fails validation fails alone and the rest of
its batch is written; a batch the database refuses is written again request by request, unless
the database is unavailable (then the batch, and the requests queued behind it, fail together
UNAVAILABLE at once: one by one, each would wait a timeout for the same answer). The queue is
bounded: beyond `queue_limit` waiting requests a trigger is RESOURCE_EXHAUSTED QUEUE_FULL. Runs are
built (and, when their workflow caps no concurrent runs, planned) before the write transaction
opens, so it holds the writer only for the idempotency lookup and the inserts.

Idempotency: the key is scoped to (project, workflow) and kept for the configured TTL. The same
key with the same request body answers the original run; with a different body it is
ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED. A batch looks all its keys up in one statement.
Duplicates inside one batch are resolved in memory; duplicates racing across replicas meet the
idempotency table's primary key, and the batch is then retried request by request, each seeing
the other's committed record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from conveyor.domain.actors import check_run_as
from conveyor.domain.concurrency import check_priority, effective_start
from conveyor.domain.errors import ConveyorError, DuplicateKey, ErrorKind, is_outage, overloaded
from conveyor.domain.families import refusal
from conveyor.domain.limits import Limits
from conveyor.domain.new_runs import NewRun
from conveyor.domain.operations import workflow_archived
from conveyor.domain.records import Caller, RunRecord, TriggerRequest, WorkflowRecord
from conveyor.domain.spec import apply_variables
from conveyor.domain.states import RunStatus
from conveyor.engine import creation
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.workflows import name_scope

log = logging.getLogger(__name__)

# Batches that would plan more steps than this are built on the offload thread.
_PLAN_ON_LOOP_STEPS = 2000
# Tries of a request written alone that keeps meeting another replica's record of its key.
_DUPLICATE_RETRIES = 3
# Workflows remembered between batches (each checked against its current version on write).
_KNOWN_WORKFLOWS = 256
# (caller's project scope, project of names, workflow id or name): how a request names one.
_WfKey = tuple[str | None, str, str]
# (project, workflow id, key): what an idempotency record is keyed by.
IdemKey = tuple[str, str, str]


@dataclass
class _Pending:
    req: TriggerRequest
    caller: Caller
    future: asyncio.Future[RunRecord] = field(repr=False)
    # Filled in before the write: the run this request would create and its idempotency key.
    new: NewRun | None = None
    key: IdemKey | None = None
    request_hash: str = ""


def request_hash(req: TriggerRequest, workflow_id: str) -> str:
    """The body of a trigger as idempotency compares it: everything but the key and `immediate`,
    with the workflow by id, so naming it by id or by name is the same request."""
    body = {"workflow_id": workflow_id, "payload": req.payload, "tags": req.tags,
            "entity_id": req.entity_id, "run_as": req.run_as, "max_parallel_steps": req.max_parallel_steps,
            "timeout_seconds": req.timeout_seconds, "check_conditions": req.check_conditions}
    if req.notifications:  # only when given: keys recorded before notifications existed still match
        body["notifications"] = req.notifications
    if req.priority:  # the same: only when not the default
        body["priority"] = req.priority
    if req.start_at is not None:
        body["start_at"] = req.start_at.isoformat()
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def key_reused(key: str) -> ConveyorError:
    return ConveyorError(ErrorKind.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED",
                         f"idempotency key {key!r} was already used with a different request body")


class Triggers:
    """The group-commit trigger queue."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, batch_size: int = 256,
                 idempotency_ttl: int = 24 * 3600, limits: Limits | None = None,
                 queue_limit: int = 2048, max_nesting_depth: int = 10) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.batch_size = batch_size
        self.queue_limit = queue_limit
        self.ttl = timedelta(seconds=idempotency_ttl)
        self.limits = limits or Limits()
        self.max_depth = max_nesting_depth
        self._queue: list[_Pending] = []
        # Workflows recently triggered, so a batch needs no read transaction to find them.
        self._known: OrderedDict[_WfKey, WorkflowRecord] = OrderedDict()
        self._drain_task: asyncio.Task[None] | None = None

    async def trigger(self, req: TriggerRequest, caller: Caller) -> RunRecord:
        """Create a run (or answer the idempotent original) once its batch has committed."""
        if req.max_parallel_steps < 0 or req.timeout_seconds < 0:
            raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                "max_parallel_steps and timeout_seconds must not be negative")
        check_run_as(req.run_as)
        check_priority(req.priority)
        if len(self._queue) >= self.queue_limit:
            # Refused before it waits: a full queue means the database is slow or gone, and a
            # request that waited behind it would only time out later.
            raise overloaded("QUEUE_FULL", "too many triggers are waiting to be written; retry shortly")
        item = _Pending(req, caller, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="conveyor-trigger-drain")
        run = await asyncio.shield(item.future)
        if req.immediate and run.status == RunStatus.PENDING:
            await self.runner.advance_now([run.id])
            async with self.store.read() as repo:
                return await repo.get_run(run.id, None)
        return run

    async def close(self) -> None:
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)

    async def _drain(self) -> None:
        # Runs as its own task so a client that hangs up cannot stop other requests' batch.
        while self._queue:
            batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
            try:
                await self._flush(batch)
                continue
            except DuplicateKey:
                # Another replica recorded one of the keys between our lookup and our insert;
                # the transaction rolled back. One by one, each request now sees that record.
                pass
            except Exception as e:
                if is_outage(e):
                    # The database is gone, not refusing one request: the batch fails together,
                    # and so do the requests that queued behind it meanwhile (each later batch
                    # would wait its own timeout for the same answer).
                    self._fail_all(batch, e)
                    continue
                if len(batch) == 1:
                    _fail(batch[0], e)
                    continue
                # The database refused the batch: one by one, the refused request fails alone.
                log.exception("trigger batch of %d failed; writing its requests one by one", len(batch))
            for i, item in enumerate(batch):
                if item.future.done():
                    continue
                try:
                    await self._flush_alone(item)
                except ConveyorError as e:  # an outage met midway: the rest would meet it too
                    self._fail_all(batch[i:], e)
                    break

    def _fail_all(self, batch: list[_Pending], error: Exception) -> None:
        """Fail these requests and every one still queued with `error` (an outage)."""
        queued, self._queue = self._queue, []
        for item in (*batch, *queued):
            _fail(item, error)

    async def _flush_alone(self, item: _Pending) -> None:
        """Write one request by itself. Meeting another replica's record of its key again means
        that replica had not committed when we looked: look again, and it is there. An outage
        is raised, for the caller to fail the rest with."""
        for _ in range(_DUPLICATE_RETRIES):
            try:
                await self._flush([item])
                return
            except DuplicateKey:
                continue
            except Exception as e:
                if is_outage(e):
                    raise
                _fail(item, e)
                return
        _fail(item, ConveyorError(ErrorKind.ABORTED, "CONCURRENT_CHANGE",
                                  "the idempotency key kept being recorded concurrently; try again"))

    async def _flush(self, items: list[_Pending]) -> None:
        """Write the runs of these requests and answer them."""
        try:
            await self._write(items)
        except _Stale:
            await self._write(items)  # now built from workflows read afresh

    async def _write(self, items: list[_Pending]) -> None:
        now = self.clock.now()
        # Everything that needs no lock happens before the write transaction: finding the
        # workflows (remembered from earlier batches), checking payloads, building and planning
        # each new run. The write transaction then only checks that no workflow changed since.
        workflows = await self._workflows_of(items)
        specs = [w.spec for w in workflows.values() if isinstance(w, WorkflowRecord)]
        big = sum(len(s.steps) for s in specs) * len(items) > _PLAN_ON_LOOP_STEPS
        if big or any(s.evaluates for s in specs):
            # Runs that evaluate expressions, or many steps, are built on the offload thread; a
            # few plain steps are cheaper built right here than handed over.
            problems = await self.runner.offload.run(self._prepare_all, items, workflows, now)
        else:
            problems = self._prepare_all(items, workflows, now)
        live: list[_Pending] = []
        for item, problem in zip(items, problems, strict=True):
            if problem is None:
                live.append(item)
            else:
                _fail(item, problem)
        if not live:
            return
        async with self.store.write() as repo:
            used = {i.new.run.workflow_id: i.new.run.workflow_version_id for i in live if i.new is not None}
            current = await repo.current_versions(used)
            if any(current.get(wf) != (version, False) for wf, version in used.items()):
                # Updated or archived since it was remembered (maybe by another replica): forget
                # it and build this batch again from what the database says now.
                self._known.clear()
                raise _Stale()
            keys = [i.key for i in live if i.key is not None]
            hits = await repo.idempotency_lookup(keys, now) if keys else {}
            # Answers are given only once the transaction has committed: a batch that rolls
            # back (DuplicateKey) is answered afresh, against the records that won.
            answers: dict[int, RunRecord | str | ConveyorError] = {}
            written: list[_Pending] = []
            for item in live:
                answer = self._idempotent(item, hits, written)
                if answer is None:
                    written.append(item)
                    assert item.new is not None
                    answer = item.new.run
                answers[id(item)] = answer
            await creation.insert(repo, [i.new for i in written if i.new is not None], [
                {"project_id": i.key[0], "workflow_id": i.key[1], "key": i.key[2],
                 "request_hash": i.request_hash, "run_id": i.new.run.id, "expires_at": now + self.ttl}
                for i in written if i.key is not None and i.new is not None])
            originals = [a for a in answers.values() if isinstance(a, str)]
            found_runs = {r.id: r for r in await repo.get_runs(originals, None)} if originals else {}
        self.runner.after_commit([i.new.changes for i in written if i.new is not None])
        self.runner.metrics.trigger_batch_written(len(live))
        for item in live:
            answer = answers[id(item)]
            if isinstance(answer, ConveyorError):
                _fail(item, answer)
            elif not item.future.done():
                item.future.set_result(found_runs[answer] if isinstance(answer, str) else answer)

    async def _workflows_of(self, items: list[_Pending]) -> dict[_WfKey, WorkflowRecord | ConveyorError]:
        """The workflow each request names, by (caller scope, project, id or name)."""
        found: dict[_WfKey, WorkflowRecord | ConveyorError] = {}
        missing = []
        for item in items:
            key = _wf_key(item)
            if key in self._known:
                self._known.move_to_end(key)
                found[key] = self._known[key]
            elif key not in missing:
                missing.append(key)
        if missing:
            async with self.store.read() as repo:
                for key in missing:
                    try:
                        wf = await repo.find_workflow(key[2], key[0], key[1])
                        found[key] = self._known[key] = wf
                    except ConveyorError as e:
                        found[key] = e  # not remembered: it may exist by the next request
            while len(self._known) > _KNOWN_WORKFLOWS:
                self._known.popitem(last=False)
        return found

    def _prepare_all(self, items: list[_Pending], workflows: dict[_WfKey, WorkflowRecord | ConveyorError],
                     now: datetime) -> list[ConveyorError | None]:
        """Build each request's run; returns, per request, why it cannot have one (or None)."""
        problems: list[ConveyorError | None] = []
        for item in items:
            found = workflows[_wf_key(item)]
            try:
                if isinstance(found, ConveyorError):
                    raise found
                self._prepare(item, found, now)
                problems.append(None)
            except ConveyorError as e:
                problems.append(e)
        return problems

    def _prepare(self, item: _Pending, wf: WorkflowRecord, now: datetime) -> None:
        """Build the run this request would create."""
        req, spec = item.req, wf.spec
        if wf.archived:
            raise workflow_archived(wf.name)
        payload = apply_variables(spec, dict(req.payload))
        timeout = req.timeout_seconds or spec.timeout_seconds
        # A delayed run's deadline counts from its start.
        start_at = effective_start(req.start_at, now)
        begins = start_at or now
        run = RunRecord(
            id=new_id(), project_id=wf.project_id, workflow_id=wf.id, workflow_name=wf.name,
            workflow_version=wf.version, workflow_version_id=wf.version_id, status=RunStatus.PENDING,
            created_at=now, updated_at=now, payload=payload, tags=dict(req.tags),
            triggered_by=req.run_as or item.caller.name, created_by=item.caller.name,
            max_parallel_steps=req.max_parallel_steps or spec.max_parallel_steps,
            entity_id=req.entity_id, idempotency_key=req.idempotency_key,
            expires_at=begins + timedelta(seconds=timeout) if timeout else None,
            notifications=req.notifications or None,  # the workflow's are added by open_run
            priority=req.priority, start_at=start_at,
        )
        message, data = "", None
        if (cause := req.caused_by) is not None:
            # A notification of another run asks for this one: it joins that run's family, so a
            # workflow its own family reaches again is refused, as a child run would be.
            refused = refusal(cause.lineage, cause.depth, wf.id, wf.name, cause.run_id, self.max_depth,
                              "runs started by notifications")
            if refused is not None:
                raise ConveyorError(ErrorKind.FAILED_PRECONDITION, *refused)
            run.lineage, run.depth = [*cause.lineage, wf.id], cause.depth + 1
            message = f"started by a notification of run {cause.run_id}"
            data = {"caused_by_run_id": cause.run_id}
        if req.idempotency_key:
            item.key = (wf.project_id, wf.id, req.idempotency_key)
            item.request_hash = request_hash(req, wf.id)
        # The current version's cap is the workflow's (both change together on update).
        item.new = creation.start_run(run, spec, run.triggered_by, self.limits,
                                      capped=bool(spec.caps),
                                      check_condition=req.check_conditions, message=message, data=data)

    @staticmethod
    def _idempotent(item: _Pending, hits: dict[IdemKey, tuple[str, str]],
                    written: list[_Pending]) -> RunRecord | str | ConveyorError | None:
        """The original run of this request's key (a record, or an id to load), an error when the
        key was used with another body, or None when the request is new."""
        if item.key is None:
            return None
        for earlier in written:  # an earlier request of this same batch
            if earlier.key == item.key:
                if earlier.request_hash != item.request_hash:
                    return key_reused(item.key[2])
                assert earlier.new is not None
                return earlier.new.run
        if item.key not in hits:
            return None
        stored_hash, run_id = hits[item.key]
        if stored_hash != item.request_hash:
            return key_reused(item.key[2])
        return run_id


class _Stale(Exception):
    """A remembered workflow changed before the batch was written: build it again."""


def _wf_key(item: _Pending) -> _WfKey:
    return (item.caller.project, name_scope(item.req.project_id, item.caller), item.req.workflow_id)


def _fail(item: _Pending, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)

