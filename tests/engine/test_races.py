"""Two engines on one database racing each other (issue 5, item 1).

Each test runs two `Engine`s, each with its own `Database` (its own pool) on the same URL and one
shared ManualClock, and races them with asyncio.gather: runner passes against runner passes,
operator operations against runner passes, trigger batches against trigger batches and against
runner passes; one test runs two real OS processes, each ticking its own engine. Written for
PostgreSQL (CONVEYOR_TEST_DB=postgresql: row locks, SKIP LOCKED, fenced compare-and-set across
pools); on SQLite the same tests run with the writers serialized by the database lock.

What is checked is data, read back from the database after the race:

- every run's events have seq 1..n with no gap, and replaying its `run.<status>` /
  `step.<status>` events is legal per `conveyor.domain.states` (can_run / can_step) and ends in
  the stored statuses; the engine starts no step while the run is not running;
- each step completes exactly once (one `step.completed` event, attempt 1) when nothing retried it;
- `max_concurrent_runs` is never exceeded: from the events (runs between entering and leaving
  `running`) and, on PostgreSQL, by a deferred constraint trigger installed in the test database
  that records any commit leaving more running runs than the cap;
- every exception a caller sees is a ConveyorError of the kinds the operation may answer; a raw
  IntegrityError / DBAPIError / ConcurrentChange never escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from conveyor.domain.changes import Changes
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, EventRecord, RunRecord, StepRecord, TriggerRequest
from conveyor.domain.states import FINAL_RUN, RunStatus, StepStatus, can_run, can_step
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.repository import events_t, runs_t, steps_t, wf_t
from conveyor.storage.store import SqlStore

ME = Caller("operator")
ENGINE_ACTOR = "engine"
# Small batches, so the two runners' claims interleave over the same due runs.
BATCH = 16


# -- two engines ----------------------------------------------------------------------------------

class Pair:
    """Two engines, each with its own Database (pool) on one URL, sharing one ManualClock."""

    def __init__(self, url: str, clock: ManualClock, backend: str) -> None:
        self.url = url
        self.clock = clock
        self.backend = backend
        self.dbs = [Database(url), Database(url)]
        settings = Settings(db_url=url, engine_batch_size=BATCH, trigger_batch_size=64)
        self.a, self.b = (Engine(SqlStore(db), settings, clock) for db in self.dbs)

    @property
    def db(self) -> Database:
        return self.dbs[0]

    async def close(self) -> None:
        for eng in (self.a, self.b):
            await eng.stop()
        for db in self.dbs:
            await db.dispose()


async def _install_cap_audit(db: Database) -> None:
    """PostgreSQL: a deferred constraint trigger that, at each commit that leaves a run running,
    records the commit if its workflow then has more running runs than max_concurrent_runs.
    It runs while the committing transaction still holds its locks, so correct slot accounting
    never trips it; two transactions that each start a run past the cap do."""
    if db.dialect != "postgresql":
        return
    async with db.write() as conn:
        await conn.execute(text(
            "CREATE TABLE cap_violations (workflow_id text, running int, cap int, run_id text)"))
        await conn.execute(text("""
            CREATE FUNCTION audit_cap() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE cap int; n int;
            BEGIN
              SELECT max_concurrent_runs INTO cap FROM workflows WHERE id = NEW.workflow_id;
              IF cap > 0 THEN
                SELECT count(*) INTO n FROM workflow_runs
                 WHERE workflow_id = NEW.workflow_id AND status = 'running';
                IF n > cap THEN
                  INSERT INTO cap_violations VALUES (NEW.workflow_id, n, cap, NEW.id);
                END IF;
              END IF;
              RETURN NULL;
            END $$"""))
        await conn.execute(text("""
            CREATE CONSTRAINT TRIGGER audit_cap AFTER INSERT OR UPDATE ON workflow_runs
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.status = 'running')
            EXECUTE FUNCTION audit_cap()"""))


async def _cap_violations(db: Database) -> list[Any]:
    if db.dialect != "postgresql":
        return []
    async with db.read() as conn:
        return list((await conn.execute(text("SELECT * FROM cap_violations"))).all())


# -- calling the engines ---------------------------------------------------------------------------

class Outcomes:
    """What every call of a race answered: successes, clean domain errors, anything else."""

    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.clean: Counter[tuple[str, str, str]] = Counter()
        self.unexpected: list[tuple[str, BaseException]] = []

    async def call(self, label: str, aw: Awaitable[Any], allowed: set[ErrorKind]) -> Any:
        try:
            result = await aw
        except ConveyorError as e:
            if e.kind in allowed:
                self.clean[(label, e.kind.name, e.reason)] += 1
            else:
                self.unexpected.append((label, e))
            return None
        except Exception as e:
            self.unexpected.append((label, e))
            return None
        self.ok[label] += 1
        return result

    def check(self) -> None:
        assert not self.unexpected, "unexpected outcomes:\n" + "\n".join(
            f"  {label}: {type(e).__module__}.{type(e).__name__}: {e}" for label, e in self.unexpected[:20])


# A runner pass answers nothing to a client; anything escaping it is a failure.
NO_ERROR: set[ErrorKind] = set()
# An operation may lose to the state (or to a race) cleanly.
OPERATION_ERRORS = {ErrorKind.FAILED_PRECONDITION, ErrorKind.ABORTED, ErrorKind.NOT_FOUND}


async def _ticks(out: Outcomes, *engines: Engine) -> None:
    await asyncio.gather(*(out.call(f"tick {'AB'[i]}", eng.tick(), NO_ERROR)
                           for i, eng in enumerate(engines)))


# -- reading the database back -------------------------------------------------------------------

def noop(ref: str, *deps: str) -> dict[str, Any]:
    return {"ref": ref, "kind": "noop", "depends_on": list(deps)}


def delay(ref: str, seconds: float, *deps: str) -> dict[str, Any]:
    return {"ref": ref, "kind": "delay", "depends_on": list(deps), "config": {"seconds": seconds}}


async def _load_all(db: Database) -> tuple[dict[str, RunRecord], dict[str, list[StepRecord]],
                                           dict[str, list[EventRecord]], dict[str, int]]:
    """Every run, its steps (position order), its events (seq order), and each workflow's cap."""
    store = SqlStore(db)
    async with store.read() as repo:
        ids = [r for (r,) in (await repo.conn.execute(select(runs_t.c.id)))]
        runs = {r.id: r for r in await repo.get_runs(ids, None)}
        steps = await repo.steps_of(ids)
        events: dict[str, list[EventRecord]] = defaultdict(list)
        rows = await repo.conn.execute(
            select(events_t).order_by(events_t.c.workflow_run_id, events_t.c.seq))
        for m in rows.mappings():
            events[m["workflow_run_id"]].append(EventRecord(**{
                k: m[k] for k in ("workflow_run_id", "seq", "project_id", "type", "at", "step_ref",
                                  "status", "message", "data", "actor")}))
        caps = {r.id: r.max_concurrent_runs for r in await repo.conn.execute(
            select(wf_t.c.id, wf_t.c.max_concurrent_runs))}
    return runs, steps, events, caps


