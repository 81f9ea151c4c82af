"""Triggers: turning trigger requests into runs, with group commit and idempotency (SPEC §3).

Concurrent triggers are queued and written together: one drain task takes up to `batch_size`
queued requests and writes all their runs, steps, first events and idempotency records in ONE
transaction, so the cost of a commit (an fsync on SQLite) is shared by every request in it. Each
request still gets its own answer: a request that fails validation fails alone and the rest of
its batch is written. A run whose workflow caps no concurrent runs is planned right away, so
it is written already advanced; capped runs are left pending for the runner's slot accounting.

Idempotency: the key is scoped to (project, workflow) and kept for the configured TTL. The same
key with the same request body answers the original run; with a different body it is
ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED. Duplicates inside one batch are resolved in memory;
duplicates racing across replicas meet the idempotency table's primary key, and the batch is
then retried request by request, each seeing the other's committed record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, DuplicateKey, ErrorKind
from conveyor.domain.expressions import ExpressionError, evaluate_bool
from conveyor.domain.operations import workflow_archived
from conveyor.domain.planner import advance, expression_context
from conveyor.domain.records import (
    Caller,
    EventRecord,
    RunRecord,
    StepRecord,
    TriggerRequest,
    WorkflowRecord,
)
from conveyor.domain.spec import apply_variables
from conveyor.domain.states import RunStatus, StepStatus, run_event_type
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Repo, Store
from conveyor.engine.runner import Runner
from conveyor.engine.workflows import name_scope

CONDITIONS_NOT_MET = "conditions not met"


@dataclass
class _Pending:
    req: TriggerRequest
    caller: Caller
    request_hash: str
    future: asyncio.Future[RunRecord] = field(repr=False)


@dataclass
class _Batch:
    """What one flush writes."""

    runs: list[RunRecord] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    idempotency: list[dict[str, Any]] = field(default_factory=list)
    answers: list[tuple[_Pending, RunRecord | str | ConveyorError]] = field(default_factory=list)


def request_hash(req: TriggerRequest) -> str:
    """The body of a trigger as idempotency compares it (everything but the key and `immediate`)."""
    body = {"workflow_id": req.workflow_id, "payload": req.payload, "tags": req.tags,
            "entity_id": req.entity_id, "run_as": req.run_as, "max_parallel_steps": req.max_parallel_steps,
            "timeout_seconds": req.timeout_seconds, "check_conditions": req.check_conditions}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def opening_events(run: RunRecord, now: datetime, actor: str, message: str = "",
                   data: dict[str, Any] | None = None) -> list[EventRecord]:
    """Event 1 of a new run: it entered its first status."""
    c = Changes(run, now, actor)
    c.event(run_event_type(run.status), status=str(run.status), message=message or run.status_message,
            data=data)
    return c.events


def key_reused(key: str) -> ConveyorError:
    return ConveyorError(ErrorKind.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED",
                         f"idempotency key {key!r} was already used with a different request body")


class Triggers:
    """The group-commit trigger queue."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, batch_size: int = 256,
                 idempotency_ttl: int = 24 * 3600) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.batch_size = batch_size
        self.ttl = timedelta(seconds=idempotency_ttl)
        self._queue: list[_Pending] = []
        self._drain_task: asyncio.Task[None] | None = None

    async def trigger(self, req: TriggerRequest, caller: Caller) -> RunRecord:
        """Create a run (or answer the idempotent original) once its batch has committed."""
        if req.max_parallel_steps < 0 or req.timeout_seconds < 0:
            raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                                "max_parallel_steps and timeout_seconds must not be negative")
        item = _Pending(req, caller, request_hash(req), asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="conveyor-trigger-drain")
        run = await asyncio.shield(item.future)
        if req.immediate and run.status == RunStatus.PENDING:
            await self.runner.advance_now([run.id])
            async with self.store.read() as repo:
                return await repo.get_run(run.id, None)
        return run

    async def purge_expired(self) -> int:
        """Delete idempotency records past their TTL; returns how many."""
        async with self.store.write() as repo:
            return await repo.purge_idempotency(self.clock.now())

    async def close(self) -> None:
        if self._drain_task is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)

    async def _drain(self) -> None:
        # Runs as its own task so a client that hangs up cannot stop other requests' batch.
        while self._queue:
            batch, self._queue = self._queue[:self.batch_size], self._queue[self.batch_size:]
            try:
                await self._flush(batch)
            except DuplicateKey:
                # Another replica recorded one of the keys between our lookup and our insert; the
                # whole transaction rolled back. One by one, each request now sees that record.
                for item in batch:
                    try:
                        await self._flush([item])
                    except Exception as e:
                        _fail(item, e)
            except Exception as e:
                for item in batch:
                    _fail(item, e)
            self.runner.notify()

    async def _flush(self, items: list[_Pending]) -> None:
        now = self.clock.now()
        out = _Batch()
        async with self.store.write() as repo:
            workflows: dict[tuple[str, str], WorkflowRecord | ConveyorError] = {}
            for item in items:
                try:
                    wf = await self._workflow(repo, workflows, item)
                    await self._prepare(repo, out, item, wf, now)
                except ConveyorError as e:
                    out.answers.append((item, e))
            if out.runs:
                await repo.insert_runs(out.runs, out.steps, out.events, out.idempotency, now)
            originals = [a for _, a in out.answers if isinstance(a, str)]
            found = {r.id: r for r in await repo.get_runs(originals, None)} if originals else {}
        for item, answer in out.answers:
            if item.future.done():
                continue
            if isinstance(answer, ConveyorError):
                item.future.set_exception(answer)
            elif isinstance(answer, str):
                item.future.set_result(found[answer])
            else:
                item.future.set_result(answer)

    async def _workflow(self, repo: Repo, cache: dict[tuple[str, str], WorkflowRecord | ConveyorError],
                        item: _Pending) -> WorkflowRecord:
        project = name_scope(item.req.project_id, item.caller)
        key = (project, item.req.workflow_id)
        if key not in cache:
            try:
                cache[key] = await repo.find_workflow(item.req.workflow_id, item.caller.project, project)
            except ConveyorError as e:
                cache[key] = e
        found = cache[key]
        if isinstance(found, ConveyorError):
            raise found
        return found

    async def _prepare(self, repo: Repo, out: _Batch, item: _Pending, wf: WorkflowRecord,
                       now: datetime) -> None:
        req = item.req
        if wf.archived:
            raise workflow_archived(wf.name)
        if req.idempotency_key:
            original = await self._idempotent(repo, out, item, wf, now)
            if original is not None:
                out.answers.append((item, original))
                return
        run = self._new_run(out, item, wf, now)
        if req.idempotency_key:
            out.idempotency.append({
                "project_id": wf.project_id, "workflow_id": wf.id, "key": req.idempotency_key,
                "request_hash": item.request_hash, "run_id": run.id, "expires_at": now + self.ttl})
        out.answers.append((item, run))

    async def _idempotent(self, repo: Repo, out: _Batch, item: _Pending, wf: WorkflowRecord,
                          now: datetime) -> RunRecord | str | None:
        """The original run of this key (a record, or an id to load), or None if it is new."""
        key = item.req.idempotency_key
        for rec in out.idempotency:  # an earlier request of this same batch
            if rec["workflow_id"] == wf.id and rec["key"] == key:
                if rec["request_hash"] != item.request_hash:
                    raise key_reused(key)
                return next(r for r in out.runs if r.id == rec["run_id"])
        hits = await repo.idempotency_hits(wf.project_id, wf.id, [key], now)
        if key not in hits:
            return None
        stored_hash, run_id = hits[key]
        if stored_hash != item.request_hash:
            raise key_reused(key)
        return run_id

    def _new_run(self, out: _Batch, item: _Pending, wf: WorkflowRecord, now: datetime) -> RunRecord:
        req, spec = item.req, wf.spec
        payload = apply_variables(spec, dict(req.payload))
        timeout = req.timeout_seconds or spec.timeout_seconds
        run = RunRecord(
            id=new_id(), project_id=wf.project_id, workflow_id=wf.id, workflow_name=wf.name,
            workflow_version=wf.version, workflow_version_id=wf.version_id, status=RunStatus.PENDING,
            created_at=now, updated_at=now, payload=payload, tags=dict(req.tags),
            triggered_by=req.run_as or item.caller.name, created_by=item.caller.name,
            max_parallel_steps=req.max_parallel_steps or spec.max_parallel_steps,
            entity_id=req.entity_id, idempotency_key=req.idempotency_key,
            expires_at=now + timedelta(seconds=timeout) if timeout else None,
        )
        canceled = req.check_conditions and spec.condition and not self._condition_holds(spec.condition, run)
        if canceled:
            run.status = RunStatus.CANCELED
            run.status_message = CONDITIONS_NOT_MET
            run.finished_at = now
        out.events += opening_events(run, now, run.triggered_by)
        out.runs.append(run)
        if canceled:
            return run
        run.wake_at = now
        steps = []
        for position, ref in enumerate(spec.topological_order()):
            s = spec.step(ref)
            steps.append(StepRecord(
                id=new_id(), workflow_run_id=run.id, project_id=run.project_id, position=position,
                step_ref=ref, workflow_step_id=f"{wf.version_id}/{ref}", kind=str(s.kind),
                status=StepStatus.PENDING, created_at=now, updated_at=now, queue=s.queue,
                deps_required=len(s.depends_on)))
        if not spec.max_concurrent_runs:
            # No concurrency slot to wait for: plan the new run right here, so it is written
            # already advanced (a chain of in-engine steps, finished) in this same transaction
            # instead of being read back and rewritten by the runner.
            out.events += advance(run, steps, spec, now).events
        out.steps += steps
        return run

    @staticmethod
    def _condition_holds(condition: str, run: RunRecord) -> bool:
        try:
            return evaluate_bool(condition, expression_context(run, []))
        except ExpressionError as e:
            raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "CONDITION_ERROR",
                                f"workflow condition could not be evaluated: {e}") from e


def _fail(item: _Pending, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)

