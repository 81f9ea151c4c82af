"""Child runs: what `workflow` steps need from the runner (SPEC §3, issue 6 item 4).

`links` loads, for a pass, what the planner must know of other runs: the child runs its running
`workflow` steps wait for (their end ends the step) and, for a child run, whether its parent step
still waits for it (if not, the child is canceled — so canceling a run cancels its children and
theirs). `start` starts the child runs of the `workflow` steps the planner made ready, inside the
runner's transaction: the child is inserted (one way to create runs: `creation.start_run`) and
the step marked running with its id in one commit, so a child starts exactly once.

Cross-run effects never lock the other run: a run that ends signals its parent, a step that stops
waiting signals its child (`Changes.signals`, stored as run_wakeups), and the other run's next
pass, under its own lock, reads what changed. A workflow may not start itself directly or
through an ancestor (WORKFLOW_LOOP, one membership test of the run's stored lineage) nor nest
deeper than the configured depth (NESTING_TOO_DEEP): domain/families.py's rules, which webhook
runs caused by a notification follow too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError
from conveyor.domain.expressions import ExpressionError
from conveyor.domain.families import lineage_of, refusal
from conveyor.domain.kinds import Start, kind_of
from conveyor.domain.limits import Limits, document_problem
from conveyor.domain.new_runs import NewRun
from conveyor.domain.planner import ENGINE, Links, child_config, fail_step, plan, ready_children, start_child
from conveyor.domain.records import RunRecord, StepRecord, WorkflowRecord
from conveyor.domain.spec import WorkflowSpec, apply_variables
from conveyor.domain.states import FINAL_RUN, RunStatus, StepStatus
from conveyor.engine import creation
from conveyor.engine.ids import new_id
from conveyor.engine.offload import Offload
from conveyor.engine.ports import Repo

CHILD_REFUSED = "CHILD_REFUSED"


async def links(repo: Repo, runs: Sequence[RunRecord],
                steps: dict[str, list[StepRecord]]) -> dict[str, Links]:
    """What each of these runs' pass must know of its child and parent runs (runs that have
    neither are left out)."""
    waiting = {s.job_run_id: s.id for r in runs for s in steps[r.id]
               if s.status == StepStatus.RUNNING and s.job_run_id and kind_of(s.kind).start is Start.CHILD}
    children = {c.id: c for c in await repo.get_runs(list(waiting), None)} if waiting else {}
    parent_step_ids = [r.parent_step_run_id for r in runs
                       if r.parent_step_run_id and r.status not in FINAL_RUN]
    parent_steps = await repo.get_steps(parent_step_ids) if parent_step_ids else {}
    out: dict[str, Links] = {}
    for run in runs:
        mine = {waiting[c]: children[c] for s in steps[run.id]
                if (c := s.job_run_id) in waiting and c in children}
        waits = True
        if run.parent_step_run_id and run.status not in FINAL_RUN:
            parent = parent_steps.get(run.parent_step_run_id)
            waits = parent is None or (parent.status == StepStatus.RUNNING and parent.job_run_id == run.id)
        if mine or not waits:
            out[run.id] = Links(children=mine, parent_waits=waits)
    return out


@dataclass
class _Wanted:
    """A ready `workflow` step of a planned unit, and what its config rendered to."""

    unit: Changes
    step: StepRecord
    config: dict[str, Any] | ExpressionError


async def start(repo: Repo, offload: Offload, units: Sequence[Changes], steps: dict[str, list[StepRecord]],
                specs: dict[str, WorkflowSpec], limits: Limits, max_depth: int,
                now: datetime) -> list[NewRun]:
    """Start the child runs of the ready `workflow` steps of these planned units, in the
    caller's transaction: returns the new runs, inserted; their parents' units are planned on
    (a child refused fails its step; one that ended at once ends it)."""
    ready = [(c, s) for c in units for s in ready_children(c.run, steps[c.run.id], now)]
    if not ready:
        return []

    def render() -> list[_Wanted]:
        out = []
        for c, s in ready:
            try:
                config: dict[str, Any] | ExpressionError = child_config(
                    c, steps[c.run.id], s, specs[c.run.workflow_version_id].step(s.step_ref), limits)
            except ExpressionError as e:
                config = e
            out.append(_Wanted(c, s, config))
        return out

    wanted = await offload.run(render)
    # The workflows they name, each looked up once, in the parent's project only.
    targets: dict[tuple[str, str], WorkflowRecord | ConveyorError] = {}
    for w in wanted:
        if isinstance(w.config, dict):
            key = (w.unit.run.project_id, str(w.config.get("workflow_id", "")))
            if key not in targets:
                try:
                    targets[key] = await repo.find_workflow(key[1], key[0], key[0])
                except ConveyorError as e:
                    targets[key] = e

    def build() -> list[NewRun]:
        news: list[NewRun] = []
        parents: dict[str, tuple[Changes, dict[str, RunRecord]]] = {}
        for w in wanted:
            c, step = w.unit, w.step
            spec = specs[c.run.workflow_version_id]
            ended = parents.setdefault(c.run.id, (c, {}))[1]
            target = targets.get((c.run.project_id, str(w.config.get("workflow_id", "")))) \
                if isinstance(w.config, dict) else None
            step_spec = spec.step(step.step_ref)
            if isinstance(w.config, ExpressionError):
                start_child(c, step, step_spec, "", {})  # an attempt, failed as any attempt's template
                fail_step(c, step, step_spec, f"template: {w.config}")
                continue
            refused = _refusal(c.run, w.config, target, max_depth)
            if refused is None:
                assert isinstance(target, WorkflowRecord)
                try:
                    payload = apply_variables(target.spec, dict(w.config.get("payload") or {}))
                except ConveyorError as e:
                    refused = CHILD_REFUSED, e.message
                else:
                    # Rendered from outputs, it may be larger than any trigger may send.
                    problem = document_problem(payload, limits.max_json_depth, limits.max_payload_bytes)
                    if problem is not None:
                        refused = CHILD_REFUSED, f"the child's payload is {problem}"
            if refused is not None:
                # Starting it again would be refused again: the attempt fails the step for good.
                reason, message = refused
                start_child(c, step, step_spec, "", w.config)
                fail_step(c, step, step_spec, f"{reason}: {message}", retryable=False, reason=reason)
                continue
            assert isinstance(target, WorkflowRecord)
            child = _child_run(c.run, step, target, payload, now)
            try:
                new = creation.start_run(child, target.spec, ENGINE, limits,
                                         capped=bool(target.spec.caps),
                                         message=f"started by step {step.step_ref!r} of run {c.run.id}",
                                         data={"parent_workflow_run_id": c.run.id,
                                               "parent_step_run_id": step.id})
            except ConveyorError as e:
                # The target's concurrency key does not render over this payload: the same
                # payload would fail again, so the step fails for good.
                start_child(c, step, step_spec, "", w.config)
                fail_step(c, step, step_spec, f"{e.reason}: {e.message}", retryable=False, reason=e.reason)
                continue
            start_child(c, step, step_spec, new.run.id, w.config)
            news.append(new)
            if new.run.status in FINAL_RUN:
                ended[step.id] = new.run  # it ended at once (noop steps, say): so does the step
        for c, ended in parents.values():
            plan(c, steps[c.run.id], specs[c.run.workflow_version_id], limits=limits,
                 links=Links(children=ended))
        return news

    news = await offload.run(build)
    await creation.insert(repo, news, [])
    return news


def _refusal(parent: RunRecord, config: dict[str, Any], target: WorkflowRecord | ConveyorError | None,
             max_depth: int) -> tuple[str, str] | None:
    """Why this child run may not start, as (reason, message); None when it may."""
    if isinstance(target, ConveyorError) or target is None:
        return CHILD_REFUSED, target.message if target is not None else "no workflow_id"
    if target.archived:
        return CHILD_REFUSED, f"workflow {target.name!r} is archived"
    if refused := refusal(lineage_of(parent), parent.depth, target.id, target.name, parent.id, max_depth,
                          "child runs"):
        return refused
    if not isinstance(config.get("payload", {}), dict):
        return CHILD_REFUSED, "config.payload must render to an object"
    return None


def _child_run(parent: RunRecord, step: StepRecord, target: WorkflowRecord, payload: dict[str, Any],
               now: datetime) -> RunRecord:
    """The child run's record: the parent's initiator, the target's current version and limits."""
    spec = target.spec
    return RunRecord(
        id=new_id(), project_id=target.project_id, workflow_id=target.id, workflow_name=target.name,
        workflow_version=target.version, workflow_version_id=target.version_id, status=RunStatus.PENDING,
        created_at=now, updated_at=now, payload=payload, triggered_by=parent.triggered_by,
        created_by=parent.created_by, max_parallel_steps=spec.max_parallel_steps,
        parent_workflow_run_id=parent.id, parent_step_run_id=step.id, depth=parent.depth + 1,
        root_run_id=parent.root_run_id or parent.id,
        lineage=[*lineage_of(parent), target.id], priority=parent.priority,
        expires_at=now + timedelta(seconds=spec.timeout_seconds) if spec.timeout_seconds else None)