def _status_event(ev: EventRecord) -> tuple[str, str] | None:
    """("run", status) or ("step", status) when `ev` records a status change."""
    kind, _, name = ev.type.partition(".")
    if kind == "run" and name in RunStatus.__members__.values():
        return kind, name
    if kind == "step" and name in StepStatus.__members__.values():
        return kind, name
    return None


def check_history(run: RunRecord, steps: list[StepRecord], events: list[EventRecord]) -> list[str]:
    """Problems with one run's history: seq gaps, illegal transitions, a replay that does not end
    in the stored statuses, a step started by the engine while the run was not running, a
    finished run with unfinished steps."""
    problems = []
    seqs = [e.seq for e in events]
    if seqs != list(range(1, len(events) + 1)) or run.last_seq != len(events):
        problems.append(f"seq not 1..{run.last_seq}: {seqs}")
    run_status: RunStatus | None = None
    # A run retry starts from the completed steps of the run it retries: pending or completed.
    step_status: dict[str, set[StepStatus]] = {
        s.step_ref: ({StepStatus.PENDING, StepStatus.COMPLETED} if run.retry_of_run_id
                     else {StepStatus.PENDING}) for s in steps}
    for ev in events:
        change = _status_event(ev)
        if change is None:
            continue
        kind, name = change
        if kind == "run":
            to = RunStatus(name)
            if run_status is not None and not can_run(run_status, to):
                problems.append(f"seq {ev.seq}: run {run_status} -> {to}")
            run_status = to
            continue
        st = StepStatus(name)
        before = step_status.get(ev.step_ref)
        if before is None:
            problems.append(f"seq {ev.seq}: event for unknown step {ev.step_ref!r}")
            continue
        legal = {b for b in before if can_step(b, st)}
        if not legal:
            problems.append(f"seq {ev.seq}: step {ev.step_ref} {sorted(before)} -> {st}")
        started = (ev.actor == ENGINE_ACTOR and "attempt" in (ev.data or {})
                   and legal & {StepStatus.PENDING, StepStatus.QUEUED}
                   and st in (StepStatus.RUNNING, StepStatus.WAITING, StepStatus.COMPLETED))
        if started and run_status != RunStatus.RUNNING:
            problems.append(f"seq {ev.seq}: engine started step {ev.step_ref} in a {run_status} run")
        step_status[ev.step_ref] = {st}
    if run_status != run.status:
        problems.append(f"events end in run {run_status}, stored {run.status}")
    for s in steps:
        replayed = step_status[s.step_ref]
        if s.status not in replayed or (len(replayed) > 1 and s.status != StepStatus.COMPLETED
                                        and s.status != StepStatus.PENDING):
            problems.append(f"events end in step {s.step_ref} {sorted(replayed)}, stored {s.status}")
        if run.status in FINAL_RUN and s.status in (StepStatus.PENDING, StepStatus.QUEUED,
                                                    StepStatus.RUNNING, StepStatus.WAITING):
            problems.append(f"{run.status} run has {s.status} step {s.step_ref}")
    return problems


