"""Events (SPEC §9): publishing one (once per id) and the runs it starts, and listing them.

A publish resolves the project, checks the event (domain/events.py), reads the workflows whose
current definition listens to its name (the `event_listeners` index that engine/workflows.py
keeps: never every definition), and builds, outside any transaction, one run per workflow whose
`on_events` matches (a `when` is CEL, evaluated on the offload thread). One write transaction
then records the event and inserts the runs through the one run-creation path
(engine/creation.py), after checking that none of those workflows changed meanwhile (else it is
built again from what the database now says).

At most one run per (workflow, event id), also across replicas and repeated publishes: the
event row's primary key is (project, id), and the runs are inserted only by the transaction that
inserted it. A second publish of the id (on PostgreSQL, on another replica at the same instant:
its insert waits for the first transaction and then meets its row) inserts nothing and answers
what the first one recorded, or ALREADY_EXISTS IDEMPOTENCY_KEY_REUSED for another body.

What goes wrong for one listening workflow stays with it: a `when` that fails to evaluate, a
payload its variables refuse, or a bug met building its run skips that workflow, and the event
records which and why (`skipped`); the others start.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain import actors
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.events import (
    MAX_LISTENERS,
    Event,
    Skipped,
    check_publish,
    id_reused,
    request_hash,
    starts,
)
from conveyor.domain.expressions import ExpressionError
from conveyor.domain.limits import Limits
from conveyor.domain.new_runs import NewRun
from conveyor.domain.records import Caller, Page, RunRecord, WorkflowRecord
from conveyor.domain.spec import apply_variables
from conveyor.domain.states import RunStatus
from conveyor.engine import creation
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner
from conveyor.engine.workflows import project_of

log = logging.getLogger(__name__)

# Who runs started by an event are triggered by (their created_by is the publisher).
EVENT = actors.EVENT
# Builds of one publish that meet a listening workflow changed since it was read.
_STALE_RETRIES = 3


class Events:
    """Publish and list events."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, limits: Limits) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.limits = limits

    async def publish(self, caller: Caller, project_id: str, name: str, key: str,
                      payload: dict[str, Any], ident: str) -> Event:
        """Record the event and start the runs it triggers; a repeated id answers the first publish."""
        project = project_of(project_id, caller)
        check_publish(name, key, payload, ident, self.limits)
        event = Event(project_id=project, id=ident or new_id(), name=name, key=key, payload=payload,
                      received_at=self.clock.now(), created_by=caller.name,
                      request_hash=request_hash(name, key, payload))
        for _ in range(_STALE_RETRIES):
            async with self.store.read() as repo:
                if ident and (earlier := await repo.get_event(project, ident)) is not None:
                    return _repeated(earlier, event)
                listening = [await repo.find_workflow(wf_id, project, project)
                             for wf_id in await repo.event_listeners(project, name, MAX_LISTENERS)]
            if any(wf.spec.evaluates or any(t.when for t in wf.spec.on_events) for wf in listening):
                built = await self.runner.offload.run(self._build_all, event, listening)
            else:
                built = self._build_all(event, listening)
            runs = [b for b in built if isinstance(b, NewRun)]
            skipped = tuple(b for b in built if isinstance(b, Skipped))
            recorded = replace(event, started=len(runs), skipped=skipped)
            async with self.store.write() as repo:
                current = await repo.current_versions(wf.id for wf in listening)
                if any(current.get(wf.id) != (wf.version_id, False) for wf in listening):
                    continue  # updated or archived since it was read: build again
                # The key's lock orders this with steps starting to wait for it: a wait
                # registered before is read here; one registered after finds the event.
                await repo.lock_event_key([(project, name, key)])
                waiting = await repo.waiting_runs(project, name, key, event.received_at)
                recorded = replace(recorded, resumed=len(waiting))
                if not await repo.insert_event(recorded):
                    earlier = await repo.get_event(project, recorded.id)
                    assert earlier is not None  # the row that refused the insert is there
                    return _repeated(earlier, event)
                await creation.insert(repo, runs, [])
                # The waiting runs look at it on their next pass, under their own locks.
                await repo.signal(waiting, event.received_at)
            self.runner.after_commit([n.changes for n in runs])
            if waiting:
                self.runner.nudge()
            return recorded
        raise ConveyorError(ErrorKind.ABORTED, "CONCURRENT_CHANGE",
                            "the workflows listening to this event kept changing; publish it again")

    async def list_events(self, caller: Caller, project_id: str, name: str, key: str, limit: int,
                          token: str) -> Page[Event]:
        """A page of the project's events, newest first (of one name and key when given). A key
        of another project sees none."""
        project = project_id or caller.project or ""
        if caller.project is not None and project != caller.project:
            return Page([], "")
        project = project_of(project, caller)  # its spelling checked (empty: the default project)
        async with self.store.read() as repo:
            return await repo.list_project_events(project, name, key, limit, token)

    def _build_all(self, event: Event, listening: list[WorkflowRecord]) -> list[NewRun | Skipped | None]:
        """Per listening workflow: its run, why it has none (Skipped), or None (no match)."""
        now = event.received_at
        built: list[NewRun | Skipped | None] = []
        for wf in listening:
            try:
                built.append(self._build(event, wf, now))
            except Exception:
                # A bug met by one workflow must not keep the others from starting.
                log.exception("event %s: building the run of workflow %s raised", event.id, wf.id)
                built.append(Skipped(wf.id, wf.name, "internal error building the run"))
        return built

    def _build(self, event: Event, wf: WorkflowRecord, now: datetime) -> NewRun | Skipped | None:
        spec = wf.spec
        try:
            if not starts(spec.on_events, event, self.limits):
                return None
        except ExpressionError as e:
            return Skipped(wf.id, wf.name, f"on_events when: {e.message}")
        try:
            payload = apply_variables(spec, dict(event.payload))
        except ConveyorError as e:
            problems = "; ".join(f"{v.field}: {v.description}" for v in e.violations) or e.message
            return Skipped(wf.id, wf.name, f"the payload does not fit the workflow's variables: {problems}")
        run = RunRecord(
            id=new_id(), project_id=wf.project_id, workflow_id=wf.id, workflow_name=wf.name,
            workflow_version=wf.version, workflow_version_id=wf.version_id, status=RunStatus.PENDING,
            created_at=now, updated_at=now, payload=payload, triggered_by=EVENT, created_by=event.created_by,
            max_parallel_steps=spec.max_parallel_steps, entity_id=event.key,
            expires_at=now + timedelta(seconds=spec.timeout_seconds) if spec.timeout_seconds else None)
        return creation.start_run(run, spec, EVENT, self.limits, capped=bool(spec.caps),
                                  message=f"started by event {event.name!r} ({event.id})",
                                  data={"event_id": event.id, "event_name": event.name,
                                        "event_key": event.key})


def _repeated(earlier: Event, event: Event) -> Event:
    """The answer to a publish of an id already recorded: the first answer, for the same body."""
    if earlier.request_hash != event.request_hash:
        raise id_reused(event.id)
    return earlier
