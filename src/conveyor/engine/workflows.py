"""Workflow definitions: create, read, list, new versions, archive.

A definition is validated by the domain's `parse_workflow` (every problem reported at once) and
stored as an immutable version; updating writes the next version and points the workflow at it,
so runs keep the version they started on. Archiving stops new runs; existing runs continue.

A workflow's schedule (engine/schedules.py fires it) is kept here: create computes its first
tick from now; an update that changes the cron or time zone computes it again from now (an
unchanged one keeps its tick, due or not), and one that removes the schedule clears it and its
pause; archiving clears it. Pause and resume change no version: pause clears the tick, resume
computes the next one after now (ticks while paused never fire). Both are idempotent, and
FAILED_PRECONDITION (NO_SCHEDULE) on a workflow without a schedule.

The event names a workflow's current definition lists in `on_events` are kept here too, in the
index a publish reads (engine/events.py): written on create, replaced on update, cleared on
archive, each in the transaction that changes the workflow.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Any

from conveyor.domain.access import TOKEN_PREFIX_LENGTH, WEBHOOK_TOKEN_PREFIX, new_token, token_hash
from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid, not_found
from conveyor.domain.families import WORKFLOW_LOOP
from conveyor.domain.limits import Limits
from conveyor.domain.operations import workflow_archived
from conveyor.domain.records import DEFAULT_PROJECT, Caller, Page, WorkflowRecord
from conveyor.domain.spec import Schedule, WorkflowSpec, parse_workflow
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.offload import Offload
from conveyor.engine.ports import Repo, Store
from conveyor.engine.schedules import next_tick

# Project ids travel in paths and filters: keep them to a safe, boring alphabet.
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def project_of(requested: str, caller: Caller) -> str:
    """The project a new resource goes into: the request's, else the caller's, else the default."""
    project = name_scope(requested, caller)
    if not _PROJECT.fullmatch(project):
        raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_PROJECT_ID",
                            "project_id must be 1-128 letters, digits, '_', '.' or '-'")
    if caller.project is not None and project != caller.project:
        raise ConveyorError(ErrorKind.PERMISSION_DENIED, "PROJECT_FORBIDDEN",
                            f"this key may not act in project {project!r}")
    return project


def name_scope(project_id: str, caller: Caller) -> str:
    """The project in which a workflow name is looked up (ids are global)."""
    return project_id or caller.project or DEFAULT_PROJECT


def first_tick(schedule: Schedule, now: datetime) -> datetime:
    """A schedule's next tick after `now`; INVALID_ARGUMENT for a cron that never matches."""
    try:
        return next_tick(schedule, now)
    except ValueError as e:
        raise invalid("the schedule never fires", [FieldViolation("schedule.cron", "matches no date")]) from e