def running_intervals(events: list[EventRecord]) -> list[tuple[datetime, datetime | None]]:
    """When the run held a concurrency slot: from entering `running` to leaving it."""
    out: list[tuple[datetime, datetime | None]] = []
    since: datetime | None = None
    for ev in events:
        change = _status_event(ev)
        if change is None or change[0] != "run":
            continue
        if change[1] == RunStatus.RUNNING and since is None:
            since = ev.at
        elif change[1] != RunStatus.RUNNING and since is not None:
            out.append((since, ev.at))
            since = None
    if since is not None:
        out.append((since, None))
    return out


def cap_excess(runs: dict[str, RunRecord], events: dict[str, list[EventRecord]],
               caps: dict[str, int]) -> list[str]:
    """Times at which a capped workflow had more runs in `running` than its cap, from events
    (half-open intervals: a run leaving at t and another entering at t do not overlap)."""
    problems = []
    by_wf: dict[str, list[tuple[datetime, datetime | None]]] = defaultdict(list)
    for run in runs.values():
        if caps.get(run.workflow_id, 0) > 0:
            by_wf[run.workflow_id] += running_intervals(events[run.id])
    for wf, spans in by_wf.items():
        for t, _ in spans:
            n = sum(1 for s, e in spans if s <= t and (e is None or t < e))
            if n > caps[wf]:
                problems.append(f"workflow {wf}: {n} runs running at {t} (cap {caps[wf]})")
    return problems


async def check_consistent(db: Database) -> tuple[dict[str, RunRecord], dict[str, list[StepRecord]],
                                                  dict[str, list[EventRecord]]]:
    """Every run's history is legal and gapless, caps hold; returns what it read."""
    runs, steps, events, caps = await _load_all(db)
    problems = []
    for run in runs.values():
        problems += [f"run {run.id} ({run.workflow_name}): {p}"
                     for p in check_history(run, steps[run.id], events[run.id])]
    problems += cap_excess(runs, events, caps)
    problems += [f"cap audit: {v}" for v in await _cap_violations(db)]
    # At rest, too.
    for wf, cap in caps.items():
        running = sum(1 for r in runs.values() if r.workflow_id == wf and r.status == RunStatus.RUNNING)
        if cap and running > cap:
            problems.append(f"workflow {wf}: {running} running at rest (cap {cap})")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])
    return runs, steps, events


async def _until_all_final(p: Pair, out: Outcomes, rounds: int, step_seconds: float = 1.0) -> int:
    """Advance the clock and race both runners until no run is left unfinished; returns rounds."""
    for n in range(rounds):
        await _ticks(out, p.a, p.b)
        async with p.db.read() as conn:
            left = (await conn.execute(select(func.count()).select_from(runs_t).where(
                runs_t.c.status.not_in([str(s) for s in FINAL_RUN])))).scalar_one()
        if not left:
            return n
        p.clock.advance(step_seconds)
    return rounds


# -- 1. runner passes against runner passes ------------------------------------------------------

