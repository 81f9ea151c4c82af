"""The run planner: given a run, its steps and its spec at `now`, decide every change the
engine can make right away, and when the run next needs looking at.

Pure and deterministic: the engine loads state under the run's lock, calls `advance`, and
saves the resulting `Changes`. What differs by step kind is read from its entry in
domain/kinds.py: in-engine kinds (noop, condition, delay, approval, input) run here, so a chain
of them finishes in one pass and one transaction; leased kinds are given a slot and announced;
child-run kinds are left to the runner. Every attempt, whoever starts it, begins in
`begin_attempt`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain import actors, fanout
from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.expressions import ExpressionError, evaluate_bool, render
from conveyor.domain.kinds import Attempt, Done, Failed, Spread, Start, Waiting, kind_of
from conveyor.domain.limits import Limits, document_problem
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.secrets import missing, redactor
from conveyor.domain.spec import StepSpec, WorkflowSpec
from conveyor.domain.states import (
    DONE_STEP,
    FINAL_RUN,
    SLOT_STEP,
    UNFINISHED_STEP,
    RunStatus,
    StepStatus,
)

CONDITION_FALSE = "condition false"
ENGINE = actors.ENGINE
OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
# Why a step failed after `max_losses` attempts in a row ended with no verdict.
LOST = "LOST"
DEFAULT_LIMITS = Limits()
PARENT_GONE = "parent step no longer waits for this run"


@dataclass
class Links:
    """What a pass knows of other runs (the runner loads it; reports and operations plan
    without it, and the run's next runner pass catches up)."""

    # Child runs of this run's running `workflow` steps, by step id, as loaded.
    children: dict[str, RunRecord] = field(default_factory=dict)
    # For a child run: whether its parent step still waits for it (running, with its id).
    parent_waits: bool = True
    # Events that arrived for its waiting wait_event steps, by step id, oldest first.
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

S = StepStatus
# Step statuses whose `due_at` is a deadline the planner fires: a delay or approval timeout
# while waiting, an attempt's timeout while running.
TIMED_STEP = frozenset({S.WAITING, S.RUNNING})


def expression_context(run: RunRecord, steps: list[StepRecord]) -> dict[str, Any]:
    """The variables CEL expressions and templates see: payload, steps.<ref>.output, run (a
    map's items are not among `steps`: their map's output holds theirs)."""
    return {
        "payload": run.payload,
        "steps": {s.step_ref: {"output": s.output or {}, "status": str(s.status)} for s in steps
                  if not s.parent_step_id},
        "run": {
            "id": run.id, "workflow_id": run.workflow_id, "workflow_name": run.workflow_name,
            "project_id": run.project_id, "tags": run.tags, "entity_id": run.entity_id,
            "triggered_by": run.triggered_by, "attempt_of": run.retry_of_run_id,
        },
    }


def step_context(run: RunRecord, steps: list[StepRecord], step: StepRecord) -> dict[str, Any]:
    """The context of one step's expressions: a map item's adds its `item` and `index`."""
    context = expression_context(run, steps)
    if not step.parent_step_id:
        return context
    parent = next(s for s in steps if s.id == step.parent_step_id)
    return fanout.item_context(context, parent, step)


class _Pass:
    """One planning pass over one run. Linear in steps: steps are kept in topological order, so
    one sweep settles a whole chain, and the expression context is built once and kept current."""

    def __init__(self, changes: Changes, steps: list[StepRecord], spec: WorkflowSpec, limits: Limits,
                 links: Links | None = None) -> None:
        self.c = changes
        self.links = links
        self.run = changes.run
        self.now = changes.now
        self.steps = steps
        self.by_ref = {s.step_ref: s for s in steps}
        self.by_id = {s.id: s for s in steps}
        self.spec = spec
        self.limits = limits
        self._context: dict[str, Any] | None = None

    def context(self) -> dict[str, Any]:
        if self._context is None:
            self._context = expression_context(self.run, self.steps)
        return self._context

    def context_of(self, step: StepRecord) -> dict[str, Any]:
        """The context of `step`'s own expressions (a map item's sees its item and index)."""
        if not step.parent_step_id:
            return self.context()
        return fanout.item_context(self.context(), self.by_id[step.parent_step_id], step)

    def items(self, map_step: StepRecord) -> list[StepRecord]:
        return [s for s in self.steps if s.parent_step_id == map_step.id]

    def moved(self, step: StepRecord) -> None:
        """Keep the expression context in step with a step that changed status or output."""
        if self._context is not None and not step.parent_step_id:
            self._context["steps"][step.step_ref] = {"output": step.output or {}, "status": str(step.status)}

    # -- the pass ---------------------------------------------------------------------------

    def advance(self, may_start: bool) -> None:
        run = self.run
        if run.status in FINAL_RUN:
            self.set_wake(None)  # nothing left to do: stop waking it
            return
        if run.expires_at is not None and self.now >= run.expires_at:
            self.finish_run(RunStatus.TIMED_OUT, "run timed out", "run deadline passed")
            return
        if self.links is not None and not self.links.parent_waits:
            # Its parent step was canceled, skipped, timed out or replayed: so is this run.
            self.finish_run(RunStatus.CANCELED, PARENT_GONE, "")
            return
        children = self.links.children if self.links is not None else {}
        arrivals = self.links.events if self.links is not None else {}
        # Deadlines and expired leases fire whatever the run is doing (a run resumed into
        # pending may still have an attempt running); so does a child run's end, and the
        # arrival of an event a step waits for.
        for step in self.steps:
            child = children.get(step.id) if step.status == S.RUNNING else None
            arrived = arrivals.get(step.id) if step.status == S.WAITING else None
            if child is not None and child.status in FINAL_RUN:
                self.child_ended(step, child)
            elif arrived and self.event_arrived(step, arrived):
                continue  # completed (or failed by its `match`) by an event it waited for
            elif step.status in TIMED_STEP and step.due_at is not None and step.due_at <= self.now:
                self.timer_due(step)
            elif step.lease_expires_at is not None and step.lease_expires_at <= self.now:
                # Its holder stopped heartbeating and never reported: no verdict, a loss.
                lose_step(self.c, step, self.spec.step(step.step_ref),
                          f"lease of {step.worker_id!r} expired with no report")
                self.moved(step)
        if run.status == RunStatus.PENDING:
            if run.start_at is not None and run.start_at > self.now:
                # Delayed (a trigger's start_at): nothing starts, and it waits for no slot, before then.
                self.set_wake(min(t for t in (run.start_at, self.next_timer(include_ready=False)) if t))
                return
            if not may_start:
                # Waiting for a concurrency slot: whoever frees one wakes this run (or its
                # deadline, or a step's).
                self.set_wake(self.next_timer(include_ready=False))
                return
            self.c.run_to(RunStatus.RUNNING)
        while self.sweep():
            pass
        self.settle()

    def sweep(self) -> bool:
        """Resolve and start steps in topological order; True if anything changed. A step's
        dependencies come before it, so they have settled by the time the sweep reaches it."""
        running = self.run.status == RunStatus.RUNNING
        limit = self.run.max_parallel_steps
        # A map holds no slot: its items do, at most its max_parallel at once.
        busy = sum(1 for s in self.steps if self.takes_slot(s))
        items_busy: dict[str, int] = {}
        for s in self.steps:
            if s.parent_step_id and self.takes_slot(s):
                items_busy[s.parent_step_id] = items_busy.get(s.parent_step_id, 0) + 1
        changed = False
        for step in self.steps:  # a map's spread appends its items: this sweep reaches them
            parent = self.by_id[step.parent_step_id] if step.parent_step_id else None
            if parent is not None and parent.status != S.RUNNING and step.status in UNFINISHED_STEP:
                # Its map failed, timed out, was skipped or completed: its items are not awaited.
                self.c.step_to(step, S.CANCELED, f"map {parent.step_ref} {parent.status}")
                changed = True
                continue
            if step.status == S.PENDING:
                changed |= self.resolve_pending(step)
            entry = kind_of(step.kind)
            if step.status == S.RUNNING and entry.start is Start.FAN_OUT:
                changed |= self.gather(step)
            if not running or step.status != S.QUEUED:
                continue
            if step.ready_at is None:
                if limit and busy >= limit:
                    continue
                if parent is not None and not fanout.room(
                        parent, self.spec.step(parent.step_ref).config, items_busy.get(parent.id, 0)):
                    continue
                # The step takes a slot now; it keeps it while backing off or awaiting a lease.
                step.ready_at = self.now
                self.c.touch_step(step)
                busy += 1
                if parent is not None:
                    items_busy[parent.id] = items_busy.get(parent.id, 0) + 1
                changed = True
            if step.ready_at > self.now:
                continue  # a retry backing off
            if entry.start is Start.LEASED:
                assert entry.wake is not None
                self.c.announce(step, entry.wake(step))  # its lease holder starts it
                continue
            if entry.start is Start.CHILD:
                continue  # the runner starts its child run (next_timer makes the run due now)
            self.start(step)
            changed = True
            if not self.takes_slot(step):
                busy -= 1  # finished at once (or failed into a backoff that keeps no slot)
                if parent is not None:
                    items_busy[parent.id] -= 1
        return changed

    def takes_slot(self, step: StepRecord) -> bool:
        """Whether `step` holds one of the run's slots (running, waiting, or given one)."""
        if step.status in SLOT_STEP:
            return kind_of(step.kind).start is not Start.FAN_OUT
        return self.holds_slot(step)

    def gather(self, map_step: StepRecord) -> bool:
        """End a running map whose items' ends decide it; True if it ended."""
        spec = self.spec.step(map_step.step_ref)
        outcome = fanout.gather(map_step, spec.config, self.items(map_step))
        if outcome is None:
            return False
        if isinstance(outcome, Done):
            self.complete(map_step, outcome.output)
        else:
            self.fail(map_step, spec, outcome.error)
        self.moved(map_step)
        return True

    def resolve_pending(self, step: StepRecord) -> bool:
        spec = self.spec.step(step.step_ref)
        deps = [self.by_ref[d] for d in spec.depends_on]
        done = sum(1 for d in deps if d.status in DONE_STEP)
        if done != step.deps_completed:
            step.deps_completed = done
            self.c.touch_step(step)
        if done < len(deps):
            return False
        if spec.when:
            try:
                go = evaluate_bool(spec.when, self.context(), limits=self.limits)
            except ExpressionError as e:
                # A `when` that cannot be evaluated fails its step alone, with the reason.
                step.error = f"when: {e}"
                self.c.step_to(step, S.FAILED, step.error, data={"error": step.error})
                self.moved(step)
                return True
            if not go:
                self.skip(step, CONDITION_FALSE)
                return True
        elif any(d.status == S.SKIPPED and d.skip_reason == CONDITION_FALSE for d in deps):
            self.skip(step, CONDITION_FALSE)
            return True
        self.c.step_to(step, S.QUEUED)
        self.moved(step)
        return True

    def skip(self, step: StepRecord, reason: str) -> None:
        step.skip_reason = reason
        self.c.step_to(step, S.SKIPPED, reason)
        self.moved(step)

    @staticmethod
    def holds_slot(step: StepRecord) -> bool:
        """A queued step given a slot (ready_at set) keeps it while backing off or awaiting a lease."""
        return step.status == S.QUEUED and step.ready_at is not None

    def start(self, step: StepRecord) -> None:
        """Run one attempt of an in-engine step: its kind's `run` says what came of it."""
        spec = self.spec.step(step.step_ref)
        begin_attempt(self.c, step, spec)
        entry = kind_of(step.kind)
        context = self.context_of(step)
        written = spec.config if entry.renders is None else {
            k: v for k, v in spec.config.items() if k in entry.renders}
        try:
            config = render(written, context, limits=self.limits) if written else {}
        except ExpressionError as e:
            self.fail(step, spec, f"template: {e}")
            return
        assert entry.run is not None  # every in-engine kind has one (tests/domain/test_kinds.py)
        outcome = entry.run(Attempt(config, spec, lambda: context, self.now, self.limits))
        if isinstance(outcome, Done):
            self.complete(step, outcome.output)
        elif isinstance(outcome, Failed):
            fail_step(self.c, step, spec, outcome.error, retryable=outcome.retryable, reason=outcome.reason)
        elif isinstance(outcome, Spread):
            self.spread(step, spec, config, outcome.items)
        else:
            self.wait(step, config, outcome)
        self.moved(step)

    def spread(self, map_step: StepRecord, spec: StepSpec, config: dict[str, Any], items: list[Any]) -> None:
        """A map's attempt began: its items become item steps (the sweep goes on to them); an
        empty list completes it at once."""
        map_step.input = config
        assert spec.item is not None
        added = fanout.spread(self.c, self.steps, map_step, spec.item, items)
        self.steps.extend(added)
        self.by_id.update((s.id, s) for s in added)
        self.by_ref.update((s.step_ref, s) for s in added)
        if not items:
            self.complete(map_step, {"items": [], "failed": []})

    def wait(self, step: StepRecord, config: dict[str, Any], waiting: Waiting) -> None:
        step.input = config
        if waiting.due_at is not None:
            step.due_at = waiting.due_at  # else the attempt's timeout, if any, bounds the wait
        self.c.step_to(step, S.WAITING, waiting.message, data=waiting.data)

    def timer_due(self, step: StepRecord) -> None:
        """A waiting step's timer (its kind's, or a timeout), or a running step's timeout, has
        passed."""
        spec = self.spec.step(step.step_ref)
        over = kind_of(step.kind).timer_output
        if over is not None and step.status == S.WAITING:
            self.complete(step, over(step))
        else:
            self.fail(step, spec, f"step timed out after {spec.timeout_seconds}s", S.TIMED_OUT)
        self.moved(step)

    def child_ended(self, step: StepRecord, child: RunRecord) -> None:
        """The child run a `workflow` step waits for ended: its output is the step's; any
        other end fails the attempt (retried per the step's policy)."""
        if child.status == RunStatus.COMPLETED:
            self.complete(step, child.output or {})
        else:
            why = child.error or child.status_message
            self.fail(step, self.spec.step(step.step_ref),
                      f"child run {child.id} {child.status}" + (f": {why}" if why else ""))
        self.moved(step)

    def event_arrived(self, step: StepRecord, arrived: list[dict[str, Any]]) -> bool:
        """Events arrived for a waiting step: True when one completed it (or its `match` failed
        it); False when it waits on."""
        judge = kind_of(step.kind).arrived
        assert judge is not None  # events are loaded only for kinds that wait for them
        outcome = judge(step, arrived, self.context, self.limits)
        if isinstance(outcome, Done):
            self.complete(step, outcome.output)
        elif isinstance(outcome, Failed):
            self.fail(step, self.spec.step(step.step_ref), outcome.error)
        else:
            return False
        self.moved(step)
        return True

    def complete(self, step: StepRecord, output: dict[str, Any]) -> None:
        complete_step(self.c, step, self.spec.step(step.step_ref), output, self.limits)

    def fail(self, step: StepRecord, spec: StepSpec, error: str, status: StepStatus = S.FAILED) -> None:
        fail_step(self.c, step, spec, error, status)

    # -- after the pass ---------------------------------------------------------------------

    def settle(self) -> None:
        """Finish the run when nothing is left to do, and set its next wake-up."""
        run = self.run
        if run.status in FINAL_RUN:
            return
        # A map's items decide their map (tolerated failures included); the run, its steps.
        steps = [s for s in self.steps if not s.parent_step_id]
        failed = [s for s in steps if s.status in (S.FAILED, S.TIMED_OUT)]
        if failed and run.status == RunStatus.RUNNING:
            first = failed[0]
            self.finish_run(RunStatus.FAILED, f"step {first.step_ref!r} {first.status}",
                            f"step {first.step_ref!r} {first.status}: {first.error}")
            return
        if run.status == RunStatus.RUNNING and not any(s.status in UNFINISHED_STEP for s in self.steps):
            if all(s.status in DONE_STEP for s in steps):
                self.set_output()
                self.c.run_to(RunStatus.COMPLETED, run.status_message)
            else:
                bad = next(s for s in steps if s.status not in DONE_STEP)
                self.finish_run(RunStatus.FAILED, f"step {bad.step_ref!r} {bad.status}",
                                f"step {bad.step_ref!r} {bad.status}")
            return
        self.set_wake(self.next_timer(include_ready=True))

    def next_timer(self, include_ready: bool) -> datetime | None:
        """When the run next needs a look: a step deadline, the run's deadline and, when the run
        may start steps, the end of a retry's backoff. (Leases are swept by their own index.)"""
        timers = [s.due_at for s in self.steps if s.status in TIMED_STEP and s.due_at]
        if include_ready:
            timers += [s.ready_at for s in self.steps
                       if s.status == S.QUEUED and s.ready_at and s.ready_at > self.now]
            if self.run.status == RunStatus.RUNNING and any(
                    s.status == S.QUEUED and kind_of(s.kind).start is Start.CHILD and s.ready_at
                    and s.ready_at <= self.now
                    for s in self.steps):
                timers.append(self.now)  # a child run to start: the runner does it
        if self.run.expires_at is not None:
            timers.append(self.run.expires_at)
        return min(timers) if timers else None

    def set_output(self) -> None:
        """The run's output: every completed step's output by ref, unless that is too large to
        keep on the run (its steps still hold every output)."""
        output = {s.step_ref: s.output or {} for s in self.steps
                  if s.status == S.COMPLETED and not s.parent_step_id}
        problem = document_problem(output, self.limits.max_json_depth + 1, self.limits.max_run_output_bytes)
        if problem is None:
            self.run.output = output
        else:
            self.run.output = None
            self.run.status_message = f"output not kept on the run ({problem}): read it from its steps"

    def finish_run(self, status: RunStatus, message: str, error: str) -> None:
        finish_run(self.c, self.steps, status, message, error)

    def set_wake(self, at: datetime | None) -> None:
        if self.run.wake_at != at:
            self.run.wake_at = at
            self.c.touch_run()


def complete_step(c: Changes, step: StepRecord, spec: StepSpec, output: dict[str, Any],
                  limits: Limits) -> None:
    """An attempt succeeded with `output`; an output that may not be stored fails the step
    instead (OUTPUT_TOO_LARGE, not retried: the same attempt would produce it again)."""
    problem = document_problem(output, limits.max_json_depth, limits.max_output_bytes)
    if problem is not None:
        fail_step(c, step, spec, f"{OUTPUT_TOO_LARGE}: step output is {problem}", retryable=False,
                  reason=OUTPUT_TOO_LARGE)
        return
    step.output = output
    c.step_to(step, S.COMPLETED, data={"attempt": step.attempt, "output": output})


def fail_step(c: Changes, step: StepRecord, spec: StepSpec, error: str,
              status: StepStatus = S.FAILED, retryable: bool = True, reason: str = "",
              retry_after: float = 0.0) -> None:
    """An attempt failed: queue the next attempt after its backoff (at least `retry_after`
    seconds when its executor asked for that), or fail the step for good (the planner then
    fails the run). `reason`, when given, is recorded in the event."""
    step.error = error
    step.loss_streak = 0  # a verdict: the losses before it were not in a row with the next ones
    failures = step.attempt - step.losses
    if retryable and spec.retry.has_attempts_left(failures):
        wait = max(spec.retry.backoff_seconds(failures), retry_after)
        step.ready_at = c.now + timedelta(seconds=wait)
        step.due_at = None
        c.step_to(step, S.QUEUED, f"attempt {step.attempt} {status}: {error}; retrying in {wait:g}s",
                  data={"attempt": step.attempt, "error": error, "retry_at": step.ready_at.isoformat()})
    else:
        data: dict[str, Any] = {"attempt": step.attempt, "error": error}
        if reason:
            data["reason"] = reason
        c.step_to(step, status, error, data=data)


def lose_step(c: Changes, step: StepRecord, spec: StepSpec, why: str) -> None:
    """A running attempt ended with no verdict of its executor (SPEC §4.3: its lease expired,
    its worker released it, its stream closed before delivery): offered again at once, spending
    no retry budget, unless it is the policy's `max_losses`-th loss in a row, which fails the
    step with reason LOST (a task that kills every worker taking it must not loop forever)."""
    step.losses += 1
    step.loss_streak += 1
    c.lost.append(step)
    if step.loss_streak >= spec.retry.max_losses:
        step.error = f"{LOST}: attempt {step.attempt} lost ({why}), {step.loss_streak} lost in a row"
        c.step_to(step, S.FAILED, step.error,
                  data={"attempt": step.attempt, "lost": why, "reason": LOST, "error": step.error})
        return
    step.error = f"attempt {step.attempt} lost: {why}"
    step.ready_at = c.now
    step.due_at = None
    c.step_to(step, S.QUEUED, f"{step.error}; offered again", data={"attempt": step.attempt, "lost": why})


def finish_run(c: Changes, steps: list[StepRecord], status: RunStatus, message: str, error: str) -> None:
    """End the run in a final `status` and cancel its unfinished steps (revoking leases)."""
    for s in steps:
        if s.status in UNFINISHED_STEP:
            c.step_to(s, S.CANCELED, f"run {status}")
    c.run.error = error
    c.run_to(status, message)


def start_leased(c: Changes, steps: list[StepRecord], step: StepRecord, spec: StepSpec, holder: str,
                 job_run_id: str, until: datetime, limits: Limits,
                 secrets: Mapping[str, str | None] | None = None) -> dict[str, Any] | None:
    """A lease holder starts an attempt of a leased step: attempt+1, the lease until `until`,
    the attempt's timeout, and the config rendered from its templates (a template that fails
    fails the attempt instead). `secrets`: the values of its project's secrets the step names
    (None: one this server cannot decrypt); one missing fails the attempt for good.

    Returns the rendered config for its executor, secrets and all, or None when the attempt
    failed. What is kept, the step's `input`, has every secret value masked (SPEC §11)."""
    step.worker_id = holder
    step.job_run_id = job_run_id
    step.lease_expires_at = until
    begin_attempt(c, step, spec, {"worker_id": holder})
    found = secrets or {}
    problem = missing(spec.secrets, found, c.run.project_id)
    if problem is not None:
        fail_step(c, step, spec, problem[1], retryable=False, reason=problem[0])
        return None
    redact = redactor(spec.secrets, found)
    try:
        context = step_context(c.run, steps, step)
        if spec.secrets:
            context["secrets"] = {name: found[name] for name in spec.secrets}
        config = render(spec.config, context, limits=limits) if spec.config else {}
    except ExpressionError as e:
        fail_step(c, step, spec, redact.text(f"template: {e}"))  # a failed lookup may quote a value
        return None
    step.input = redact(config)
    return config


def ready_children(run: RunRecord, steps: list[StepRecord], now: datetime) -> list[StepRecord]:
    """The `workflow` steps of a running run whose child run may start now."""
    if run.status != RunStatus.RUNNING:
        return []
    return [s for s in steps if s.status == S.QUEUED and kind_of(s.kind).start is Start.CHILD
            and s.ready_at is not None and s.ready_at <= now]


def child_config(c: Changes, steps: list[StepRecord], step: StepRecord, spec: StepSpec,
                 limits: Limits) -> dict[str, Any]:
    """A `workflow` step's config rendered from its templates (ExpressionError if one fails)."""
    return render(spec.config, step_context(c.run, steps, step), limits=limits) if spec.config else {}


def start_child(c: Changes, step: StepRecord, spec: StepSpec, child_id: str, config: dict[str, Any]) -> None:
    """A `workflow` step starts an attempt: its child run `child_id` is created in the same
    unit of work; the attempt's timeout bounds the wait for it."""
    step.job_run_id = child_id
    step.input = config
    begin_attempt(c, step, spec, {"job_run_id": child_id})


def begin_attempt(c: Changes, step: StepRecord, spec: StepSpec, data: dict[str, Any] | None = None) -> None:
    """Every attempt of every kind begins here: attempt+1, its slot's readiness spent, the last
    attempt's error cleared, the step's timeout as the attempt's deadline; then RUNNING, with
    the attempt (and `data`) in its event."""
    step.attempt += 1
    step.ready_at = None
    step.error = ""
    step.due_at = c.now + timedelta(seconds=spec.timeout_seconds) if spec.timeout_seconds else None
    c.step_to(step, S.RUNNING, data={"attempt": step.attempt, **(data or {})})


def check_lease(step: StepRecord, attempt: int, holder: str, now: datetime) -> None:
    """Refuse a report for anything but the live lease of this holder's attempt: a late (also
    one whose lease expired but is not swept yet), duplicate or foreign report changes nothing
    (LEASE_LOST)."""
    if step.status != S.RUNNING or step.attempt != attempt or step.worker_id != holder \
            or step.lease_expires_at is None or step.lease_expires_at <= now:
        raise ConveyorError(ErrorKind.FAILED_PRECONDITION, "LEASE_LOST",
                            f"task {step.id!r} attempt {attempt} is not leased by {holder!r} "
                            f"(the step is {step.status}, attempt {step.attempt})")


def fail_unplannable(c: Changes, steps: list[StepRecord], set_aside_seconds: float) -> None:
    """A run whose planning raised unexpectedly (a bug, not the run's own error): a live run is
    failed with a generic error and its unfinished steps canceled; a paused one, which cannot
    fail, is set aside and looked at again later. Only this run is affected."""
    run = c.run
    if run.status == RunStatus.PENDING:
        c.run_to(RunStatus.RUNNING)
    if run.status == RunStatus.RUNNING:
        finish_run(c, steps, RunStatus.FAILED, "internal error", "internal error while planning the run")
    elif run.status not in FINAL_RUN:
        run.wake_at = c.now + timedelta(seconds=set_aside_seconds)
        c.touch_run()


def advance(run: RunRecord, steps: list[StepRecord], spec: WorkflowSpec, now: datetime,
            may_start: bool = True, actor: str = ENGINE, limits: Limits = DEFAULT_LIMITS,
            links: Links | None = None) -> Changes:
    """Plan every change the engine can make to `run` now. `steps` are in position order;
    `may_start` says whether a pending run has a concurrency slot; `links` what is known of its
    child and parent runs. Mutates the records and returns the Changes to save."""
    changes = Changes(run, now, actor)
    plan(changes, steps, spec, may_start=may_start, limits=limits, links=links)
    return changes


def plan(changes: Changes, steps: list[StepRecord], spec: WorkflowSpec, *, may_start: bool = True,
         limits: Limits = DEFAULT_LIMITS, links: Links | None = None) -> None:
    """`advance` within an existing unit of work (a run being created, say)."""
    _Pass(changes, steps, spec, limits, links).advance(may_start)
