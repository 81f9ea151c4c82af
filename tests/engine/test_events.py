"""Events (SPEC §9) against a real database (SQLite, and PostgreSQL with
CONVEYOR_TEST_DB=postgresql): publishing (idempotent by id, another body refused, nothing done
twice), listing newest first, `on_events` starting exactly one run per (workflow, event) with
`when` filtering, archived and updated workflows, a failing `when` or a refused payload skipping
that workflow alone with its reason recorded, hostile events refused whole, retention, and two
engines with their own pools publishing the same id at once (one event, one run)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.records import Caller, RunQuery, RunRecord
from conveyor.domain.states import RunStatus
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine

ME = Caller("publisher")
DAY = 24 * 3600.0


def listening(name: str, *on_events: dict[str, Any], **extra: Any) -> dict[str, Any]:
    step = {"ref": "a", "kind": "noop", "config": {"output": {"got": "{{ payload }}"}}}
    return {"name": name, "steps": [step], "on_events": list(on_events), **extra}


async def runs_of(engine: Engine, workflow: str) -> list[RunRecord]:
    page = await engine.runs.list(RunQuery(workflow_ids=[workflow]), 1000, "", ME)
    return sorted(page.items, key=lambda r: (r.created_at, r.id))


async def count(engine: Engine, sql: str) -> int:
    async with engine.store.read() as repo:
        return int((await repo.conn.execute(text(sql))).scalar_one())  # type: ignore[attr-defined]


async def publish(engine: Engine, name: str, key: str = "", payload: dict[str, Any] | None = None,
                  ident: str = "", project: str = "", caller: Caller = ME) -> Any:
    return await engine.events.publish(caller, project, name, key, payload or {}, ident)


async def test_publish_records_the_event_and_lists_it_newest_first(engine: Engine,
                                                                   clock: ManualClock) -> None:
    first = await publish(engine, "order.paid", "cust-1", {"total": 5})
    clock.advance(1)
    second = await publish(engine, "order.paid", "cust-2", {"total": 7}, ident="evt-2")
    clock.advance(1)
    other = await publish(engine, "user.signup", "cust-1")

    assert first.id and first.project_id == "default" and first.created_by == "publisher"
    assert (second.id, second.key, second.payload, second.started, second.resumed) == ("evt-2", "cust-2",
                                                                                       {"total": 7}, 0, 0)
    everything = await engine.events.list_events(ME, "", "", "", 50, "")
    assert [e.id for e in everything.items] == [other.id, "evt-2", first.id]
    by_name = await engine.events.list_events(ME, "", "order.paid", "", 50, "")
    assert [e.id for e in by_name.items] == ["evt-2", first.id]
    by_key = await engine.events.list_events(ME, "", "order.paid", "cust-1", 50, "")
    assert [e.id for e in by_key.items] == [first.id]
    page = await engine.events.list_events(ME, "", "", "", 2, "")
    rest = await engine.events.list_events(ME, "", "", "", 2, page.next_token)
    assert [e.id for e in page.items + rest.items] == [other.id, "evt-2", first.id] and not rest.next_token


async def test_a_key_of_one_project_neither_publishes_nor_lists_in_another(engine: Engine) -> None:
    acme = Caller("ci", project="acme")
    await publish(engine, "order.paid", project="acme", caller=acme)
    with pytest.raises(ConveyorError) as e:
        await publish(engine, "order.paid", project="other", caller=acme)
    assert e.value.kind == ErrorKind.PERMISSION_DENIED
    assert (await engine.events.list_events(acme, "other", "", "", 50, "")).items == []
    assert len((await engine.events.list_events(acme, "", "", "", 50, "")).items) == 1
    assert (await engine.events.list_events(ME, "", "", "", 50, "")).items == []  # the default project's


async def test_on_events_starts_one_run_per_event_with_its_payload_and_key(engine: Engine) -> None:
    await engine.workflows.create(listening("ship", {"name": "order.paid"}), ME)
    await engine.workflows.create(listening("bill", {"name": "order.paid"}, {"name": "order.refunded"}), ME)
    await engine.workflows.create(listening("deaf", {"name": "user.signup"}), ME)
    await engine.workflows.create({"name": "plain", "steps": [{"ref": "a", "kind": "noop"}]}, ME)

    event = await publish(engine, "order.paid", "cust-9", {"total": 5}, ident="pay-1")
    assert event.started == 2 and event.skipped == ()
    for name in ("ship", "bill"):
        (run,) = await runs_of(engine, name)
        assert (run.triggered_by, run.created_by, run.entity_id, run.payload) == (
            "event", "publisher", "cust-9", {"total": 5})
        opened = (await engine.runs.events(run.id, 0, 1, "", ME)).items[0]
        assert opened.data is not None and opened.data["event_id"] == "pay-1"
    assert await runs_of(engine, "deaf") == [] and await runs_of(engine, "plain") == []

    await engine.tick()
    (run,) = await runs_of(engine, "ship")
    assert (await engine.runs.get(run.id, ME)).status == RunStatus.COMPLETED

    assert (await publish(engine, "order.refunded", "cust-9")).started == 1
    assert len(await runs_of(engine, "bill")) == 2


async def test_the_same_id_twice_answers_the_first_publish_and_starts_nothing_more(
        engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(listening("ship", {"name": "order.paid"}), ME)
    first = await publish(engine, "order.paid", "c", {"n": 1}, ident="dup")
    clock.advance(5)
    again = await publish(engine, "order.paid", "c", {"n": 1}, ident="dup")
    assert again == first and again.started == 1
    assert len(await runs_of(engine, "ship")) == 1
    assert await count(engine, "SELECT count(*) FROM events") == 1

    for changed in ({"key": "d"}, {"payload": {"n": 2}}, {"name": "order.other"}):
        kw: dict[str, Any] = {"name": "order.paid", "key": "c", "payload": {"n": 1}, **changed}
        with pytest.raises(ConveyorError) as e:
            await publish(engine, kw["name"], kw["key"], kw["payload"], ident="dup")
        assert (e.value.kind, e.value.reason) == (ErrorKind.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert len(await runs_of(engine, "ship")) == 1
    # An id is scoped to its project: another project's event of the same id is its own.
    acme = Caller("ci", project="acme")
    assert (await publish(engine, "order.paid", "x", ident="dup", project="acme", caller=acme)).key == "x"


async def test_when_filters_and_a_failing_when_skips_only_its_workflow(engine: Engine) -> None:
    big = {"name": "order.paid", "when": "event.payload.total > 100"}
    await engine.workflows.create(listening("big", big), ME)
    keyed = {"name": "order.paid", "when": "event.key == 'vip'"}
    await engine.workflows.create(listening("keyed", keyed), ME)
    # Fails on events without `payload.total`: no such key.
    await engine.workflows.create(listening("fragile", {"name": "order.paid",
                                                        "when": "event.payload.total.size() > 1"}), ME)
    await engine.workflows.create(listening("strict", {"name": "order.paid"},
                                            variables=[{"name": "total", "required": True}]), ME)
    await engine.workflows.create(listening("all", {"name": "order.paid"}), ME)

    small = await publish(engine, "order.paid", "vip", {"total": 5})
    assert small.started == 3  # keyed, strict, all
    assert {s.workflow_name: s.reason.split(":")[0] for s in small.skipped} == {"fragile": "on_events when"}
    assert "total" in small.skipped[0].reason

    nothing = await publish(engine, "order.paid", "nobody", {"note": "no total"})
    assert nothing.started == 1  # all
    reasons = {s.workflow_name: s.reason for s in nothing.skipped}
    assert set(reasons) == {"fragile", "big", "strict"}
    assert reasons["strict"].startswith("the payload does not fit the workflow's variables")
    started = [len(await runs_of(engine, n)) for n in ("big", "keyed", "fragile", "strict", "all")]
    assert started == [0, 1, 0, 1, 2]
    listed = (await engine.events.list_events(ME, "", "", "", 50, ""))
    assert listed.items[0].skipped == nothing.skipped  # recorded with the event


async def test_archived_and_updated_workflows_follow_their_current_definition(engine: Engine) -> None:
    await engine.workflows.create(listening("gone", {"name": "tick"}), ME)
    await engine.workflows.create(listening("moved", {"name": "tick"}), ME)
    await engine.workflows.archive("gone", "", ME)
    await engine.workflows.update("moved", listening("moved", {"name": "tock"}), ME)

    assert (await publish(engine, "tick")).started == 0
    assert (await publish(engine, "tock")).started == 1
    assert await runs_of(engine, "gone") == [] and len(await runs_of(engine, "moved")) == 1
    await engine.workflows.update("moved", {"name": "moved", "steps": [{"ref": "a", "kind": "noop"}]}, ME)
    assert (await publish(engine, "tock")).started == 0
    assert await count(engine, "SELECT count(*) FROM event_listeners") == 0


async def test_definitions_with_bad_on_events_are_refused_whole(engine: Engine) -> None:
    bad = [
        [{"name": ""}], [{"name": "has space"}], [{"name": "x" * 201}], [{"name": "a", "when": "payload.x"}],
        [{"name": "a", "when": "event.x +"}], [{"name": "a", "extra": 1}], "order.paid", [3],
        [{"name": "a"}, {"name": "a"}], [{"name": f"e{i}"} for i in range(21)],
    ]
    for i, on_events in enumerate(bad):
        with pytest.raises(ConveyorError) as e:
            await engine.workflows.create({"name": f"bad{i}", "steps": [{"ref": "a", "kind": "noop"}],
                                           "on_events": on_events}, ME)
        assert e.value.reason == "INVALID_WORKFLOW", on_events
        assert any(v.field.startswith("on_events") for v in e.value.violations), on_events
    # `event` is for on_events and wait_event only.
    with pytest.raises(ConveyorError) as e:
        await engine.workflows.create({"name": "leak", "steps": [{"ref": "a", "kind": "noop",
                                                                  "when": "event.key == 'x'"}]}, ME)
    assert "event" in e.value.violations[0].description
    assert await count(engine, "SELECT count(*) FROM event_listeners") == 0


async def test_hostile_events_are_refused_and_change_nothing(engine: Engine) -> None:
    await engine.workflows.create(listening("ship", {"name": "order.paid"}), ME)
    deep: dict[str, Any] = {}
    for _ in range(30):
        deep = {"d": deep}
    hostile = [
        ("", "", {}, ""), ("has space", "", {}, ""), ("x" * 201, "", {}, ""),
        ("order.paid", "k\x00ey", {}, ""),
        ("order.paid", "line\nbreak", {}, ""), ("order.paid", "k" * 201, {}, ""),
        ("order.paid", "", {"big": "x" * (64 * 1024)}, ""), ("order.paid", "", deep, ""),
        ("order.paid", "", {"nul": "a\x00b"}, ""), ("order.paid", "", {}, "has space"),
        ("order.paid", "", {}, "é"),
        ("order.paid", "", {}, "i" * 201),
    ]
    for name, key, payload, ident in hostile:
        with pytest.raises(ConveyorError) as e:
            await publish(engine, name, key, payload, ident)
        refused = (e.value.kind, e.value.reason)
        assert refused == (ErrorKind.INVALID_ARGUMENT, "INVALID_EVENT"), (name, key, ident)
    assert await count(engine, "SELECT count(*) FROM events") == 0
    assert await runs_of(engine, "ship") == []


async def test_events_are_kept_event_retention_days(engine: Engine, clock: ManualClock) -> None:
    await engine.workflows.create(listening("ship", {"name": "order.paid"}), ME)
    await publish(engine, "order.paid", ident="old")
    clock.advance(6 * DAY)
    await publish(engine, "order.paid", ident="young")
    clock.advance(1.5 * DAY)
    deleted = await engine.retention.sweep()
    assert deleted["events"] == 1
    assert [e.id for e in (await engine.events.list_events(ME, "", "", "", 50, "")).items] == ["young"]
    # Its id is free again: a publish of it is a new event (and starts a new run).
    assert (await publish(engine, "order.paid", ident="old")).started == 1
    assert len(await runs_of(engine, "ship")) == 3


async def test_two_replicas_publishing_one_id_at_once_start_one_run(replicas: list[Engine]) -> None:
    a, b = replicas
    await a.workflows.create(listening("ship", {"name": "order.paid"}), ME)
    await a.workflows.create(listening("bill", {"name": "order.paid", "when": "event.payload.n > 0"}), ME)
    for i in range(5):
        answers = await asyncio.gather(*(e.events.publish(ME, "", "order.paid", "k", {"n": 1}, f"same-{i}")
                                         for e in (a, b, a, b)))
        assert len({(x.id, x.started, x.received_at) for x in answers}) == 1 and answers[0].started == 2
    runs = await runs_of(a, "ship") + await runs_of(a, "bill")
    assert Counter(r.workflow_name for r in runs) == {"ship": 5, "bill": 5}
    assert await count(a, "SELECT count(*) FROM events") == 5