RUNNER_WORKFLOWS: list[dict[str, Any]] = [
    {"name": "chain", "steps": [noop("a"), delay("d1", 2, "a"), noop("b", "d1"), delay("d2", 1, "b"),
                                noop("c", "d2")]},
    {"name": "diamond", "max_parallel_steps": 2, "steps": [
        noop("top"), delay("l", 1, "top"), delay("m", 2, "top"), delay("r", 3, "top"),
        noop("bottom", "l", "m", "r")]},
    {"name": "capped_chain", "max_concurrent_runs": 3, "steps": [
        noop("a"), delay("d", 1, "a"), noop("b", "d")]},
    {"name": "capped_diamond", "max_concurrent_runs": 5, "max_parallel_steps": 1, "steps": [
        noop("top"), delay("l", 1, "top"), delay("r", 1, "top"), noop("bottom", "l", "r")]},
]


async def _create(p: Pair, workflows: Sequence[dict[str, Any]]) -> None:
    for spec in workflows:
        await p.a.workflows.create(spec, ME)


async def _trigger_many(p: Pair, out: Outcomes, names: Sequence[str]) -> list[str]:
    """Trigger one run per name, alternately through A and B, all at once."""
    engines = (p.a, p.b)
    runs = await asyncio.gather(*(
        out.call("trigger", engines[i % 2].runs.trigger(TriggerRequest(workflow_id=name), ME), NO_ERROR)
        for i, name in enumerate(names)))
    return [r.id for r in runs if r is not None]


async def test_runner_passes_race_on_the_same_due_runs(pair: Pair) -> None:
    p, out = pair, Outcomes()
    await _create(p, RUNNER_WORKFLOWS)
    names = ["chain"] * 60 + ["diamond"] * 60 + ["capped_chain"] * 40 + ["capped_diamond"] * 40
    random.Random(5).shuffle(names)
    ids = await _trigger_many(p, out, names)
    assert len(ids) == 200
    rounds = await _until_all_final(p, out, rounds=80)
    out.check()
    assert rounds < 80, "runs left unfinished"

    runs, steps, events = await check_consistent(p.db)
    assert {r.status for r in runs.values()} == {RunStatus.COMPLETED}
    for run_id, run_steps in steps.items():
        done = Counter(e.step_ref for e in events[run_id] if e.type == "step.completed")
        attempts = {e.step_ref: (e.data or {}).get("attempt") for e in events[run_id]
                    if e.type == "step.completed"}
        for s in run_steps:
            assert done[s.step_ref] == 1, f"{run_id}/{s.step_ref} completed {done[s.step_ref]} times"
            assert s.attempt == 1 and attempts[s.step_ref] == 1, (run_id, s.step_ref, s.attempt)
        # One run.running (created running or started by a runner) and one run.completed.
        types = Counter(e.type for e in events[run_id])
        assert types["run.running"] == 1 and types["run.completed"] == 1, types



ON_POSTGRES = os.environ.get("CONVEYOR_TEST_DB", "sqlite") == "postgresql"


async def _race_until_final(p: Pair, out: Outcomes, rounds: int) -> int:
    """Like _until_all_final, with both runners in tiny batches, so that each pass holds a few
    claimed runs while it hands out the slots of their workflows."""
    for eng in (p.a, p.b):
        eng.runner.batch_size = 4
    return await _until_all_final(p, out, rounds)


async def test_two_runners_never_deadlock_over_capped_slots(pair: Pair) -> None:
    """Capped workflows with several pending runs each, claimed by both runners in small
    batches: neither pass may fail, and the caps hold. (Found a deadlock: a pass holding its
    claimed runs and a workflow row waited for a head run another pass had claimed, while that
    pass waited for the workflow row; PostgreSQL aborted one and tick() raised UNAVAILABLE.)"""
    p, out = pair, Outcomes()
    await _create(p, [{"name": f"cap{i}", "max_concurrent_runs": 1 + i % 3,
                       "steps": [noop("a"), delay("d", 1, "a"), noop("b", "d")]} for i in range(4)])
    ids = await _trigger_many(p, out, [f"cap{i % 4}" for i in range(200)])
    assert len(ids) == 200
    rounds = await _race_until_final(p, out, rounds=120)
    runs, _, _ = await check_consistent(p.db)
    assert rounds < 120 and {r.status for r in runs.values()} == {RunStatus.COMPLETED}
    out.check()


