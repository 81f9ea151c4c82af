"""The run planner: given a run, its steps and its spec at `now`, decide every change the
engine can make right away, and when the run next needs looking at.

Pure and deterministic: the engine loads state under the run's lock, calls `advance`, and
saves the resulting `Changes`. In-engine kinds (noop, condition, delay) are executed here, so a
chain of them finishes in one pass and one transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.expressions import ExpressionError, evaluate, evaluate_bool, render
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.spec import StepKind, StepSpec, WorkflowSpec
from conveyor.domain.states import (
    DONE_STEP,
    FINAL_RUN,
    SLOT_STEP,
    UNFINISHED_STEP,
    RunStatus,
    StepStatus,
)

CONDITION_FALSE = "condition false"
ENGINE = "engine"

S = StepStatus


def expression_context(run: RunRecord, steps: list[StepRecord]) -> dict[str, Any]:
    """The variables CEL expressions and templates see: payload, steps.<ref>.output, run."""
    return {
        "payload": run.payload,
        "steps": {s.step_ref: {"output": s.output or {}, "status": str(s.status)} for s in steps},
        "run": {
            "id": run.id, "workflow_id": run.workflow_id, "workflow_name": run.workflow_name,
            "project_id": run.project_id, "tags": run.tags, "entity_id": run.entity_id,
            "triggered_by": run.triggered_by, "attempt_of": run.retry_of_run_id,
        },
    }


class _Pass:
    """One planning pass over one run."""

    def __init__(self, changes: Changes, steps: list[StepRecord], spec: WorkflowSpec) -> None:
        self.c = changes
        self.run = changes.run
        self.now = changes.now
        self.steps = steps
        self.by_ref = {s.step_ref: s for s in steps}
        self.spec = spec

    def context(self) -> dict[str, Any]:
        return expression_context(self.run, self.steps)

    # -- the pass ---------------------------------------------------------------------------

    def advance(self, may_start: bool) -> None:
        run = self.run
        if run.status in FINAL_RUN:
            self.set_wake(None)  # nothing left to do: stop waking it
            return
        if run.expires_at is not None and self.now >= run.expires_at:
            self.finish_run(RunStatus.TIMED_OUT, "run timed out", "run deadline passed")
            return
        if run.status == RunStatus.PENDING:
            if not may_start:
                # Waiting for a concurrency slot: whoever frees one wakes this run.
                self.set_wake(None)
                return
            self.c.run_to(RunStatus.RUNNING)
        while self.step_once():
            pass
        self.settle()

    def step_once(self) -> bool:
        """Apply every change possible on the current state; True if anything changed."""
        changed = False
        for step in self.steps:
            if step.status == S.PENDING:
                changed |= self.resolve_pending(step)
            elif step.status == S.WAITING and step.due_at is not None and step.due_at <= self.now:
                changed |= self.timer_due(step)
        if self.run.status == RunStatus.RUNNING:
            changed |= self.dispatch()
        return changed

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
                go = evaluate_bool(spec.when, self.context())
            except ExpressionError as e:
                self.c.step_to(step, S.FAILED, f"when: {e}")
                step.error = f"when: {e}"
                return True
            if not go:
                self.skip(step, CONDITION_FALSE)
                return True
        elif any(d.status == S.SKIPPED and d.skip_reason == CONDITION_FALSE for d in deps):
            self.skip(step, CONDITION_FALSE)
            return True
        self.c.step_to(step, S.QUEUED)
        return True

    def skip(self, step: StepRecord, reason: str) -> None:
        step.skip_reason = reason
        self.c.step_to(step, S.SKIPPED, reason)

    def dispatch(self) -> bool:
        """Give free parallelism slots to queued steps, oldest position first, and run the
        in-engine kinds at once."""
        limit = self.run.max_parallel_steps
        busy = sum(1 for s in self.steps if s.status in SLOT_STEP or self.holds_slot(s))
        changed = False
        for step in self.steps:
            if step.status != S.QUEUED:
                continue
            if step.ready_at is None:
                if limit and busy >= limit:
                    continue
                step.ready_at = self.now
                self.c.touch_step(step)
                busy += 1
                changed = True
            if step.ready_at > self.now or step.kind == StepKind.TASK:
                continue  # a retry backing off, or a task left for a worker to lease
            self.start(step)
            changed = True
        return changed

    @staticmethod
    def holds_slot(step: StepRecord) -> bool:
        """A queued step given a slot (ready_at set) keeps it while backing off or awaiting a worker."""
        return step.status == S.QUEUED and step.ready_at is not None

    def start(self, step: StepRecord) -> None:
        spec = self.spec.step(step.step_ref)
        step.attempt += 1
        step.ready_at = None
        step.error = ""
        self.c.step_to(step, S.RUNNING, data={"attempt": step.attempt})
        try:
            config = render(spec.config, self.context()) if spec.config else {}
        except ExpressionError as e:
            self.fail(step, spec, f"template: {e}")
            return
        kind = StepKind(step.kind)
        if kind == StepKind.NOOP:
            out = config.get("output", {})
            self.complete(step, out if isinstance(out, dict) else {"value": out})
        elif kind == StepKind.CONDITION:
            try:
                value = evaluate(str(spec.config["expression"]), self.context())
            except ExpressionError as e:
                self.fail(step, spec, f"expression: {e}")
                return
            self.complete(step, {"result": value})
        elif kind == StepKind.DELAY:
            until = self.delay_until(config)
            if until is None:
                self.fail(step, spec, "delay: `seconds` or `until` did not resolve to a time")
            elif until <= self.now:
                self.complete(step, {"until": until.isoformat()})
            else:
                step.due_at = until
                step.input = config
                self.c.step_to(step, S.WAITING, f"until {until.isoformat()}",
                               data={"until": until.isoformat()})
        elif kind in (StepKind.APPROVAL, StepKind.INPUT):
            step.input = config
            if spec.timeout_seconds:
                step.due_at = self.now + timedelta(seconds=spec.timeout_seconds)
            self.c.step_to(step, S.WAITING, str(config.get("message", "")))
        else:
            # task is leased by workers; http and workflow steps are executed outside the
            # planner by the engine's executors, which report back through the same Changes.
            step.input = config
            self.c.touch_step(step)

    def delay_until(self, config: dict[str, Any]) -> datetime | None:
        if "seconds" in config:
            try:
                return self.now + timedelta(seconds=float(config["seconds"]))
            except (TypeError, ValueError):
                return None
        try:
            until = datetime.fromisoformat(str(config.get("until", "")).replace("Z", "+00:00"))
        except ValueError:
            return None
        return until if until.tzinfo is not None else None

    def timer_due(self, step: StepRecord) -> bool:
        spec = self.spec.step(step.step_ref)
        if step.kind == StepKind.DELAY:
            self.complete(step, {"until": step.due_at.isoformat() if step.due_at else ""})
        else:
            self.fail(step, spec, f"step timed out after {spec.timeout_seconds}s", S.TIMED_OUT)
        return True

    def complete(self, step: StepRecord, output: dict[str, Any]) -> None:
        step.output = output
        self.c.step_to(step, S.COMPLETED, data={"output": output})

    def fail(self, step: StepRecord, spec: StepSpec, error: str, status: StepStatus = S.FAILED) -> None:
        fail_step(self.c, step, spec, error, status)

    # -- after the pass ---------------------------------------------------------------------

    def settle(self) -> None:
        """Finish the run when nothing is left to do, and set its next wake-up."""
        run = self.run
        if run.status in FINAL_RUN:
            return
        failed = [s for s in self.steps if s.status in (S.FAILED, S.TIMED_OUT)]
        if failed and run.status == RunStatus.RUNNING:
            first = failed[0]
            self.finish_run(RunStatus.FAILED, f"step {first.step_ref!r} {first.status}",
                            f"step {first.step_ref!r} {first.status}: {first.error}")
            return
        if run.status == RunStatus.RUNNING and not any(s.status in UNFINISHED_STEP for s in self.steps):
            if all(s.status in DONE_STEP for s in self.steps):
                run.output = {s.step_ref: s.output or {} for s in self.steps if s.status == S.COMPLETED}
                self.c.run_to(RunStatus.COMPLETED)
            else:
                bad = next(s for s in self.steps if s.status not in DONE_STEP)
                self.finish_run(RunStatus.FAILED, f"step {bad.step_ref!r} {bad.status}",
                                f"step {bad.step_ref!r} {bad.status}")
            return
        timers = [s.due_at for s in self.steps if s.status in (S.WAITING, S.RUNNING) and s.due_at]
        timers += [s.ready_at for s in self.steps
                   if s.status == S.QUEUED and s.ready_at and s.ready_at > self.now]
        if run.expires_at is not None:
            timers.append(run.expires_at)
        self.set_wake(min(timers) if timers else None)

    def finish_run(self, status: RunStatus, message: str, error: str) -> None:
        finish_run(self.c, self.steps, status, message, error)

    def set_wake(self, at: datetime | None) -> None:
        if self.run.wake_at != at:
            self.run.wake_at = at
            self.c.touch_run()


def fail_step(c: Changes, step: StepRecord, spec: StepSpec, error: str,
              status: StepStatus = S.FAILED, retryable: bool = True) -> None:
    """An attempt failed: queue the next attempt after its backoff, or fail the step for good
    (the planner then fails the run)."""
    step.error = error
    if retryable and spec.retry.has_attempts_left(step.attempt):
        wait = spec.retry.backoff_seconds(step.attempt)
        step.ready_at = c.now + timedelta(seconds=wait)
        step.due_at = None
        step.lease_expires_at = None
        c.step_to(step, S.QUEUED, f"attempt {step.attempt} {status}: {error}; retrying in {wait:g}s",
                  data={"attempt": step.attempt, "error": error, "retry_at": step.ready_at.isoformat()})
    else:
        c.step_to(step, status, error, data={"attempt": step.attempt, "error": error})


def finish_run(c: Changes, steps: list[StepRecord], status: RunStatus, message: str, error: str) -> None:
    """End the run in a final `status` and cancel its unfinished steps (revoking leases)."""
    for s in steps:
        if s.status in UNFINISHED_STEP:
            c.step_to(s, S.CANCELED, f"run {status}")
    c.run.error = error
    c.run_to(status, message)


def advance(run: RunRecord, steps: list[StepRecord], spec: WorkflowSpec, now: datetime,
            may_start: bool = True, actor: str = ENGINE) -> Changes:
    """Plan every change the engine can make to `run` now. `steps` are in position order;
    `may_start` says whether a pending run has a concurrency slot. Mutates the records and
    returns the Changes to save."""
    changes = Changes(run, now, actor)
    _Pass(changes, steps, spec).advance(may_start)
    return changes
