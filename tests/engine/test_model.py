"""A model test of the engine (issue 5, item 10): a hypothesis state machine drives a real Engine
on a real database with a ManualClock through workflow definitions, triggers, clock ticks (and
time passing before the runner looks), every run and step operation, worker leases of `task`
steps (acquire, heartbeat, complete, fail; late, duplicate and forged reports) and engine
restarts, and checks the invariants of SPEC §2-§4 after every rule, reading the database through
the public use cases only. `LeaseMachine` is the same model with the rules that matter least to
leases left out, so that its examples go deeper into a lease's life.

Invariants checked after every rule:

- events: every run's seq is 1..n with no gaps; replaying its `run.<status>` / `step.<status>`
  events, every consecutive change is legal per `conveyor.domain.states` (`can_run`/`can_step`),
  and the run's and each step's current status equal the status of their last event;
- no step moves to `running` while its run is not `running` (paused, pending or finished); the
  attempts a step's `step.running` events start only increase, and a lease's event names its
  holder (data `worker_id`, actor);
- a run enters `failed` only when one of its steps is `failed` or `timed_out` at that moment;
- run status agrees with its steps: a completed run has only completed/skipped steps; a failed,
  timed-out or canceled run has no pending/queued/running/waiting step; only a leased `task` step
  rests in `running`, and only in a running or paused run; `lease_expires_at` is set iff a step
  is running, and equals what its acquire or last heartbeat said; only approval, input and delay
  steps wait;
- after a tick: no `running` run is left with nothing unfinished, no pending step of a running
  run has all its dependencies done, no due delay or step timeout is left waiting in a running
  run, no active run is past its `expires_at`, no step runs past its lease or its timeout, and
  every attempt a tick ended that way is no longer running and has an event saying why;
- limits: `max_parallel_steps` (replayed from events) and `max_concurrent_runs` (at rest) are
  never exceeded; the engine never starts a step more than `retry.max_attempts` times, lost
  attempts (an expired lease: no verdict) not counted, without an operator retrying or
  replaying it;
- leases: acquire hands out only ready queued tasks of running runs, at most max_steps, each the
  step's next attempt, never the same (step, attempt) twice, live and stored as returned, and
  recorded as `step.running` by its holder; it leaves runs with nothing to lease untouched; a
  heartbeat, complete or fail is accepted only for the live lease of that holder's attempt and
  does what it says (a heartbeat moves only the lease; complete stores the output, or fails the
  step OUTPUT_TOO_LARGE; fail retries per policy unless not retryable), recorded with its
  attempt; any other report (an old or later attempt, another holder, a lease revoked by a
  cancel/skip/force-complete/replay/timeout or swept after expiry) is LEASE_LOST, an unknown
  task NOT_FOUND, and changes nothing;
- operations: an operation that SPEC §3 allows in the current state succeeds and does what the
  table says, and records at least one event by its caller; one it forbids raises ConveyorError
  FAILED_PRECONDITION/INVALID_TRANSITION (or NOT_FOUND) and changes nothing (every run, step and
  event compared before and after); idempotency keys answer the original run or
  IDEMPOTENCY_KEY_REUSED; a restart changes nothing that is stored.

Runs on SQLite by default and on PostgreSQL with CONVEYOR_TEST_DB=postgresql, with a fresh
database per example. CI uses a bounded number of examples; for a longer search set
CONVEYOR_MODEL_EXAMPLES (default 25) and CONVEYOR_MODEL_STEPS (rules per example, default 30),
e.g. `CONVEYOR_MODEL_EXAMPLES=500 .venv/bin/pytest tests/engine/test_model.py -q`.
`--hypothesis-seed=<int>` makes the search reproducible. A failure is shrunk to a minimal rule
sequence, which can take hypothesis up to ~5 minutes; CONVEYOR_MODEL_SHRINK=0 skips shrinking
(a quick look at an unshrunk failure). Failing examples are kept in hypothesis' example database
(.hypothesis/) and replayed first on the next run.

Engine bugs this test found are pinned by explicit regression tests at the end of this file; the
state machine tolerates none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, event, note, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, EventRecord, RunQuery, RunRecord, StepRecord, TriggerRequest
from conveyor.domain.states import RunStatus, StepStatus, can_run, can_step
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.migrate import migrate
from conveyor.storage.store import SqlStore
from tests.conftest import BACKEND, PG_ADMIN_DSN, PG_URL_PREFIX

T = TypeVar("T")
R, S = RunStatus, StepStatus

ME = Caller("model")
START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MISSING_RUN = "00000000-0000-7000-8000-000000000000"
MISSING_REF = "no_such_step"
IDEMPOTENCY_TTL = timedelta(hours=24)

MAX_EXAMPLES = int(os.environ.get("CONVEYOR_MODEL_EXAMPLES", "25"))
STEP_COUNT = int(os.environ.get("CONVEYOR_MODEL_STEPS", "30"))
SHRINK = os.environ.get("CONVEYOR_MODEL_SHRINK", "1") != "0"

ACTIVE = frozenset({R.PENDING, R.RUNNING, R.PAUSED})
FINAL = frozenset({R.COMPLETED, R.FAILED, R.TIMED_OUT, R.CANCELED})
UNFINISHED = frozenset({S.PENDING, S.QUEUED, S.RUNNING, S.WAITING})
DONE = frozenset({S.COMPLETED, S.SKIPPED})
RETRYABLE_STEP = frozenset({S.FAILED, S.TIMED_OUT, S.CANCELED})
WAITING_KINDS = frozenset({"approval", "input", "delay"})
RUN_STATUSES = {str(s): s for s in RunStatus}
STEP_STATUSES = {str(s): s for s in StepStatus}


# -- generated workflow definitions -------------------------------------------------------------

# `when` expressions; the first two fail at run time when the payload has no `flag` (issue 5).
WHENS = ["payload.flag", "!payload.flag", "payload.amount > 3", "has(payload.flag) && payload.flag",
         "payload.amount"]  # the last is not a bool
# Condition-step expressions; the last fails at run time (no such key): a failing attempt.
EXPRESSIONS = ["payload.amount > 5", "payload.go", "payload.missing > 1"]
# Task steps: one queue, a few workers. A task's config is rendered into its `input` when a
# lease starts an attempt; the last config fails to render (no such key): a failed attempt.
QUEUE = "q"
HOLDERS = ["w1", "w2"]
INTRUDER = "intruder"  # a holder that never acquired anything
# How a report claims its lease: as held (most often), or forged.
FORGES = st.sampled_from(["", "", "", "holder", "older", "newer", "unknown"])
LEASE_SECONDS = st.sampled_from([5, 30, 120])
OUTPUTS = st.sampled_from(["small", "empty", "deep"])  # deep: OUTPUT_TOO_LARGE
# What a worker does with a lease right after acquiring it.
WORK = st.sampled_from(["", "heartbeat", "complete", "complete", "fail", "fail_final", "complete_deep"])
TASK_CONFIGS: list[dict[str, Any]] = [{}, {"n": "{{ payload.amount }}"}, {"x": "{{ payload.missing }}"}]


@st.composite
def workflow_defs(draw: st.DrawFn, lead_task: bool = False) -> dict[str, Any]:
    """A workflow of 1-5 steps of every kind; with `lead_task` its first step is a task (so that
    most examples have work to lease from their first run on)."""
    n = draw(st.integers(1, 5))
    steps: list[dict[str, Any]] = []
    for i in range(n):
        ref = f"s{i}"
        step: dict[str, Any] = {"ref": ref}
        earlier = [s["ref"] for s in steps]
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2)) if earlier else []
        if deps:
            step["depends_on"] = deps
        kind = "task" if lead_task and i == 0 else \
            draw(st.sampled_from(["noop", "condition", "delay", "approval", "input", "task", "task"]))
        step["kind"] = kind
        if kind == "task":
            step["queue"] = QUEUE
            config = draw(st.sampled_from(TASK_CONFIGS))
            if config:
                step["config"] = config
            if draw(st.booleans()):
                step["timeout_seconds"] = draw(st.sampled_from([5, 60]))
        elif kind == "noop" and draw(st.booleans()):
            step["config"] = {"output": {"v": i}}
        elif kind == "condition":
            step["config"] = {"expression": draw(st.sampled_from(EXPRESSIONS))}
        elif kind == "delay":
            step["config"] = {"seconds": draw(st.sampled_from([1, 5, 30, 120]))}
        elif kind in ("approval", "input") and draw(st.booleans()):
            step["timeout_seconds"] = draw(st.sampled_from([5, 60]))
        cond_deps = [d for d in deps if next(s for s in steps if s["ref"] == d)["kind"] == "condition"]
        whens = WHENS + [f"steps.{d}.output.result == true" for d in cond_deps]
        when = None if lead_task and i == 0 else draw(st.none() | st.sampled_from(whens))
        if when:
            step["when"] = when
        if draw(st.booleans()):
            step["retry"] = {"max_attempts": draw(st.integers(1, 3)),
                             "initial_interval_seconds": draw(st.sampled_from([1, 5]))}
        steps.append(step)
    data: dict[str, Any] = {"steps": steps}
    for key, values in (("max_parallel_steps", [1, 2]), ("max_concurrent_runs", [1, 2]),
                        ("timeout_seconds", [20, 100, 600])):
        if draw(st.booleans()):
            data[key] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        data["condition"] = "payload.go == true"
    return data


def _nested(depth: int) -> dict[str, Any]:
    """An output nested deeper than max_json_depth: OUTPUT_TOO_LARGE."""
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out


payloads = st.fixed_dictionaries(
    {"go": st.booleans(), "amount": st.integers(0, 10)}, optional={"flag": st.booleans()})


# -- the model's memory ------------------------------------------------------------------------


@dataclass
class WorkflowModel:
    name: str
    data: dict[str, Any]
    capped: int  # max_concurrent_runs, 0 = none
    deps: dict[str, list[str]]
    kinds: dict[str, str]
    steps: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, name: str, data: dict[str, Any]) -> WorkflowModel:
        steps = {s["ref"]: s for s in data["steps"]}
        return cls(name, data, data.get("max_concurrent_runs", 0),
                   {r: list(s.get("depends_on", [])) for r, s in steps.items()},
                   {r: s["kind"] for r, s in steps.items()}, steps)

    def refs(self) -> list[str]:
        return list(self.steps)

    def descendants(self, ref: str) -> set[str]:
        out = {ref}
        changed = True
        while changed:
            changed = False
            for r, deps in self.deps.items():
                if r not in out and out.intersection(deps):
                    out.add(r)
                    changed = True
        return out

    def max_attempts(self, ref: str) -> int:
        return int(self.steps[ref].get("retry", {}).get("max_attempts", 1))


@dataclass
class RunModel:
    id: str
    workflow: str
    # Status and attempt of each step when the run was created (a run retry copies completed steps).
    initial: dict[str, StepStatus]
    # Attempt each step had when an operator last retried/replayed it: the engine alone may start
    # it at most max_attempts times after that.
    attempt_base: dict[str, int] = field(default_factory=dict)


@dataclass
class HeldLease:
    """One lease an acquire handed out, as the model knows it (`until` moves with heartbeats)."""

    run_id: str
    step_id: str
    ref: str
    attempt: int
    holder: str
    until: datetime


@dataclass
class View:
    """One run as read through the public API."""

    run: RunRecord
    steps: list[StepRecord]
    events: list[EventRecord]

    def step(self, ref: str) -> StepRecord | None:
        return next((s for s in self.steps if s.step_ref == ref), None)

    def step_by_id(self, step_id: str) -> StepRecord:
        return next(s for s in self.steps if s.id == step_id)


Snapshot = dict[str, View]


# -- databases ---------------------------------------------------------------------------------


# PostgreSQL: one migrated template database per test run; each example's database is a copy
# (CREATE DATABASE ... TEMPLATE), much cheaper than migrating a new one.
PG_TEMPLATE = {"name": ""}


async def new_database(tmp: str, template: str = "") -> tuple[str, str]:
    """A fresh migrated database: its URL and (PostgreSQL) its name."""
    if BACKEND == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp}/conveyor.db"
        await migrate(url)
        return url, ""
    name = f"conveyor_model_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    finally:
        await admin.close()
    url = PG_URL_PREFIX + name
    if not template:
        await migrate(url)
    return url, name


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def open_engine(url: str, clock: ManualClock) -> tuple[Database, Engine]:
    db = Database(url)
    return db, Engine(SqlStore(db), Settings(db_url=url), clock)


async def read_all(engine: Engine) -> Snapshot:
    """Every run with its steps and events, through the public use cases."""
    runs: list[RunRecord] = []
    token = ""
    while True:
        page = await engine.runs.list(RunQuery(), 1000, token, ME)
        runs += page.items
        if not (token := page.next_token):
            break
    out: Snapshot = {}
    for run in runs:
        steps: list[StepRecord] = []
        token = ""
        while True:
            spage = await engine.steps.list(run.id, 1000, token, ME)
            steps += spage.items
            if not (token := spage.next_token):
                break
        events: list[EventRecord] = []
        token = ""
        while True:
            epage = await engine.runs.events(run.id, 0, 1000, token, ME)
            events += epage.items
            if not (token := epage.next_token):
                break
        out[run.id] = View(run, steps, events)
    return out


def diff(before: Snapshot, after: Snapshot) -> str:
    """A short description of what differs between two snapshots."""
    lines = []
    for rid in sorted(set(before) | set(after)):
        b, a = before.get(rid), after.get(rid)
        if b is None or a is None:
            lines.append(f"run {rid}: {'appeared' if b is None else 'vanished'}")
            continue
        if b.run != a.run:
            lines.append(f"run {rid}: {b.run} -> {a.run}")
        if b.steps != a.steps:
            lines.append(f"run {rid} steps: {[(s.step_ref, s.status) for s in b.steps]} -> "
                         f"{[(s.step_ref, s.status) for s in a.steps]}")
        if b.events != a.events:
            new = [(e.seq, e.type, e.step_ref) for e in a.events[len(b.events):]]
            lines.append(f"run {rid} events: {len(b.events)} -> {len(a.events)}, new {new}")
    return "\n".join(lines)


# -- expectations from SPEC §3 -----------------------------------------------------------------
# True: must succeed; False: must be refused (INVALID_TRANSITION); None: SPEC leaves it open, either
# outcome is accepted (and then checked for consistency); "missing": must be NOT_FOUND.

Expect = bool | None | str


def expect_waiting_op(view: View, ref: str, kind: str) -> Expect:
    step = view.step(ref)
    if step is None:
        return "missing"
    if step.status != S.WAITING or step.kind != kind or view.run.status in FINAL:
        return False
    return True if view.run.status in (R.RUNNING, R.PAUSED) else None


def expect_skip(view: View, ref: str) -> Expect:
    step = view.step(ref)
    if step is None:
        return "missing"
    if step.status == S.COMPLETED:
        return False
    if step.status == S.SKIPPED:
        return None
    return True if view.run.status in ACTIVE else None


def expect_force_complete(view: View, ref: str) -> Expect:
    step = view.step(ref)
    if step is None:
        return "missing"
    if step.status == S.COMPLETED:
        return False
    return True if view.run.status in ACTIVE else None


def expect_step_retry(view: View, ref: str) -> Expect:
    step = view.step(ref)
    if step is None:
        return "missing"
    if step.status not in RETRYABLE_STEP:
        return False
    return None if view.run.status == R.PENDING else True


def expect_replay_subtree(view: View, ref: str) -> Expect:
    if view.step(ref) is None:
        return "missing"
    return view.run.status != R.PENDING


# Engine bugs this model found are pinned by regression tests at the end of this file (all fixed).
# A report of the live attempt after its lease's expiry, before the runner swept it, is refused.
LATE_REPORT: Expect = False


def expect_report(step: StepRecord, attempt: int, holder: str, now: datetime, heartbeat: bool) -> Expect:
    """A worker report (heartbeat, complete, fail) is accepted only for the live lease of this
    holder's attempt; anything else (an old attempt, another holder, a step no longer running
    because it was reported, canceled, skipped, replayed, timed out or its lease swept) is
    LEASE_LOST and changes nothing."""
    live = (step.status == S.RUNNING and step.attempt == attempt and step.worker_id == holder
            and step.lease_expires_at is not None)
    if not live:
        return False
    assert step.lease_expires_at is not None
    if step.lease_expires_at > now:
        return True
    return False if heartbeat else LATE_REPORT


# -- the state machine -------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    """Drives one Engine on one fresh database per example."""

    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.mkdtemp(prefix="conveyor-model-")
        self.url, self.pg_name = self.loop.run_until_complete(new_database(self.tmp, PG_TEMPLATE["name"]))
        self.clock = ManualClock(START)
        self.db, self.engine = open_engine(self.url, self.clock)
        self.workflows: dict[str, WorkflowModel] = {}
        self.models: dict[str, RunModel] = {}
        # (workflow, key) -> (request body, run id, when)
        self.keys: dict[tuple[str, str], tuple[Any, str, datetime]] = {}
        self.snap: Snapshot = {}
        self.ticked = False
        # Every lease ever handed out (late reports pick from these), every (step, attempt) ever
        # leased, and the snapshot taken just before the last tick.
        self.leases: list[HeldLease] = []
        self.acquired: dict[tuple[str, int], HeldLease] = {}
        self.pre_tick: Snapshot = {}
        self.lease_reports = 0  # reports accepted and ends of leases seen after a tick

    def teardown(self) -> None:
        # Steer the search (Phase.target) towards examples that put leases through more of their
        # life: handed out, reported on, expired.
        target(float(len(self.acquired) + self.lease_reports), label="lease activity")
        try:
            self.loop.run_until_complete(self._close())
            if self.pg_name:
                self.loop.run_until_complete(drop_database(self.pg_name))
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _close(self) -> None:
        try:
            await self.engine.stop()
        finally:
            await self.db.dispose()

    def call(self, aw: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await aw
        return self.loop.run_until_complete(wrap())

    def read(self) -> Snapshot:
        return self.call(read_all(self.engine))

    # -- definitions and triggers -----------------------------------------------------------

    def _create(self, data: dict[str, Any]) -> None:
        name = f"wf{len(self.workflows)}"
        self.call(self.engine.workflows.create({"name": name, **data}, ME))
        self.workflows[name] = WorkflowModel.of(name, data)

    @initialize(target=runs, data=workflow_defs(lead_task=True), payload=payloads)
    def first_workflow(self, data: dict[str, Any], payload: dict[str, Any]) -> Any:
        """Every example starts with a workflow whose first step is a task, and one run of it."""
        self._create(data)
        run = self.trigger(0, payload, None, False, False, 0, 0)
        self.tick(0)  # a run that waits for a concurrency slot starts
        return run

    @precondition(lambda self: len(self.workflows) < 3)
    @rule(data=workflow_defs())
    def create_workflow(self, data: dict[str, Any]) -> None:
        self._create(data)

    @precondition(lambda self: len(self.models) < 12)
    @rule(target=runs, wf=st.integers(0, 2), payload=payloads,
          key=st.none() | st.sampled_from(["k1", "k2"]), check_conditions=st.booleans(),
          immediate=st.booleans(), timeout=st.sampled_from([0, 0, 15, 200]),
          parallel=st.sampled_from([0, 0, 1]))
    def trigger(self, wf: int, payload: dict[str, Any], key: str | None, check_conditions: bool,
                immediate: bool, timeout: int, parallel: int) -> Any:
        names = sorted(self.workflows)
        model = self.workflows[names[wf % len(names)]]
        req = TriggerRequest(workflow_id=model.name, payload=payload, idempotency_key=key or "",
                             check_conditions=check_conditions, immediate=immediate,
                             timeout_seconds=timeout, max_parallel_steps=parallel)
        body = (payload, check_conditions, timeout, parallel)
        before = self.snap
        original = self.keys.get((model.name, key)) if key else None
        if original is not None and self.clock.now() - original[2] >= IDEMPOTENCY_TTL:
            original = None
        if original is not None and original[0] != body:
            with pytest.raises(ConveyorError) as e:
                self.call(self.engine.runs.trigger(req, ME))
            assert e.value.kind == ErrorKind.ALREADY_EXISTS and e.value.reason == "IDEMPOTENCY_KEY_REUSED"
            after = self.read()
            assert after == before, diff(before, after)
            return multiple()
        run = self.call(self.engine.runs.trigger(req, ME))
        note(f"triggered {model.name} -> {run.id} {run.status}")
        if original is not None:
            assert run.id == original[1], "the same idempotency key and body must answer the original run"
            return multiple()
        assert run.id not in self.models
        if key:
            self.keys[(model.name, key)] = (body, run.id, self.clock.now())
        skipped = check_conditions and "condition" in model.data and not payload["go"]
        if skipped:
            assert run.status == R.CANCELED and run.status_message == "conditions not met"
        initial = {} if skipped else dict.fromkeys(model.refs(), S.PENDING)
        self.models[run.id] = RunModel(run.id, model.name, initial, dict.fromkeys(model.refs(), 0))
        if skipped:
            steps = self.call(self.engine.steps.list(run.id, 100, "", ME)).items
            assert steps == [], "a run whose conditions are not met has no steps"
        return run.id

    # -- time ---------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from([0, 1, 2, 5, 10, 30, 61, 300]))
    def tick(self, seconds: int) -> None:
        self.pre_tick = self.snap
        self.clock.advance(seconds)
        # Engine.tick() passes until nothing is due; a run the runner keeps claiming without
        # settling it would make that loop forever, so the passes are counted here.
        for _ in range(20):
            if self.call(self.engine.runner.tick()) == 0:
                break
        else:
            raise AssertionError("the runner never goes idle: a run stays due after every pass\n"
                                 + diff(self.pre_tick, self.read()))
        self.ticked = True

    @rule(seconds=st.sampled_from([1, 5, 30, 61]))
    def wait(self, seconds: int) -> None:
        """Time passes before the runner looks (it is busy, or a replica is down): deadlines and
        leases are past but not yet swept, so operations and reports meet them first."""
        self.clock.advance(seconds)

    @rule()
    def restart(self) -> None:
        before = self.snap
        self.call(self._close())
        self.db, self.engine = open_engine(self.url, self.clock)
        after = self.read()
        assert after == before, "a restart must not change anything stored:\n" + diff(before, after)

    # -- operations -----------------------------------------------------------------------------

    def operate(self, run_id: str, what: str, call: Callable[[], Awaitable[T]],
                expect: Expect) -> tuple[bool, Any]:
        """Call an operation; check it succeeded or was refused as SPEC §3 expects, that a refusal
        changed nothing and that a success recorded an event by its caller."""
        before = self.snap
        try:
            result = self.call(call())
        except ConveyorError as e:
            note(f"{what} on {run_id}: refused {e}")
            assert expect is not True, f"{what} should be allowed here but was refused: {e}"
            if expect == "missing":
                assert e.kind == ErrorKind.NOT_FOUND, f"{what}: expected NOT_FOUND, got {e}"
            else:
                assert (e.kind, e.reason) in ((ErrorKind.FAILED_PRECONDITION, "INVALID_TRANSITION"),) or \
                    e.kind == ErrorKind.NOT_FOUND, f"{what}: unexpected error {e}"
            after = self.read()
            assert after == before, f"a refused {what} changed something:\n" + diff(before, after)
            self.snap = after
            return False, None
        note(f"{what} on {run_id}: ok -> {result!r}")
        assert expect is True or expect is None, f"{what} should have been refused (expected {expect!r})"
        after = self.read()
        self._operator_restarted(before[run_id], after[run_id])
        old = before[run_id].events
        new = after[run_id].events[len(old):]
        assert any(ev.actor == ME.name for ev in new), \
            f"{what} must be recorded as an event by its caller; new: {[(e.type, e.actor) for e in new]}"
        self.snap = after
        return True, result

    def _operator_restarted(self, before: View, after: View) -> None:
        """Steps an operation sent back to pending or queued (a retry, a replay, or a reopened run
        resetting the steps its end canceled) get a fresh attempt budget."""
        was = {s.step_ref: s.status for s in before.steps}
        for s in after.steps:
            if s.status in (S.PENDING, S.QUEUED) and was.get(s.step_ref) != s.status:
                self.models[after.run.id].attempt_base[s.step_ref] = s.attempt - s.losses

    def _view(self, run_id: str) -> View:
        return self.snap[run_id]

    def _wf(self, run_id: str) -> WorkflowModel:
        return self.workflows[self.models[run_id].workflow]

    def _reopened_ok(self, run_id: str, was: RunStatus) -> None:
        now = self.snap[run_id].run.status
        if was in FINAL:
            allowed = {R.RUNNING, R.PENDING} if self._wf(run_id).capped else {R.RUNNING}
            assert now in allowed, f"a step operation on a {was} run reopens it, not {now}"

    @rule(run=runs)
    def cancel(self, run: str) -> None:
        ok, _ = self.operate(run, "cancel", lambda: self.engine.runs.cancel(run, ME),
                             self._view(run).run.status in ACTIVE)
        if ok:
            assert self.snap[run].run.status == R.CANCELED

    @rule(run=runs)
    def pause(self, run: str) -> None:
        ok, _ = self.operate(run, "pause", lambda: self.engine.runs.pause(run, ME),
                             self._view(run).run.status in (R.PENDING, R.RUNNING))
        if ok:
            assert self.snap[run].run.status == R.PAUSED

    @rule(run=runs)
    def resume(self, run: str) -> None:
        ok, _ = self.operate(run, "resume", lambda: self.engine.runs.resume(run, ME),
                             self._view(run).run.status == R.PAUSED)
        if ok:
            allowed = {R.RUNNING, R.PENDING} if self._wf(run).capped else {R.RUNNING}
            assert self.snap[run].run.status in allowed

    @rule(target=runs, run=runs)
    def retry_run(self, run: str) -> Any:
        old = self._view(run)
        ok, new = self.operate(run, "retry run", lambda: self.engine.runs.retry(run, ME),
                               old.run.status in (R.FAILED, R.TIMED_OUT, R.CANCELED))
        if not ok:
            return multiple()
        # The new run may already have advanced in its own creating transaction.
        assert new.id != run and new.retry_of_run_id == run
        copied = {s.step_ref: s for s in self.snap[new.id].steps}
        assert set(copied) == set(self._wf(run).refs()), "the new run has every step of its version"
        initial: dict[str, StepStatus] = {}
        base: dict[str, int] = {}
        for ref, c in copied.items():
            s = old.step(ref)  # None when the old run never had steps (its conditions were not met)
            if s is not None and s.status == S.COMPLETED:
                assert c.status == S.COMPLETED and c.output == s.output, "completed steps are copied"
                initial[ref], base[ref] = S.COMPLETED, s.attempt
            else:
                # Runs again: born pending (its events, checked by the invariants, tell the rest).
                initial[ref], base[ref] = S.PENDING, 0
        self.models[new.id] = RunModel(new.id, self.models[run].workflow, initial, base)
        return new.id

    @rule(ids=st.lists(runs | st.just(MISSING_RUN), max_size=3), replay=st.booleans())
    def bulk(self, ids: list[str], replay: bool) -> None:
        before = self.snap
        distinct = list(dict.fromkeys(ids))
        allowed = FINAL if replay else ACTIVE
        ok_ids = [i for i in distinct if i in before and before[i].run.status in allowed]
        call = self.engine.runs.bulk_replay if replay else self.engine.runs.bulk_cancel
        done, failed = self.call(call(ids, ME))
        after = self.read()
        note(f"bulk {'replay' if replay else 'cancel'} {ids}: {done}, {failed}")
        assert (done, failed) == (len(ok_ids), len(distinct) - len(ok_ids))
        for i in distinct:
            if i not in before:
                continue
            if i in ok_ids:
                st_ = after[i].run.status
                if replay:
                    allowed_now = {R.RUNNING, R.PENDING} if self._wf(i).capped else {R.RUNNING}
                    assert st_ in allowed_now
                    assert all(s.status == S.PENDING for s in after[i].steps)
                    self.models[i].attempt_base = {s.step_ref: s.attempt - s.losses for s in after[i].steps}
                else:
                    assert st_ == R.CANCELED
                assert any(e.actor == ME.name for e in after[i].events[len(before[i].events):])
            else:
                assert after[i].steps == before[i].steps and after[i].events == before[i].events \
                    and after[i].run.status == before[i].run.status, f"a refused bulk op changed run {i}"
        self.snap = after

    @rule(op=st.sampled_from(["cancel", "pause", "resume", "retry", "approve", "skip"]))
    def on_missing_run(self, op: str) -> None:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "cancel": lambda: self.engine.runs.cancel(MISSING_RUN, ME),
            "pause": lambda: self.engine.runs.pause(MISSING_RUN, ME),
            "resume": lambda: self.engine.runs.resume(MISSING_RUN, ME),
            "retry": lambda: self.engine.runs.retry(MISSING_RUN, ME),
            "approve": lambda: self.engine.steps.approve(MISSING_RUN, "s0", "", ME),
            "skip": lambda: self.engine.steps.skip(MISSING_RUN, "s0", "", ME),
        }
        before = self.snap
        with pytest.raises(ConveyorError) as e:
            self.call(calls[op]())
        assert e.value.kind == ErrorKind.NOT_FOUND
        after = self.read()
        assert after == before, diff(before, after)

    def _ref(self, run: str, index: int) -> str:
        refs = self._wf(run).refs()
        return refs[index] if index < len(refs) else MISSING_REF

    @rule(run=runs, index=st.integers(0, 5), comment=st.sampled_from(["", "lgtm"]))
    def approve(self, run: str, index: int, comment: str) -> None:
        ref = self._ref(run, index)
        ok, _ = self.operate(run, f"approve {ref}", lambda: self.engine.steps.approve(run, ref, comment, ME),
                             expect_waiting_op(self._view(run), ref, "approval"))
        if ok:
            step = self.snap[run].step(ref)
            assert step is not None and step.status == S.COMPLETED and step.approved_by == ME.name

    @rule(run=runs, index=st.integers(0, 5), data=st.fixed_dictionaries({"answer": st.integers(0, 3)}))
    def submit_input(self, run: str, index: int, data: dict[str, Any]) -> None:
        ref = self._ref(run, index)
        ok, _ = self.operate(run, f"input {ref}", lambda: self.engine.steps.submit_input(run, ref, data, ME),
                             expect_waiting_op(self._view(run), ref, "input"))
        if ok:
            step = self.snap[run].step(ref)
            assert step is not None and step.status == S.COMPLETED and step.output == data

    @rule(run=runs, index=st.integers(0, 5), reason=st.sampled_from(["", "not needed", "condition false"]))
    def skip(self, run: str, index: int, reason: str) -> None:
        ref = self._ref(run, index)
        was = self._view(run).run.status
        ok, _ = self.operate(run, f"skip {ref}", lambda: self.engine.steps.skip(run, ref, reason, ME),
                             expect_skip(self._view(run), ref))
        if ok:
            step = self.snap[run].step(ref)
            assert step is not None and step.status == S.SKIPPED
            self._reopened_ok(run, was)

    @rule(run=runs, index=st.integers(0, 5))
    def force_complete(self, run: str, index: int) -> None:
        ref = self._ref(run, index)
        was = self._view(run).run.status
        result = {"forced": index}
        ok, _ = self.operate(run, f"force-complete {ref}",
                             lambda: self.engine.steps.force_complete(run, ref, result, ME),
                             expect_force_complete(self._view(run), ref))
        if ok:
            step = self.snap[run].step(ref)
            assert step is not None and step.status == S.COMPLETED and step.output == result
            self._reopened_ok(run, was)

    @rule(run=runs, index=st.integers(0, 5))
    def retry_step(self, run: str, index: int) -> None:
        ref = self._ref(run, index)
        was = self._view(run).run.status
        ok, step = self.operate(run, f"retry step {ref}", lambda: self.engine.steps.retry(run, ref, ME),
                                expect_step_retry(self._view(run), ref))
        if ok:
            assert step.status == S.QUEUED
            now = self.snap[run].step(ref)
            assert now is not None and now.status == S.QUEUED
            self._reopened_ok(run, was)

    @rule(run=runs, index=st.integers(0, 5))
    def replay_subtree(self, run: str, index: int) -> None:
        ref = self._ref(run, index)
        was = self._view(run).run.status
        ok, n = self.operate(run, f"replay subtree {ref}",
                             lambda: self.engine.steps.replay_subtree(run, ref, ME),
                             expect_replay_subtree(self._view(run), ref))
        if ok:
            subtree = self._wf(run).descendants(ref)
            assert n == len(subtree)
            for r in subtree:
                s = self.snap[run].step(r)
                assert s is not None and s.status == S.PENDING
            self._reopened_ok(run, was)

    # -- leases ---------------------------------------------------------------------------------

    @staticmethod
    def _leasable(snap: Snapshot, now: datetime) -> dict[str, StepRecord]:
        """Steps an acquire on QUEUE may start now: queued task steps of running runs whose slot
        is ready (given by the planner, not backing off)."""
        return {s.id: s for v in snap.values() if v.run.status == R.RUNNING for s in v.steps
                if s.kind == "task" and s.status == S.QUEUED and s.ready_at is not None and s.ready_at <= now}

    @rule(holder=st.sampled_from(HOLDERS), seconds=LEASE_SECONDS, most=st.sampled_from([1, 3]),
          then=st.lists(WORK, max_size=3))
    def acquire(self, holder: str, seconds: int, most: int, then: list[str]) -> None:
        """A worker polls; then it may report on what it got at once (one action per lease, in
        order): the common path of a worker, so that runs go on past their tasks."""
        before = self.snap
        now = self.clock.now()
        leasable = self._leasable(before, now)
        leases = self.call(self.engine.leases.acquire(QUEUE, holder, seconds, most, ME))
        after = self.read()
        self.snap = after
        note(f"acquire {holder} {seconds}s max {most}: {[(x.step.step_ref, x.step.attempt) for x in leases]} "
             f"of {len(leasable)} ready")
        event(f"acquire: {min(len(leases), 2)}+ leased" if leases else
              f"acquire: none ({'some' if leasable else 'nothing'} ready)")
        until = now + timedelta(seconds=seconds)
        assert len(leases) <= most, f"acquire(max_steps={most}) handed out {len(leases)} leases"
        for lease in leases:
            step, run_id = lease.step, lease.run.id
            assert step.id in leasable, \
                f"leased step {step.step_ref} of {run_id} was not ready in a running run"
            assert step.attempt == leasable[step.id].attempt + 1, "a lease starts the next attempt"
            key = (step.id, step.attempt)
            assert key not in self.acquired, f"step {step.step_ref} attempt {step.attempt} leased twice"
            held = HeldLease(run_id, step.id, step.step_ref, step.attempt, holder, until)
            self.acquired[key] = held
            self.leases.append(held)
            stored = after[run_id].step_by_id(step.id)
            assert (step.status, step.worker_id, step.lease_expires_at) == (S.RUNNING, holder, until), \
                f"acquire handed out a lease that is not live: {step}"
            assert (stored.status, stored.attempt, stored.worker_id, stored.lease_expires_at) == \
                (S.RUNNING, step.attempt, holder, until), \
                f"lease of {step.step_ref} (run {run_id}) is not what is stored: {stored}"
            new = after[run_id].events[len(before[run_id].events):]
            assert any(e.type == "step.running" and e.step_ref == step.step_ref and e.actor == holder
                       and (e.data or {}).get("attempt") == step.attempt
                       and (e.data or {}).get("worker_id") == holder for e in new), \
                f"the lease of {step.step_ref} is not recorded: {[(e.type, e.step_ref, e.data) for e in new]}"
        leased = {lease.step.id for lease in leases}
        started = {sid for sid, s in leasable.items()
                   if after[s.workflow_run_id].step_by_id(sid).attempt > s.attempt}
        assert leased <= started
        for sid in started - leased:
            # Started but not handed out: its config failed to render (a failed attempt), or the
            # acquire's own planning ended its run and the lease was revoked with it.
            s = leasable[sid]
            now_s = after[s.workflow_run_id].step_by_id(sid)
            revoked = now_s.status == S.CANCELED and after[s.workflow_run_id].run.status in FINAL
            assert now_s.attempt == s.attempt + 1 and (now_s.error.startswith("template:") or revoked), \
                f"step {s.step_ref} was started by an acquire without a lease: {now_s}"
        if len(leased) < most and started == leased:
            assert leased == set(leasable), \
                f"acquire(max_steps={most}) left ready steps: {set(leasable) - leased}"
        touched = {s.workflow_run_id for s in leasable.values()}
        # A run the acquire ended (its start failed for good) frees its concurrency slot: the
        # oldest pending run of its workflow is then made due now, and nothing else about it moves.
        freed = {after[rid].run.workflow_id for rid in touched
                 if before[rid].run.status == R.RUNNING and after[rid].run.status != R.RUNNING}
        for rid, view in before.items():
            if rid in touched:
                continue
            woken = view.run.status == R.PENDING and view.run.workflow_id in freed
            now = self.clock.now()
            expected = (replace(view, run=replace(view.run, wake_at=now))
                        if woken and after[rid].run.wake_at == now else view)
            assert after[rid] == expected, f"acquire changed run {rid} that had nothing to lease:\n" + \
                diff({rid: view}, {rid: after[rid]})
        for lease, action in zip(leases, then, strict=False):
            held = self.acquired[(lease.step.id, lease.step.attempt)]
            self.send(held, held.step_id, held.attempt, holder, action)

    def _report(self, what: str, call: Callable[[], Awaitable[T]], expect: Expect) -> tuple[bool, Any]:
        """Send one worker report; a refusal must be LEASE_LOST (NOT_FOUND for an unknown task)
        and change nothing."""
        before = self.snap
        try:
            result = self.call(call())
        except ConveyorError as e:
            note(f"{what}: refused {e}")
            event(f"{what.split()[0]}: refused ({e.reason}, expected {expect!r})")
            assert expect is not True, f"{what} should be accepted but was refused: {e}"
            if expect == "missing":
                assert e.kind == ErrorKind.NOT_FOUND, f"{what}: expected NOT_FOUND, got {e}"
            else:
                assert (e.kind, e.reason) == (ErrorKind.FAILED_PRECONDITION, "LEASE_LOST"), \
                    f"{what}: expected LEASE_LOST, got {e}"
            after = self.read()
            assert after == before, f"a refused {what} changed something:\n" + diff(before, after)
            self.snap = after
            return False, None
        note(f"{what}: accepted -> {result!r}")
        self.lease_reports += 1
        event(f"{what.split()[0]}: accepted (expected {expect!r})")
        assert expect is True or expect is None, f"{what} should have been refused (LEASE_LOST)"
        self.snap = self.read()
        return True, result

    def _forged(self, index: int, forge: str) -> tuple[HeldLease, str, int, str]:
        """A lease the model holds, and the (task id, attempt, holder) a report about it claims:
        its own, another holder's, an attempt before or after it, or a task that does not exist."""
        lease = self.leases[index % len(self.leases)]
        if forge == "unknown":
            return lease, MISSING_RUN, lease.attempt, lease.holder
        if forge == "holder":
            others = [h for h in [*HOLDERS, INTRUDER] if h != lease.holder]
            return lease, lease.step_id, lease.attempt, others[index % len(others)]
        return lease, lease.step_id, lease.attempt + {"": 0, "older": -1, "newer": 1}[forge], lease.holder

    def _expect(self, lease: HeldLease, task: str, attempt: int, holder: str, heartbeat: bool) -> Expect:
        if task == MISSING_RUN:
            return "missing"
        step = self.snap[lease.run_id].step_by_id(task)
        return expect_report(step, attempt, holder, self.clock.now(), heartbeat)

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 30), forge=FORGES, seconds=LEASE_SECONDS)
    def heartbeat(self, index: int, forge: str, seconds: int) -> None:
        self.send_heartbeat(*self._forged(index, forge), seconds)

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 30), forge=FORGES, output=OUTPUTS)
    def complete(self, index: int, forge: str, output: str) -> None:
        self.send_complete(*self._forged(index, forge), output)

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 30), forge=FORGES, retryable=st.booleans())
    def fail(self, index: int, forge: str, retryable: bool) -> None:
        self.send_fail(*self._forged(index, forge), retryable)

    def send(self, lease: HeldLease, task: str, attempt: int, holder: str, action: str) -> None:
        """One report named by a WORK action."""
        if action == "heartbeat":
            self.send_heartbeat(lease, task, attempt, holder, 30)
        elif action in ("complete", "complete_deep"):
            self.send_complete(lease, task, attempt, holder, "deep" if action == "complete_deep" else "small")
        elif action in ("fail", "fail_final"):
            self.send_fail(lease, task, attempt, holder, action == "fail")

    def send_heartbeat(self, lease: HeldLease, task: str, attempt: int, holder: str, seconds: int) -> None:
        before = self.snap
        step = before[lease.run_id].step_by_id(lease.step_id)
        now = self.clock.now()
        ok, until = self._report(
            f"heartbeat {lease.ref} attempt {attempt} by {holder}{' (unknown task)' * (task != step.id)}",
            lambda: self.engine.leases.heartbeat(task, attempt, holder, seconds, ME),
            self._expect(lease, task, attempt, holder, heartbeat=True))
        if not ok:
            return
        assert until == now + timedelta(seconds=seconds)
        self.acquired[(lease.step_id, attempt)].until = until
        after = self.snap
        # A heartbeat touches the step's lease and nothing else: no event, no other row.
        stored = after[lease.run_id].step_by_id(lease.step_id)
        assert stored.lease_expires_at == until
        mine = after[lease.run_id]
        moved = {**after, lease.run_id: View(mine.run, [
            replace(s, lease_expires_at=step.lease_expires_at, updated_at=step.updated_at)
            if s.id == step.id else s for s in mine.steps], mine.events)}
        assert moved == before, "a heartbeat changed more than its lease:\n" + diff(before, moved)

    def send_complete(self, lease: HeldLease, task: str, attempt: int, holder: str, output: str) -> None:
        before = self.snap
        result = {"small": {"by": holder, "attempt": attempt}, "empty": {}, "deep": _nested(30)}[output]
        ok, _ = self._report(
            f"complete {lease.ref} attempt {attempt} by {holder} ({output})"
            f"{' (unknown task)' * (task != lease.step_id)}",
            lambda: self.engine.leases.complete(task, attempt, holder, result, ME),
            self._expect(lease, task, attempt, holder, heartbeat=False))
        if not ok:
            return
        stored = self.snap[lease.run_id].step_by_id(lease.step_id)
        if output == "deep":
            assert stored.status == S.FAILED and stored.error.startswith("OUTPUT_TOO_LARGE"), stored
        else:
            assert stored.status == S.COMPLETED and stored.output == result, stored
        self._reported(before, lease.run_id, lease.ref, attempt, holder)

    def send_fail(self, lease: HeldLease, task: str, attempt: int, holder: str, retryable: bool) -> None:
        before = self.snap
        error = f"{holder} failed attempt {attempt}"
        ok, _ = self._report(
            f"fail {lease.ref} attempt {attempt} by {holder} (retryable={retryable})"
            f"{' (unknown task)' * (task != lease.step_id)}",
            lambda: self.engine.leases.fail(task, attempt, holder, error, retryable, ME),
            self._expect(lease, task, attempt, holder, heartbeat=False))
        if not ok:
            return
        view = self.snap[lease.run_id]
        stored = view.step_by_id(lease.step_id)
        again = retryable and attempt - stored.losses < self._wf(lease.run_id).max_attempts(lease.ref)
        expected = {S.QUEUED if again else S.FAILED}
        if view.run.status == R.TIMED_OUT:
            expected.add(S.CANCELED)  # the run's deadline had passed: planning it on ended it
        assert stored.status in expected and stored.error == error, \
            f"fail(retryable={retryable}) of attempt {attempt}: step is {stored.status} ({stored.error!r})"
        self._reported(before, lease.run_id, lease.ref, attempt, holder)

    def _reported(self, before: Snapshot, run_id: str, ref: str, attempt: int, holder: str) -> None:
        """An accepted report is recorded as an event of its step and attempt, naming the worker
        that sent it, and ends the lease."""
        new = self.snap[run_id].events[len(before[run_id].events):]
        assert any(e.step_ref == ref and e.actor == holder and (e.data or {}).get("attempt") == attempt
                   for e in new), \
            f"report on {ref} not recorded: {[(e.type, e.step_ref, e.data) for e in new]}"
        stored = self.snap[run_id].step(ref)
        assert stored is not None and stored.lease_expires_at is None

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        snap = self.read()
        self.snap = snap
        after_tick, self.ticked = self.ticked, False
        now = self.clock.now()
        assert set(snap) == set(self.models), "every run the model created, and no other"
        for view in snap.values():
            self.check_history(view)
            self.check_agreement(view, after_tick, now)
        if after_tick:
            self.check_swept(self.pre_tick, snap, now)
        for wf in self.workflows.values():
            if wf.capped:
                running = [v.run.id for v in snap.values() if v.run.workflow_name == wf.name
                           and v.run.status == R.RUNNING]
                assert len(running) <= wf.capped, \
                    f"max_concurrent_runs={wf.capped} of {wf.name} exceeded: running {running}"

    def check_history(self, view: View) -> None:
        run, model = view.run, self.models[view.run.id]
        wf = self.workflows[model.workflow]
        seqs = [e.seq for e in view.events]
        assert seqs == list(range(1, len(seqs) + 1)), f"run {run.id}: seq gaps {seqs}"
        status: RunStatus | None = None
        steps: dict[str, StepStatus] = dict(model.initial)
        started: dict[str, int] = {}  # the last attempt each step's events started
        limit = run.max_parallel_steps
        for ev in view.events:
            kind, _, suffix = ev.type.partition(".")
            if kind == "run" and suffix in RUN_STATUSES:
                new = RUN_STATUSES[suffix]
                if status is None:
                    # Born pending; or running when it starts in its trigger's own transaction
                    # (no intermediate event); or canceled when its conditions are not met.
                    assert ev.seq == 1 and new in (R.PENDING, R.RUNNING, R.CANCELED), \
                        f"run {run.id}: born {new} at seq {ev.seq}"
                else:
                    assert can_run(status, new), f"run {run.id}: illegal {status} -> {new} at seq {ev.seq}"
                if new == R.FAILED:
                    assert any(s in (S.FAILED, S.TIMED_OUT) for s in steps.values()), \
                        f"run {run.id} failed at seq {ev.seq} ({ev.message!r}) with no failed step: {steps}"
                status = new
            elif kind == "step" and suffix in STEP_STATUSES:
                assert ev.step_ref in steps, f"run {run.id}: event for unknown step {ev.step_ref!r}"
                prev, new_s = steps[ev.step_ref], STEP_STATUSES[suffix]
                assert can_step(prev, new_s), \
                    f"run {run.id}: step {ev.step_ref} illegal {prev} -> {new_s} at seq {ev.seq}"
                if new_s == S.RUNNING:
                    assert status == R.RUNNING, \
                        f"run {run.id}: step {ev.step_ref} started at seq {ev.seq} while the run was {status}"
                    attempt = (ev.data or {}).get("attempt")
                    assert isinstance(attempt, int) and attempt > started.get(ev.step_ref, 0), \
                        f"run {run.id}: step {ev.step_ref} started attempt {attempt} at seq {ev.seq} " \
                        f"after attempt {started.get(ev.step_ref)}"
                    started[ev.step_ref] = attempt
                    if wf.kinds[ev.step_ref] == "task":
                        holder = (ev.data or {}).get("worker_id")
                        assert holder and ev.actor == holder, \
                            f"run {run.id}: lease of {ev.step_ref} at seq {ev.seq} does not name its holder"
                steps[ev.step_ref] = new_s
                if limit:
                    busy = [r for r, s in steps.items() if s in (S.RUNNING, S.WAITING)]
                    assert len(busy) <= limit, \
                        f"run {run.id}: max_parallel_steps={limit} exceeded at seq {ev.seq}: {busy}"
        assert status == run.status, f"run {run.id} is {run.status} but its last run event says {status}"
        current = {s.step_ref: s.status for s in view.steps}
        assert current == steps, f"run {run.id}: step statuses {current} disagree with events {steps}"
        for s in view.steps:
            base = model.attempt_base.get(s.step_ref, 0)
            most = wf.max_attempts(s.step_ref)
            # Lost attempts (no verdict: a lease that expired) spend no retry (SPEC §4.3).
            assert s.attempt - s.losses - base <= most, \
                f"run {run.id}: step {s.step_ref} attempt {s.attempt} ({s.losses} lost) > max_attempts " \
                f"{most} (+{base})"

    def check_swept(self, before: Snapshot, after: Snapshot, now: datetime) -> None:
        """Every attempt that was running before a tick past its lease's expiry (or its timeout)
        no longer runs, and its end is recorded as an event of that step saying why."""
        for held in self.acquired.values():
            if held.run_id not in before:
                continue
            was = before[held.run_id].step_by_id(held.step_id)
            if (was.status, was.attempt) != (S.RUNNING, held.attempt):
                continue
            past = held.until <= now or (was.due_at is not None and was.due_at <= now)
            deadline = before[held.run_id].run.expires_at
            run_past = deadline is not None and deadline <= now
            if not (past or run_past):
                continue
            is_ = after[held.run_id].step_by_id(held.step_id)
            event(f"tick: ended a running attempt ({'lease' if held.until <= now else 'deadline'})")
            self.lease_reports += 1
            assert (is_.status, is_.attempt) != (S.RUNNING, held.attempt), \
                f"step {held.ref} of {held.run_id} attempt {held.attempt} still runs after a tick past " \
                f"its lease ({held.until}) / timeout ({was.due_at}) / run deadline"
            new = [e for e in after[held.run_id].events[len(before[held.run_id].events):]
                   if e.step_ref == held.ref]
            assert new and any(w in new[0].message for w in ("expired", "timed out", "timed_out")), \
                f"the end of {held.ref} attempt {held.attempt} is not recorded with why: " \
                f"{[(e.type, e.message) for e in new]}"

    def check_agreement(self, view: View, after_tick: bool, now: datetime) -> None:
        run = view.run
        wf = self.workflows[self.models[run.id].workflow]
        statuses = {s.step_ref: s.status for s in view.steps}
        if run.status == R.COMPLETED:
            assert all(s in DONE for s in statuses.values()), f"completed run {run.id} has {statuses}"
        if run.status in (R.FAILED, R.TIMED_OUT, R.CANCELED):
            assert not any(s in UNFINISHED for s in statuses.values()), \
                f"{run.status} run {run.id} has {statuses}"
        for s in view.steps:
            if s.status == S.RUNNING:
                # Only a leased attempt rests in running (in-engine kinds start and stop in one
                # pass), and only while its run may still hear from it.
                assert s.kind == "task", f"in-engine step {s.step_ref} of {run.id} rests in running"
                # (A paused run of a capped workflow resumes into pending, to wait for a slot,
                # while an attempt it leased before the pause runs on.)
                assert run.status in (R.RUNNING, R.PAUSED, R.PENDING), \
                    f"step {s.step_ref} of a {run.status} run {run.id} is running (leased by {s.worker_id!r})"
                held = self.acquired.get((s.id, s.attempt))
                assert held is not None and held.holder == s.worker_id, \
                    f"step {s.step_ref} of {run.id} runs attempt {s.attempt} for {s.worker_id!r}, " \
                    "which no acquire handed out"
                assert s.lease_expires_at == held.until, \
                    f"step {s.step_ref} of {run.id}: lease until {s.lease_expires_at}, " \
                    f"acquire/heartbeat said {held.until}"
            assert (s.lease_expires_at is not None) == (s.status == S.RUNNING), \
                f"step {s.step_ref} of {run.id} is {s.status} with lease_expires_at {s.lease_expires_at}"
            if s.status == S.WAITING:
                assert s.kind in WAITING_KINDS, f"a {s.kind} step waits"
        if not after_tick:
            return
        for s in view.steps:
            if s.status == S.RUNNING:
                assert s.lease_expires_at is not None and s.lease_expires_at > now, \
                    f"step {s.step_ref} of {run.id} still running after a tick past its lease " \
                    f"({s.lease_expires_at})"
                assert s.due_at is None or s.due_at > now, \
                    f"step {s.step_ref} of {run.id} still running after a tick past its timeout ({s.due_at})"
        if run.status in ACTIVE and run.expires_at is not None:
            assert run.expires_at > now, f"run {run.id} is {run.status} past its expires_at {run.expires_at}"
        if run.status != R.RUNNING:
            return
        assert any(s in UNFINISHED for s in statuses.values()), \
            f"run {run.id} stays running after a tick with nothing unfinished: {statuses}"
        for s in view.steps:
            spec = wf.steps[s.step_ref]
            if s.status == S.PENDING:
                assert not all(statuses[d] in DONE for d in wf.deps[s.step_ref]), \
                    f"run {run.id}: step {s.step_ref} still pending after a tick with its dependencies done"
            if s.status == S.WAITING and s.started_at is not None:
                config = spec.get("config", {})
                wait = config.get("seconds") if s.kind == "delay" else spec.get("timeout_seconds")
                if wait:
                    assert s.started_at + timedelta(seconds=wait) > now, \
                        f"run {run.id}: step {s.step_ref} still waiting after its {wait}s passed"