async def test_capped_runs_that_finish_in_one_pass_hand_on_their_slot(pair: Pair) -> None:
    """Capped noop-only runs start and finish inside one pass: every one must still complete.
    (Found: a run loaded pending that started and finished in one pass freed its slot without
    waking the next pending run, and the rest of the queue waited forever.)"""
    p, out = pair, Outcomes()
    await _create(p, [{"name": "quick", "max_concurrent_runs": 1, "steps": [noop("a"), noop("b", "a")]}])
    ids = await _trigger_many(p, out, ["quick"] * 6)
    rounds = await _until_all_final(p, out, rounds=20)
    out.check()
    runs, _, _ = await check_consistent(p.db)
    assert Counter(r.status for r in runs.values()) == {RunStatus.COMPLETED: len(ids)}, rounds


# -- 2. operator operations against runner passes ---------------------------------------------

OPS_WORKFLOWS: list[dict[str, Any]] = [
    {"name": "ops", "max_parallel_steps": 2, "steps": [
        {"ref": "gate", "kind": "approval"}, noop("n1", "gate"), delay("d", 2, "n1"), noop("n2", "d"),
        {"ref": "side", "kind": "task", "queue": "q"}, delay("short", 1)]},
    {"name": "ops_capped", "max_concurrent_runs": 2, "steps": [
        delay("d", 1), {"ref": "gate", "kind": "approval", "depends_on": ["d"]}, noop("n1", "gate")]},
    # Triggered without `go`, its `when` cannot be evaluated: the step fails, and so does the run.
    {"name": "ops_fail", "steps": [noop("a"), {**noop("b", "a"), "when": "payload.go == true"},
                                   delay("c", 1, "b")]},
]
STEP_REFS = ["gate", "n1", "d", "n2", "side", "short", "a", "b", "c"]


def _operation(eng: Engine, rnd: random.Random, run_ids: list[str]) -> tuple[str, Awaitable[Any]]:
    """One random operator operation on a random run (or a few, for bulk operations)."""
    run_id = rnd.choice(run_ids)
    ref = rnd.choice(STEP_REFS)
    ops: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("cancel", lambda: eng.runs.cancel(run_id, ME)),
        ("pause", lambda: eng.runs.pause(run_id, ME)),
        ("resume", lambda: eng.runs.resume(run_id, ME)),
        ("resume", lambda: eng.runs.resume(run_id, ME)),
        ("retry run", lambda: eng.runs.retry(run_id, ME)),
        ("approve", lambda: eng.steps.approve(run_id, "gate", "ok", ME)),
        ("approve", lambda: eng.steps.approve(run_id, "gate", "ok", ME)),
        ("skip", lambda: eng.steps.skip(run_id, ref, "", ME)),
        ("force-complete", lambda: eng.steps.force_complete(run_id, ref, {"forced": True}, ME)),
        ("retry step", lambda: eng.steps.retry(run_id, ref, ME)),
        ("replay subtree", lambda: eng.steps.replay_subtree(run_id, ref, ME)),
        ("bulk cancel", lambda: eng.runs.bulk_cancel(rnd.sample(run_ids, 4), ME)),
        ("bulk replay", lambda: eng.runs.bulk_replay(rnd.sample(run_ids, 4), ME)),
    ]
    label, make = rnd.choice(ops)
    return label, make()


async def test_operator_operations_race_runner_passes(pair: Pair) -> None:
    p, out = pair, Outcomes()
    await _create(p, OPS_WORKFLOWS)
    ids = await _trigger_many(p, out, ["ops"] * 20 + ["ops_capped"] * 12 + ["ops_fail"] * 8)
    assert len(ids) == 40
    rnd = random.Random(int(os.environ.get("RACE_SEED", "11")))
    for _ in range(25):
        calls = [_operation(p.b, rnd, ids) for _ in range(12)]
        await asyncio.gather(
            out.call("tick A", p.a.tick(), NO_ERROR),
            *(out.call(label, aw, OPERATION_ERRORS) for label, aw in calls))
        p.clock.advance(1)
    # Quiet: both runners finish whatever the operations left due.
    for _ in range(5):
        await _ticks(out, p.a, p.b)
        p.clock.advance(1)
    out.check()
    await check_consistent(p.db)
    # The race exercised both outcomes of most operations.
    assert sum(out.ok.values()) - out.ok["tick A"] - out.ok["tick B"] > 60, out.ok
    assert sum(out.clean.values()) > 30, out.clean