class WorkflowService:
    """Use cases on workflow definitions."""

    def __init__(self, store: Store, clock: Clock, offload: Offload, limits: Limits) -> None:
        self.store = store
        self.clock = clock
        self.offload = offload
        self.limits = limits

    async def _parse(self, data: dict[str, Any]) -> WorkflowSpec:
        # Validating a large definition compiles every expression (up to ~0.5 s for 1,000 steps).
        return await self.offload.run(parse_workflow, data, self.limits)

    async def create(self, data: dict[str, Any], caller: Caller) -> WorkflowRecord:
        project = project_of(str(data.get("project_id") or ""), caller)
        spec = await self._parse(data)
        now = self.clock.now()
        wf = WorkflowRecord(id=new_id(), project_id=project, name=spec.name, version=1, version_id=new_id(),
                            spec=spec, created_by=caller.name, created_at=now, updated_at=now,
                            next_fire_at=first_tick(spec.schedule, now) if spec.schedule else None)
        async with self.store.write() as repo:
            await _check_no_loop(repo, wf)
            await repo.insert_workflow(wf, spec.max_concurrent_runs)
            if spec.on_events:
                await repo.set_event_listeners(wf.id, project, _listened(spec))
        return wf

    async def get(self, ident: str, project_id: str, caller: Caller, version: int = 0) -> WorkflowRecord:
        """The workflow at its current version, or (`version` > 0) at that stored version."""
        if version < 0:
            raise invalid("version must not be negative (0 is the current one)",
                          [FieldViolation("version", "is negative")], reason="INVALID_VERSION")
        async with self.store.read() as repo:
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller))
            if version in (0, wf.version):
                return wf
            older = await repo.workflow_version(wf, version)
        if older is None:
            raise not_found("workflow_version", f"{ident} version {version}")
        return _as_older(older)

    async def versions(self, ident: str, project_id: str, limit: int, token: str,
                       caller: Caller) -> Page[WorkflowRecord]:
        """A page of the workflow at each of its versions, newest first (as `get` answers each)."""
        async with self.store.read() as repo:
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller))
            page = await repo.list_workflow_versions(wf, limit, token)
        return Page([v if v.version == wf.version else _as_older(v) for v in page.items], page.next_token)

    async def list(self, project_id: str, limit: int, token: str, include_archived: bool,
                   caller: Caller) -> Page[WorkflowRecord]:
        scope = caller.project
        if project_id:
            if scope is not None and project_id != scope:
                return Page([], "")
            scope = project_id
        async with self.store.read() as repo:
            return await repo.list_workflows(scope, limit, token, include_archived)

    async def update(self, ident: str, data: dict[str, Any], caller: Caller) -> WorkflowRecord:
        """Write the next version. The name is the workflow's identity and cannot change."""
        spec = await self._parse(data)
        project = name_scope(str(data.get("project_id") or ""), caller)
        async with self.store.write() as repo:
            wf = await repo.find_workflow(ident, caller.project, project, lock=True)
            if spec.name != wf.name:
                raise ConveyorError(ErrorKind.INVALID_ARGUMENT, "WORKFLOW_NAME_IMMUTABLE",
                                    f"a workflow's name cannot change (it is {wf.name!r})")
            if wf.archived:
                raise workflow_archived(wf.name)
            now = self.clock.now()
            if spec.schedule is None:
                wf.next_fire_at, wf.schedule_paused = None, False
            elif spec.schedule != wf.spec.schedule and not wf.schedule_paused:
                wf.next_fire_at = first_tick(spec.schedule, now)
            wf.version += 1
            wf.version_id = new_id()
            wf.spec = spec
            wf.updated_at = now
            await _check_no_loop(repo, wf)
            await repo.insert_version(wf)
            await repo.set_current_version(wf)
            await repo.set_event_listeners(wf.id, wf.project_id, _listened(spec))
        return wf

    async def archive(self, ident: str, project_id: str, caller: Caller) -> None:
        """Archive: no new runs. Archiving an archived workflow is a no-op (DELETE is idempotent)."""
        async with self.store.write() as repo:
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller), lock=True)
            await repo.archive_workflow(wf.id, self.clock.now())
            await repo.set_event_listeners(wf.id, wf.project_id, ())

    async def pause_schedule(self, ident: str, project_id: str, caller: Caller) -> WorkflowRecord:
        """Stop the schedule from firing until resumed; the definition is unchanged."""
        return await self._set_paused(ident, project_id, caller, paused=True)

    async def resume_schedule(self, ident: str, project_id: str, caller: Caller) -> WorkflowRecord:
        """Let a paused schedule fire again from its first tick after now (no backlog)."""
        return await self._set_paused(ident, project_id, caller, paused=False)

    async def _set_paused(self, ident: str, project_id: str, caller: Caller, paused: bool) -> WorkflowRecord:
        async with self.store.write() as repo:
            # The row lock orders this with a schedule firing on another replica: one that is
            # firing it now commits first (and we then see its next tick replaced), or skips it.
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller), lock=True)
            if wf.archived:
                raise workflow_archived(wf.name)
            if wf.spec.schedule is None:
                raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "NO_SCHEDULE",
                                    f"workflow {wf.name!r} has no schedule")
            if wf.schedule_paused == paused:
                return wf
            now = self.clock.now()
            wf.schedule_paused = paused
            wf.next_fire_at = None if paused else first_tick(wf.spec.schedule, now)
            wf.updated_at = now
            await repo.set_schedule(wf.id, paused, wf.next_fire_at, now)
        return wf

    async def rotate_webhook(self, ident: str, project_id: str, caller: Caller) -> tuple[WorkflowRecord, str]:
        """Enable the workflow's webhook with a new token (the old one stops working at once);
        returns the workflow and the token, which is stored only as its hash."""
        token = new_token(WEBHOOK_TOKEN_PREFIX)
        async with self.store.write() as repo:
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller), lock=True)
            if wf.archived:
                raise workflow_archived(wf.name)
            now = self.clock.now()
            wf.webhook_enabled, wf.webhook_rotated_at = True, now
            wf.webhook_hint = token[:TOKEN_PREFIX_LENGTH]
            await repo.set_webhook(wf.id, token_hash(token), wf.webhook_hint, now)
        return wf, token

    async def disable_webhook(self, ident: str, project_id: str, caller: Caller) -> WorkflowRecord:
        async with self.store.write() as repo:
            wf = await repo.find_workflow(ident, caller.project, name_scope(project_id, caller), lock=True)
            await repo.set_webhook(wf.id, None, "", None)
        wf.webhook_enabled, wf.webhook_hint, wf.webhook_rotated_at = False, "", None
        return wf

    async def webhook_target(self, token: str) -> WorkflowRecord:
        """The workflow whose webhook token this is; NOT_FOUND for any other string (unknown,
        rotated away, disabled), the same answer whatever was sent."""
        digest = token_hash(token)
        async with self.store.read() as repo:
            wf = await repo.workflow_by_webhook(digest) if token.startswith(WEBHOOK_TOKEN_PREFIX) else None
        if wf is None:
            raise ConveyorError(ErrorKind.NOT_FOUND, "WEBHOOK_NOT_FOUND", "no webhook has this URL")
        return wf