class LeaseMachine(EngineMachine):
    """The same model with the rules that matter least to leases left out (approvals, inputs, run
    retries, bulk operations, unknown runs) and every workflow led by a task, so that its examples
    spend their steps acquiring, reporting on and expiring leases, and operating on leased steps
    (cancel, pause/resume, skip, force-complete, step retry, replay) while they run."""

    approve = submit_input = retry_run = bulk = on_missing_run = None  # type: ignore[assignment]

    @precondition(lambda self: len(self.workflows) < 3)
    @rule(data=workflow_defs(lead_task=True))
    def create_workflow(self, data: dict[str, Any]) -> None:
        self._create(data)


def _settings() -> settings:
    phases = list(Phase) if SHRINK else [p for p in Phase if p != Phase.shrink]
    return settings(max_examples=MAX_EXAMPLES, stateful_step_count=STEP_COUNT, deadline=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def pg_template() -> Iterator[None]:
    """On PostgreSQL, the migrated template every example's database is copied from."""
    if BACKEND != "postgresql":
        yield
        return
    _, name = asyncio.run(new_database(""))
    PG_TEMPLATE["name"] = name
    try:
        yield
    finally:
        PG_TEMPLATE["name"] = ""
        asyncio.run(drop_database(name))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_model(pg_template: None) -> None:
    run_state_machine_as_test(EngineMachine, settings=_settings())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_engine_model_leases(pg_template: None) -> None:
    run_state_machine_as_test(LeaseMachine, settings=_settings())


# -- regression tests for what the model found -------------------------------------------------
# Each pins one engine bug the state machine found, in its smallest form, with the invariant it
# breaks. A bug still open is marked xfail(strict=True, reason=...): its fix makes the test pass,
# and strict then fails the suite until the mark is removed.


async def _events(engine: Engine, run_id: str) -> list[EventRecord]:
    return (await engine.runs.events(run_id, 0, 1000, "", ME)).items


async def _steps(engine: Engine, run_id: str) -> dict[str, StepRecord]:
    return {s.step_ref: s for s in (await engine.steps.list(run_id, 100, "", ME)).items}


async def _status(engine: Engine, run_id: str) -> RunStatus:
    return (await engine.runs.get(run_id, ME)).status


async def _running(engine: Engine, workflow: str) -> int:
    page = await engine.runs.list(RunQuery(workflow_ids=[workflow], statuses=[R.RUNNING]), 100, "", ME)
    return len(page.items)


def _check_history(view: View, initial: dict[str, StepStatus]) -> None:
    """The model's event checks on one run (seq, legal transitions, failed only with a failed step)."""
    seqs = [e.seq for e in view.events]
    assert seqs == list(range(1, len(seqs) + 1))
    status: RunStatus | None = None
    steps = dict(initial)
    for ev in view.events:
        kind, _, suffix = ev.type.partition(".")
        if kind == "run" and suffix in RUN_STATUSES:
            new = RUN_STATUSES[suffix]
            assert status is None or can_run(status, new), f"illegal {status} -> {new}"
            if new == R.FAILED:
                assert any(s in (S.FAILED, S.TIMED_OUT) for s in steps.values()), \
                    f"run failed at seq {ev.seq} ({ev.message!r}) with no failed step: {steps}"
            status = new
        elif kind == "step" and suffix in STEP_STATUSES:
            new_s = STEP_STATUSES[suffix]
            assert can_step(steps[ev.step_ref], new_s), f"illegal {steps[ev.step_ref]} -> {new_s}"
            steps[ev.step_ref] = new_s


async def _view(engine: Engine, run_id: str) -> View:
    return View(await engine.runs.get(run_id, ME), list((await _steps(engine, run_id)).values()),
                await _events(engine, run_id))


GATE_THEN_NOOP = {"steps": [{"ref": "g", "kind": "approval"},
                            {"ref": "n", "kind": "noop", "depends_on": ["g"]}]}


async def test_when_failing_at_run_time_fails_its_step_alone(engine: Engine) -> None:
    """Found by the model: `when: payload.flag` with the key absent made every runner pass raise
    (an illegal pending -> failed) so that no run advanced. Now the step fails with the reason,
    through legal transitions, and other runs still advance."""
    await engine.workflows.create({"name": "w", "max_concurrent_runs": 2, "steps": [
        {"ref": "a", "kind": "noop", "when": "payload.flag"}]}, ME)
    await engine.workflows.create({"name": "ok", "max_concurrent_runs": 2,
                                   "steps": [{"ref": "a", "kind": "noop"}]}, ME)
    bad = (await engine.runs.trigger(TriggerRequest("w", payload={}), ME)).id
    good = (await engine.runs.trigger(TriggerRequest("ok"), ME)).id
    await engine.tick()
    assert await _status(engine, good) == R.COMPLETED
    view = await _view(engine, bad)
    assert view.run.status == R.FAILED
    assert view.steps[0].status == S.FAILED and "when" in view.steps[0].error
    _check_history(view, {"a": S.PENDING})


async def test_skip_on_a_canceled_run_does_not_fail_it(engine: Engine) -> None:
    """Found by the model (and issue 5): skip on a step of a canceled run reopened it, its other
    step stayed canceled and the next pass failed the run. Invariant: a run enters `failed` only
    when one of its steps failed or timed out."""
    await engine.workflows.create({"name": "w", **GATE_THEN_NOOP}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    await engine.runs.cancel(run_id, ME)
    with contextlib.suppress(ConveyorError):  # refusing it is a fine answer too
        await engine.steps.skip(run_id, "g", "", ME)
    await engine.tick()
    _check_history(await _view(engine, run_id), {"g": S.PENDING, "n": S.PENDING})


async def test_force_complete_on_a_canceled_run_does_not_fail_it(engine: Engine) -> None:
    """Found by the model: as skip above, with force-complete."""
    await engine.workflows.create({"name": "w", **GATE_THEN_NOOP}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    await engine.runs.cancel(run_id, ME)
    with contextlib.suppress(ConveyorError):
        await engine.steps.force_complete(run_id, "g", {}, ME)
    await engine.tick()
    _check_history(await _view(engine, run_id), {"g": S.PENDING, "n": S.PENDING})


async def test_step_retry_on_a_canceled_run_does_not_fail_it(engine: Engine) -> None:
    """Found by the model: retrying one canceled step of a canceled run left its other canceled
    steps, so the reopened run failed with no failed step."""
    await engine.workflows.create({"name": "w", "steps": [
        {"ref": "a", "kind": "approval"}, {"ref": "b", "kind": "approval"}]}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    await engine.runs.cancel(run_id, ME)
    await engine.steps.retry(run_id, "a", ME)  # SPEC §3: allowed, the finished run is reopened
    await engine.tick()
    await engine.steps.approve(run_id, "a", "", ME)
    await engine.tick()
    _check_history(await _view(engine, run_id), {"a": S.PENDING, "b": S.PENDING})


async def test_bulk_replay_respects_max_concurrent_runs(engine: Engine) -> None:
    """Found by the model: bulk replay reopened a finished run to `running` with no free
    concurrency slot (SPEC §4.5: max_concurrent_runs is never exceeded)."""
    await engine.workflows.create({"name": "w", "max_concurrent_runs": 1, "steps": [
        {"ref": "g", "kind": "approval"}]}, ME)
    first = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    await engine.runs.cancel(first, ME)
    second = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    assert await _status(engine, second) == R.RUNNING
    assert await engine.runs.bulk_replay([first], ME) == (1, 0)
    assert await _running(engine, "w") <= 1
    await engine.tick()
    assert await _running(engine, "w") <= 1


async def test_step_retry_reopening_a_run_respects_max_concurrent_runs(engine: Engine) -> None:
    """Found by the model: a step operation reopened a finished run to `running` with no free
    concurrency slot."""
    await engine.workflows.create({"name": "w", "max_concurrent_runs": 1, "steps": [
        {"ref": "g", "kind": "approval"}]}, ME)
    first = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    await engine.runs.cancel(first, ME)
    await engine.runs.trigger(TriggerRequest("w"), ME)
    await engine.tick()
    await engine.steps.retry(first, "g", ME)
    assert await _running(engine, "w") <= 1
    await engine.tick()
    assert await _running(engine, "w") <= 1


async def test_pending_run_past_its_deadline_times_out(engine: Engine, clock: ManualClock) -> None:
    """SPEC §3: a run still going at expires_at is timed_out, also one waiting for a slot (an
    invariant of the model, pinned here because the runner does not wake slot-waiting runs)."""
    await engine.workflows.create({"name": "w", "max_concurrent_runs": 1, "steps": [
        {"ref": "g", "kind": "approval"}]}, ME)
    await engine.runs.trigger(TriggerRequest("w"), ME)
    late = (await engine.runs.trigger(TriggerRequest("w", timeout_seconds=10), ME)).id
    await engine.tick()
    assert await _status(engine, late) == R.PENDING
    clock.advance(11)
    await engine.tick()
    assert await _status(engine, late) == R.TIMED_OUT


async def test_replay_subtree_of_pending_steps_is_recorded(engine: Engine) -> None:
    """Found by the model: replay-subtree of steps that were all pending recorded no event
    (SPEC §3: every operation is recorded as a RunEvent with who did it)."""
    await engine.workflows.create({"name": "w", **GATE_THEN_NOOP}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    before = await _events(engine, run_id)
    assert await engine.steps.replay_subtree(run_id, "n", ME) == 1  # n is still pending
    new = (await _events(engine, run_id))[len(before):]
    assert any(e.actor == ME.name for e in new), new


async def test_retried_in_engine_attempts_record_legal_transitions(engine: Engine,
                                                                  clock: ManualClock) -> None:
    """Found by the model: since an in-engine attempt started and stopped in one transaction
    records only where it ended, a failed attempt with retries left goes queued -> queued in the
    history (and the next one queued -> failed). Invariant: consecutive statuses in the events
    are legal per `can_step`."""
    await engine.workflows.create({"name": "w", "steps": [
        {"ref": "c", "kind": "condition", "config": {"expression": "payload.missing > 1"},
         "retry": {"max_attempts": 3, "initial_interval_seconds": 1}}]}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    for _ in range(4):
        clock.advance(2)
        await engine.tick()
    view = await _view(engine, run_id)
    assert view.run.status == R.FAILED and view.steps[0].attempt == 3
    _check_history(view, {"c": S.PENDING})


TASK = {"steps": [{"ref": "t", "kind": "task", "queue": QUEUE}]}


async def test_acquire_hands_out_only_live_leases(engine: Engine, clock: ManualClock) -> None:
    """Found by the model, in two ways. (1) A run whose deadline passed before the runner looked
    at it: acquire leased its task, then planned the run, which timed it out and canceled the step.
    (2) A run with two ready tasks, the second with a config template that fails and no retries:
    acquire leased the first, failed the second's start for good, and planning then failed the
    run and canceled the first. Either way the Lease returned is revoked on arrival (its
    `expires_at` raises AssertionError) and an attempt is spent on nobody's work. Invariant: every
    lease acquire returns is live when it returns (the step running, that attempt, that holder)."""
    await engine.workflows.create({"name": "w", **TASK}, ME)
    late = (await engine.runs.trigger(TriggerRequest("w", timeout_seconds=10), ME)).id
    clock.advance(11)  # the runner has not looked yet
    await engine.workflows.create({"name": "two", "steps": [
        {"ref": "t", "kind": "task", "queue": QUEUE},
        {"ref": "bad", "kind": "task", "queue": QUEUE, "config": {"x": "{{ payload.missing }}"}}]}, ME)
    both = (await engine.runs.trigger(TriggerRequest("two"), ME)).id
    leases = await engine.leases.acquire(QUEUE, "w1", 30, 5, ME)
    for lease in leases:
        stored = (await _steps(engine, lease.run.id))[lease.step.step_ref]
        assert lease.step.status == S.RUNNING and lease.step.lease_expires_at is not None, lease.step
        assert (stored.status, stored.attempt) == (S.RUNNING, lease.step.attempt), stored
    assert await _status(engine, late) == R.TIMED_OUT
    assert await _status(engine, both) == R.FAILED


async def test_a_report_after_its_lease_expired_is_lease_lost(engine: Engine, clock: ManualClock) -> None:
    """Found by the model: once a lease has expired, a heartbeat answers LEASE_LOST ("the lease
    has expired"), yet complete (or fail) at the same instant is accepted as long as the runner
    has not swept the lease yet, so an expired attempt counts as a success (SPEC §4.3: an expired
    lease is a failed attempt; §4.2: a late completion is rejected). Invariant: a report is
    accepted only for a live lease, and a report and a heartbeat agree on what is live."""
    await engine.workflows.create({"name": "w", **TASK}, ME)
    run_id = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    (lease,) = await engine.leases.acquire(QUEUE, "w1", 5, 1, ME)
    clock.advance(6)  # expired; the runner has not swept it yet
    with pytest.raises(ConveyorError) as hb:
        await engine.leases.heartbeat(lease.step.id, 1, "w1", 5, ME)
    assert hb.value.reason == "LEASE_LOST"
    before = await _view(engine, run_id)
    with pytest.raises(ConveyorError) as late:
        await engine.leases.complete(lease.step.id, 1, "w1", {"late": True}, ME)
    assert late.value.reason == "LEASE_LOST"
    assert await _view(engine, run_id) == before


async def test_a_pending_run_sweeps_its_expired_lease(engine: Engine, clock: ManualClock) -> None:
    """Found by the model: a run of a workflow with max_concurrent_runs holds a lease, is paused
    (so it frees its slot), another run takes the slot, and the first is resumed: it goes back
    to `pending` with its task still `running`. When that lease expires, nothing fails the
    attempt: the planner does not look at a pending run's steps, and the runner claims the run
    (expired_lease_runs) on every pass, so Engine.tick() (run_until_idle) never returns and the
    background loop spins. Invariant: after a pass past a lease's expiry that attempt no longer
    runs, and the runner goes idle."""
    await engine.workflows.create({"name": "w", "max_concurrent_runs": 1, **TASK}, ME)
    first = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    (lease,) = await engine.leases.acquire(QUEUE, "w1", 5, 1, ME)
    await engine.runs.pause(first, ME)
    second = (await engine.runs.trigger(TriggerRequest("w"), ME)).id
    await engine.tick()
    assert await _status(engine, second) == R.RUNNING
    await engine.runs.resume(first, ME)
    await engine.tick()
    clock.advance(6)  # the lease of `first` expires
    passes = [await engine.runner.tick() for _ in range(5)]
    assert passes[-1] == 0, f"the runner claims a run on every pass: {passes}"
    step = (await _steps(engine, first))["t"]
    assert (step.status, step.attempt) != (S.RUNNING, lease.step.attempt), step