# -- 3. trigger batches against trigger batches, and against runner passes ------------------------

async def _runs_by_key(db: Database) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    out: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    async with db.read() as conn:
        for r in await conn.execute(select(runs_t.c.idempotency_key, runs_t.c.id, runs_t.c.payload)):
            out[r.idempotency_key].append((r.id, r.payload))
    return out


ROUNDS, KEYS = 12, 20


async def _answer(out: Outcomes, body: int, aw: Awaitable[RunRecord]) -> RunRecord | ConveyorError | None:
    """The trigger's run, or the clean error it answered (None when the error was not clean)."""
    error: list[ConveyorError] = []

    async def keep() -> RunRecord:
        try:
            return await aw
        except ConveyorError as e:
            error.append(e)
            raise

    run = await out.call(f"trigger {body}", keep(), {ErrorKind.ALREADY_EXISTS, ErrorKind.ABORTED})
    return run if run is not None else (error[0] if error else None)


async def test_concurrent_duplicate_triggers_make_one_run_per_key(pair: Pair) -> None:
    """Each key is sent by both engines at once (once by workflow name, once by id, same body),
    some keys also with another body: one run per key; every answer with the winning body is
    that run, every other answer is ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED."""
    p, out = pair, Outcomes()
    wf = await p.a.workflows.create({"name": "idem", "steps": [{"ref": "g", "kind": "approval"}]}, ME)
    sent: list[tuple[str, int]] = []
    answers: list[Any] = []
    rnd = random.Random(3)
    for round_ in range(ROUNDS):
        calls: list[tuple[str, int, Awaitable[Any]]] = []
        for i in range(KEYS):
            key = f"k{round_}-{i}"
            calls.append((key, 0, p.a.runs.trigger(
                TriggerRequest(workflow_id="idem", idempotency_key=key, payload={"v": 0}), ME)))
            calls.append((key, 0, p.b.runs.trigger(
                TriggerRequest(workflow_id=wf.id, idempotency_key=key, payload={"v": 0}), ME)))
            if i % 4 == 0:
                calls.append((key, 1, p.b.runs.trigger(
                    TriggerRequest(workflow_id="idem", idempotency_key=key, payload={"v": 1}), ME)))
        rnd.shuffle(calls)
        sent += [(key, body) for key, body, _ in calls]
        answers += await asyncio.gather(*(_answer(out, body, aw) for _, body, aw in calls))
    out.check()
    stored = await _runs_by_key(p.db)
    assert sum(len(v) for v in stored.values()) == ROUNDS * KEYS
    for (key, body), answer in zip(sent, answers, strict=True):
        assert len(stored[key]) == 1, f"{key}: {len(stored[key])} runs"
        (run_id, payload), = stored[key]
        if isinstance(answer, ConveyorError) and answer.kind == ErrorKind.ABORTED:
            continue  # lost the race cleanly; the client may send it again
        if payload == {"v": body}:
            assert isinstance(answer, RunRecord) and answer.id == run_id, f"{key}: answered {answer}"
        else:
            assert isinstance(answer, ConveyorError) and answer.reason == "IDEMPOTENCY_KEY_REUSED", \
                f"{key} body {body}: answered {answer}, stored {payload}"
    assert {reason for (_, _, reason) in out.clean} <= {"IDEMPOTENCY_KEY_REUSED", "CONCURRENT_CHANGE"}
    await check_consistent(p.db)


async def test_triggers_of_capped_workflows_race_runner_passes(pair: Pair) -> None:
    """Engine A triggers waves of runs of capped workflows while engine B's runner passes start
    them: the caps hold, slots go to the oldest pending run first, and every run completes."""
    p, out = pair, Outcomes()
    await _create(p, [
        {"name": "cap_one", "max_concurrent_runs": 1, "steps": [noop("a"), delay("d", 1, "a")]},
        {"name": "cap_three", "max_concurrent_runs": 3, "steps": [delay("d", 1), noop("b", "d")]},
        {"name": "free", "steps": [noop("a"), delay("d", 1, "a"), noop("b", "d")]},
    ])
    names = ["cap_one", "cap_three", "cap_three", "free"]
    for wave in range(6):
        await asyncio.gather(
            _trigger_many(p, out, [names[i % 4] for i in range(wave, wave + 24)]),
            out.call("tick B", p.b.tick(), NO_ERROR))
        p.clock.advance(1)
    for _ in range(80):
        await out.call("tick B", p.b.tick(), NO_ERROR)
        if not await _unfinished(p.db):
            break
        p.clock.advance(1)
    out.check()
    runs, _, _ = await check_consistent(p.db)
    assert len(runs) == 144 and {r.status for r in runs.values()} == {RunStatus.COMPLETED}
    # FIFO: a run created earlier never starts after one created later. (Runs created at the same
    # instant by the two engines' batches are not ordered: one batch may commit after the other's
    # runs started.)
    for name in ("cap_one", "cap_three"):
        started: dict[datetime, list[datetime]] = defaultdict(list)
        for r in runs.values():
            if r.workflow_name == name:
                assert r.started_at is not None
                started[r.created_at].append(r.started_at)
        latest_earlier: datetime | None = None
        for created in sorted(started):
            if latest_earlier is not None:
                assert min(started[created]) >= latest_earlier, f"{name}: run created {created} started early"
            latest_earlier = max(started[created] + ([latest_earlier] if latest_earlier else []))