def _listened(spec: WorkflowSpec) -> set[str]:
    """The event names a definition starts runs on."""
    return {t.name for t in spec.on_events}


def _as_older(wf: WorkflowRecord) -> WorkflowRecord:
    """The workflow at an older version: its definition, number and id as written then; the
    schedule's state and the webhook, which belong to the workflow as it runs now (its current
    definition), are left out rather than shown beside a definition they do not describe."""
    return dataclasses.replace(wf, next_fire_at=None, schedule_paused=False, webhook_enabled=False,
                               webhook_hint="", webhook_rotated_at=None)


# Definitions followed from a new one when looking for a loop (a deeper chain is checked when it
# runs, against the run's lineage).
_LOOP_SEARCH_LIMIT = 200


async def _check_no_loop(repo: Repo, wf: WorkflowRecord) -> None:
    """FAILED_PRECONDITION / WORKFLOW_LOOP when the definition would start itself, directly or
    through the workflows its `workflow` steps name (as their current versions say). Only what
    the definitions spell out is followed; templated names are checked at run time."""
    seen: set[str] = set()
    frontier = [(ident, [wf.name]) for ident in wf.spec.child_workflows]
    while frontier and len(seen) < _LOOP_SEARCH_LIMIT:
        ident, path = frontier.pop()
        if ident in (wf.id, wf.name):
            raise ConveyorError(ErrorKind.FAILED_PRECONDITION, WORKFLOW_LOOP,
                                f"workflow {wf.name!r} would start itself: {' -> '.join([*path, wf.name])}")
        try:
            child = await repo.find_workflow(ident, wf.project_id, wf.project_id)
        except ConveyorError:
            continue  # not there (yet): checked when a run starts it
        if child.id in seen:
            continue
        seen.add(child.id)
        frontier += [(nxt, [*path, child.name]) for nxt in child.spec.child_workflows]
