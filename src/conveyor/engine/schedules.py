"""Schedules: cron schedules that trigger runs (SPEC §3), and the loop that fires them.

A workflow whose definition has a `schedule` carries `next_fire_at`, its next tick in UTC (the
cron read in the schedule's IANA time zone, so "0 9 * * *" in Europe/Paris is 08:00 UTC in
winter and 07:00 UTC in summer). `next_fire_at` is set whenever a schedule may fire and NULL
otherwise (no schedule, paused, archived): `next_tick` computes it, the workflow use cases keep
it (create, update, archive, pause, resume), and `fire_due` moves it. Workflows stored before
schedules fired have a schedule but no `next_fire_at`: the loop gives them their first tick
after now when it starts (`adopt_unscheduled`).

`fire_due` takes due workflows in ONE write transaction per batch: each due workflow row is
locked (PostgreSQL: rows another replica holds are skipped; SQLite: the one writer), its run is
inserted, and `next_fire_at` moves to the first tick strictly after now. Run and advance commit
together, so a tick fires exactly once: with replicas racing (the loser skips the locked row, or
re-reads it after the winner's commit and finds it no longer due) and across a crash (nothing
of a batch that did not commit happened). Ticks missed while no server was up fire once, on the
first pass after start: the run is for the oldest missed tick, and the schedule then continues
after now.

A tick's run has `triggered_by` and `created_by` "schedule", the variables' defaults as payload,
and an opening event that names the tick (`data.scheduled_at`). What goes wrong for one workflow
stays with it: a schedule whose variables have no value (a required variable without default)
still records its tick, as a run created failed whose error names the missing variables; a bug
met while building one workflow's run is logged and that tick is skipped. A database error rolls
the whole batch back (nothing fired, nothing advanced) and the next pass tries again.

In the fall-back hour of a time zone a wall-clock time occurs twice; a cron naming it fires at
both instants. A time skipped by spring-forward fires at the first instant after the gap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from conveyor.domain import actors
from conveyor.domain.concurrency import INVALID_CONCURRENCY_KEY
from conveyor.domain.errors import ConveyorError
from conveyor.domain.limits import Limits
from conveyor.domain.new_runs import NewRun, open_run
from conveyor.domain.planner import finish_run
from conveyor.domain.records import RunRecord, WorkflowRecord
from conveyor.domain.spec import Schedule, apply_variables
from conveyor.domain.states import RunStatus
from conveyor.engine import creation
from conveyor.engine.background import Background, log_loop_failure
from conveyor.engine.clock import Clock
from conveyor.engine.ids import new_id
from conveyor.engine.ports import Store
from conveyor.engine.runner import Runner

log = logging.getLogger(__name__)

# Who runs fired by a schedule are triggered and created by (RunRecord, events' actor).
SCHEDULE = actors.SCHEDULE
# Due workflows fired per transaction (each a run insert; planned inside the transaction).
_BATCH = 64
# Shortest sleep of the loop: a schedule still due after a pass is held by another replica's
# transaction (its row was skipped), which will have fired it by the next look.
_MIN_WAIT_SECONDS = 0.05
# Status message of a tick's run that could not be given its variables.
NO_VARIABLES = "the schedule cannot fill in the workflow's variables"


def next_tick(schedule: Schedule, after: datetime) -> datetime:
    """The first tick of `schedule` strictly after `after`, in UTC. Raises croniter's
    CroniterBadDateError (a ValueError) for a cron that never matches (Feb 30)."""
    local = after.astimezone(ZoneInfo(schedule.timezone))
    tick: datetime = croniter(schedule.cron, local).get_next(datetime)
    return tick.astimezone(UTC)


class Schedules:
    """Fires due schedules; `start`/`stop` run the background loop (tests call `fire_due`)."""

    def __init__(self, store: Store, clock: Clock, runner: Runner, limits: Limits,
                 idle_seconds: float = 1.0, batch_size: int = _BATCH) -> None:
        self.store = store
        self.clock = clock
        self.runner = runner
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.batch_size = batch_size
        self._background = Background("conveyor-schedules", self._loop)

    async def fire_due(self) -> int:
        """Fire every schedule due at the clock's now, a batch per transaction; returns how many
        runs were created."""
        total = 0
        while True:
            fired, full = await self._fire_batch()
            total += fired
            if not full:
                return total

    async def _fire_batch(self) -> tuple[int, bool]:
        """One transaction: up to `batch_size` due workflows fired and advanced. Returns the
        runs created and whether the batch was full (more may be due)."""
        now = self.clock.now()
        async with self.store.write() as repo:
            # Locks the due workflow rows (see Repo.due_schedules): only this transaction fires
            # or advances them until it commits. It then only inserts new runs, so it never waits
            # for a run lock, and the runs-then-workflows lock order of the runner is kept.
            due = await repo.due_schedules(now, self.batch_size)
            if not due:
                return 0, False
            if any(wf.spec.evaluates for wf in due):
                # Planning may evaluate expressions: on the CPU thread, as the runner does.
                built = await self.runner.offload.run(self._build_all, due, now)
            else:
                built = self._build_all(due, now)
            runs = [new for new in built.values() if new is not None]
            await creation.insert(repo, runs, [])
            await repo.advance_schedules({wf.id: self._after(wf, now) for wf in due})
        # The runner, and the workers of the tasks these runs made ready, look at once.
        self.runner.after_commit([n.changes for n in runs])
        return len(runs), len(due) == self.batch_size

    def _build_all(self, due: list[WorkflowRecord], now: datetime) -> dict[str, NewRun | None]:
        """Each due workflow's run (None: its tick is skipped), by workflow id."""
        built: dict[str, NewRun | None] = {}
        for wf in due:
            try:
                built[wf.id] = self._build(wf, now)
            except Exception:
                # A bug met by one workflow must not stop the others' schedules: its tick is
                # skipped (the schedule still advances) and the traceback goes to the log.
                log.exception("schedule of workflow %s: building the run raised; tick skipped", wf.id)
                built[wf.id] = None
        return built

    def _build(self, wf: WorkflowRecord, now: datetime) -> NewRun:
        """The run of `wf`'s due tick: planned unless the workflow caps concurrent runs; created
        failed when the variables' defaults are not a valid payload."""
        spec, schedule, tick = wf.spec, wf.spec.schedule, wf.next_fire_at
        assert schedule is not None and tick is not None  # due_schedules selects only these
        message = f"scheduled for {tick.isoformat()} by cron {schedule.cron!r} ({schedule.timezone})"
        data = {"scheduled_at": tick.isoformat(), "cron": schedule.cron, "timezone": schedule.timezone}
        problem: ConveyorError | None = None
        try:
            payload = apply_variables(spec, {})
        except ConveyorError as e:
            payload, problem = {}, e
        run = RunRecord(
            id=new_id(), project_id=wf.project_id, workflow_id=wf.id, workflow_name=wf.name,
            workflow_version=wf.version, workflow_version_id=wf.version_id, status=RunStatus.PENDING,
            created_at=now, updated_at=now, payload=payload, triggered_by=SCHEDULE, created_by=SCHEDULE,
            max_parallel_steps=spec.max_parallel_steps,
            expires_at=now + timedelta(seconds=spec.timeout_seconds) if spec.timeout_seconds else None)
        if problem is None:
            try:
                return creation.start_run(run, spec, SCHEDULE, self.limits, capped=bool(spec.caps),
                                          message=message, data=data)
            except ConveyorError as e:
                if e.reason != INVALID_CONCURRENCY_KEY:
                    raise
                problem = e
        # The tick is recorded where scheduled runs are looked for, as a run that failed at once
        # (it holds no concurrency slot, so it needs no key: it is written already finished).
        new = open_run(run, dataclasses.replace(spec, concurrency=None), SCHEDULE, new_id, self.limits,
                       message=message, data=data)
        new.changes.run_to(RunStatus.RUNNING)
        finish_run(new.changes, new.steps, RunStatus.FAILED, NO_VARIABLES,
                   "; ".join(f"{v.field}: {v.description}" for v in problem.violations) or problem.message)
        return new

    async def adopt_unscheduled(self) -> int:
        """Give a first tick (after now) to live schedules that have none: workflows written
        before schedules fired. Returns how many got one. Run once when the loop starts."""
        now = self.clock.now()
        async with self.store.write() as repo:
            unset = await repo.unscheduled_workflows()
            ticks = {wf.id: self._after(wf, now) for wf in unset}
            await repo.advance_schedules(ticks)
        return sum(1 for at in ticks.values() if at is not None)

    @staticmethod
    def _after(wf: WorkflowRecord, now: datetime) -> datetime | None:
        """The tick after `now` (after a fire: so missed ticks fire once); None when there is none."""
        assert wf.spec.schedule is not None
        try:
            return next_tick(wf.spec.schedule, now)
        except ValueError:
            # A cron that matches no further date (create and update refuse one that never
            # matches; croniter searches a bounded number of years): the schedule ends.
            log.warning("schedule of workflow %s has no tick after %s; it stops", wf.id, now)
            return None

    # -- background loop ----------------------------------------------------------------------

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def _loop(self) -> None:
        # Sleeps until the earliest next_fire_at, but never longer than idle_seconds: that poll
        # is what notices schedules set by other replicas (or by requests) in the meantime.
        try:
            await self.adopt_unscheduled()
        except Exception:
            # They get their tick at the next start; every other schedule fires meanwhile.
            log.exception("giving schedules without a next tick their first one failed")
        while True:
            wait = self.idle_seconds
            try:
                await self.fire_due()
                async with self.store.read() as repo:
                    at = await repo.next_schedule_fire()
                if at is not None:
                    wait = min(wait, max(_MIN_WAIT_SECONDS, (at - self.clock.now()).total_seconds()))
            except Exception as e:
                # Database trouble or a bug: nothing of the failed batch happened; the next
                # pass tries again.
                log_loop_failure(log, "firing due schedules failed", e)
            await asyncio.sleep(wait)