async def _unfinished(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(runs_t).where(
            runs_t.c.status.not_in([str(s) for s in FINAL_RUN])))).scalar_one())


# -- 4. an operator unit that loses its compare-and-set ------------------------------------------

class _Interposed:
    """A Repository whose `save` first lets another writer commit (once per `times`)."""

    def __init__(self, repo: Any, before_save: Callable[[], Awaitable[None]]) -> None:
        self._repo = repo
        self._before_save = before_save

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    async def save(self, units: Sequence[Any]) -> None:
        await self._before_save()
        await self._repo.save(units)


class InterposingStore:
    """B's store: between a unit's reads and its save, `hook` commits on another connection."""

    def __init__(self, inner: SqlStore, hook: Callable[[], Awaitable[None]]) -> None:
        self.inner = inner
        self.hook = hook

    def read(self) -> Any:
        return self.inner.read()

    def write(self) -> Any:
        @contextlib.asynccontextmanager
        async def unit() -> AsyncIterator[Any]:
            async with self.inner.write() as repo:
                yield _Interposed(repo, self.hook)
        return unit()


async def _leased_task(p: Pair) -> tuple[str, StepRecord]:
    """A run whose task step `t` is running attempt 1 under a lease (a test-only holder)."""
    await p.a.workflows.create({"name": "leased", "steps": [
        {"ref": "t", "kind": "task", "queue": "q"}, {"ref": "g", "kind": "approval"}]}, ME)
    run_id = (await p.a.runs.trigger(TriggerRequest(workflow_id="leased"), ME)).id
    store = SqlStore(p.db)
    async with store.write() as repo:
        run = await repo.get_run(run_id, None, lock=True)
        steps = {s.step_ref: s for s in (await repo.steps_of([run_id]))[run_id]}
        c = Changes(run, p.clock.now(), "holder")
        t = steps["t"]
        c.touch_step(t)
        t.attempt += 1
        t.worker_id = "w1"
        c.step_to(t, StepStatus.RUNNING, data={"attempt": t.attempt})
        t.lease_expires_at = p.clock.now() + timedelta(seconds=30)
        await repo.save([c])
    return run_id, t


def _heartbeat(p: Pair, step: StepRecord, times: int) -> Callable[[], Awaitable[None]]:
    """A heartbeat as a lease holder sends it: it moves the lease on the step row alone,
    without the run's lock, committed by engine A's pool."""
    left = [times]

    async def beat() -> None:
        if left[0] <= 0:
            return
        left[0] -= 1
        assert step.lease_expires_at is not None
        until = step.lease_expires_at + timedelta(seconds=30 * (times - left[0]))
        async with p.db.write() as conn:
            res = await conn.execute(
                update(steps_t).where(steps_t.c.id == step.id, steps_t.c.attempt == step.attempt,
                                      steps_t.c.status == StepStatus.RUNNING)
                .values(lease_expires_at=until))
            assert res.rowcount == 1
    return beat


@pytest.mark.skipif(not ON_POSTGRES, reason=(
    "SQLite's one writer serializes the heartbeat after the operation: no stale window"))
@pytest.mark.parametrize("beats", [1, 100])
async def test_operator_unit_losing_its_compare_and_set_gets_a_clean_outcome(pair: Pair, beats: int) -> None:
    """B cancels a run while a heartbeat moves its running step's lease between B's read and
    B's save: B's step compare-and-set matches no row. Once: the operation is tried again on
    the new state and succeeds (the lease is revoked). Every time: ABORTED / CONCURRENT_CHANGE,
    and nothing of B is stored."""
    p = pair
    run_id, t = await _leased_task(p)
    settings = Settings(db_url=p.url)
    b = Engine(InterposingStore(SqlStore(p.dbs[1]), _heartbeat(p, t, beats)), settings, p.clock)
    before = (await _load_all(p.db))[2][run_id]
    try:
        if beats == 1:
            await b.runs.cancel(run_id, ME)
        else:
            with pytest.raises(ConveyorError) as e:
                await b.runs.cancel(run_id, ME)
            assert (e.value.kind, e.value.reason) == (ErrorKind.ABORTED, "CONCURRENT_CHANGE")
    finally:
        await b.stop()
    runs, steps, events = await check_consistent(p.db)
    t_now = next(s for s in steps[run_id] if s.step_ref == "t")
    if beats == 1:
        assert runs[run_id].status == RunStatus.CANCELED
        assert t_now.status == StepStatus.CANCELED and t_now.lease_expires_at is None
        mine = Counter(e.type for e in events[run_id] if e.seq > len(before))
        assert mine == {"step.canceled": 2, "run.canceled": 1}, mine  # t and g, then the run
    else:
        assert runs[run_id].status == RunStatus.RUNNING and t_now.status == StepStatus.RUNNING
        assert events[run_id] == before


# -- 5. two OS processes -------------------------------------------------------------------------

_WORKER = textwrap.dedent('''
    import asyncio, json, sys, time
    from datetime import UTC, datetime
    from pathlib import Path

    from conveyor.engine.clock import ManualClock
    from conveyor.engine.facade import Engine
    from conveyor.settings import Settings
    from conveyor.storage.db import Database
    from conveyor.storage.store import SqlStore

    async def main(url: str, start: str, go: str, deadline: float) -> None:
        db = Database(url)
        clock = ManualClock(datetime.fromisoformat(start))
        eng = Engine(SqlStore(db), Settings(db_url=url, engine_batch_size=8), clock)
        while not Path(go).exists():
            await asyncio.sleep(0.01)
        ticks, errors, idle = 0, [], 0
        while time.monotonic() < deadline:
            try:
                n = await eng.tick()
            except Exception as e:
                errors.append(f"{type(e).__module__}.{type(e).__name__}: {e}")
                n = 0
            ticks += n
            async with eng.store.read() as repo:
                nxt = await repo.next_wake()
            if nxt is None:
                idle += 1
                if idle > 20:
                    break
                await asyncio.sleep(0.02)
            else:
                idle = 0
                if nxt > clock.now():
                    clock.advance(min(1.0, (nxt - clock.now()).total_seconds()))
        await eng.stop()
        await db.dispose()
        print(json.dumps({"ticks": ticks, "errors": errors}))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], time.monotonic() + float(sys.argv[4])))
''')


async def test_two_processes_race_runner_passes(pair: Pair, tmp_path: Path) -> None:
    """Two OS processes (true parallelism), each with its own engine and a ManualClock started at
    the same instant that it moves forward to its next timer, advance the same 120 runs."""
    p, out = pair, Outcomes()
    await _create(p, RUNNER_WORKFLOWS)
    names = ["chain"] * 30 + ["diamond"] * 30 + ["capped_chain"] * 30 + ["capped_diamond"] * 30
    random.Random(7).shuffle(names)
    ids = await _trigger_many(p, out, names)
    out.check()
    script, go = tmp_path / "worker.py", tmp_path / "go"
    script.write_text(_WORKER)
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, str(script), p.url, p.clock.now().isoformat(), str(go), "15",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(2)]
    go.touch()
    results = [await proc.communicate() for proc in procs]
    reports = []
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr.decode()[-3000:]
        reports.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    assert all(not r["errors"] for r in reports), reports
    if ON_POSTGRES:  # (on SQLite one process may hold the writer for the whole race)
        assert all(r["ticks"] > 0 for r in reports), f"both processes must have advanced runs: {reports}"
    runs, steps, events = await check_consistent(p.db)
    assert len(runs) == len(ids) and {r.status for r in runs.values()} == {RunStatus.COMPLETED}
    for run_id, run_steps in steps.items():
        done = Counter(e.step_ref for e in events[run_id] if e.type == "step.completed")
        assert all(done[s.step_ref] == 1 and s.attempt == 1 for s in run_steps), run_id
