"""Secrets in steps (issue 16 item 4, SPEC §11): `{{ secrets.NAME }}` in http and task configs is
rendered only for the executor (the request made, the lease handed out), and the value is stored
nowhere: not in the step's input, output, error or events, not in a run's error, in no column of
any table, also when a target or a worker echoes it back. A real HTTP server on 127.0.0.1, a
real database, a ManualClock; workers are the engine's own lease calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import update

from conveyor.domain.records import Caller
from conveyor.domain.states import RunStatus, StepStatus
from conveyor.engine.cipher import new_key_text
from conveyor.engine.clock import ManualClock
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.storage.db import Database
from conveyor.storage.models import SecretRow
from conveyor.storage.store import SqlStore
from tests.engine.test_engine import ME, events_of, status, steps_of, trigger, wf
from tests.engine.test_http_steps import LOCAL, Reply, Seen, Server, http, json_reply
from tests.tables import every_row_as_text, found_in, spellings

ADMIN = Caller("admin-key")
# A quote and a backslash: JSON escapes them, a URL percent-encodes them.
VALUE = 'tok"7f3a9c"\\end'
TOKEN_CONFIG = {"method": "POST", "url": "", "headers": {"Authorization": "Bearer {{ secrets.token }}"},
                "body": {"t": "{{ secrets.token }}", "who": "{{ payload.who }}"}}


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server() as s:
        yield s


@pytest.fixture
async def make_engine(database: Database, clock: ManualClock) -> AsyncIterator[Callable[..., Engine]]:
    """Engines over the test database with these Settings fields (the test server allowed)."""
    made: list[Engine] = []

    def make(**settings: Any) -> Engine:
        made.append(Engine(SqlStore(database), Settings(db_url=str(database.url), http_allow=LOCAL.http_allow,
                                                        **settings), clock))
        return made[-1]

    yield make
    for e in made:
        await e.stop()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


async def echo_everything(seen: Seen) -> Reply:
    """A target that echoes the whole request back (the header with the credential too)."""
    return json_reply({"path": seen.path, "headers": seen.headers, "body": seen.body.decode()})


async def refuse_quoting_it(seen: Seen) -> Reply:
    """A target that fails, quoting the credential in its error text."""
    text = f"bad credential: {seen.headers['authorization']}"
    return Reply(500, {"Content-Type": "text/plain"}, text.encode())


def task(ref: str, config: dict[str, Any], attempts: int = 1) -> dict[str, Any]:
    return {"ref": ref, "kind": "task", "queue": "q", "config": config,
            "retry": {"max_attempts": attempts, "initial_interval_seconds": 1}}


def assert_nowhere(texts: dict[str, str]) -> None:
    assert not found_in(texts, VALUE), found_in(texts, VALUE)


def mentions(value: Any) -> bool:
    text = json.dumps(value, ensure_ascii=False)
    return any(s in text for s in spellings(VALUE))


async def test_an_http_step_sends_the_value_and_stores_it_nowhere(
        engine: Engine, server: Server, database: Database) -> None:
    await engine.secrets.put(ADMIN, "default", "token", VALUE)
    server.handler = echo_everything
    ok = {**TOKEN_CONFIG, "url": server.url("/hook?k={{ secrets.token }}")}
    await engine.workflows.create(wf("ok", [http("call", ok)]), ME)
    await engine.workflows.create(wf("bad", [http("call", {**ok, "url": server.url("/fail")})]), ME)
    good_run = await trigger(engine, "ok", payload={"who": "me"})
    await engine.http.run_once()
    server.handler = refuse_quoting_it
    bad_run = await trigger(engine, "bad", payload={"who": "me"})
    await engine.http.run_once()

    first, second = server.requests
    assert first.headers["authorization"] == second.headers["authorization"] == f"Bearer {VALUE}"
    assert json.loads(first.body) == {"t": VALUE, "who": "me"}
    good = (await steps_of(engine, good_run))["call"]
    assert good.status == StepStatus.COMPLETED
    assert good.output["body"]["headers"]["authorization"] == "Bearer ***"  # the echo, masked
    assert json.loads(good.output["body"]["body"]) == {"t": "***", "who": "me"}
    assert not mentions(good.output)
    bad = (await steps_of(engine, bad_run))["call"]
    assert bad.status == StepStatus.FAILED and bad.error == "HTTP 500: bad credential: Bearer ***"
    assert (await engine.runs.get(bad_run, ME)).error.endswith("Bearer ***")
    for run_id in (good_run, bad_run):
        assert not mentions([(e.message, e.data) for e in await events_of(engine, run_id)])
    assert_nowhere(await every_row_as_text(database))


async def test_a_worker_gets_the_value_and_what_it_echoes_is_masked(engine: Engine,
                                                                    database: Database) -> None:
    await engine.secrets.put(ADMIN, "default", "token", VALUE)
    await engine.workflows.create(wf("work", [task("t", {"auth": "Bearer {{ secrets.token }}", "n": 1})]), ME)
    runs = [await trigger(engine, "work") for _ in range(3)]
    leases = await engine.leases.acquire("q", "w1", 60, 10, ME)
    assert sorted(lease.run.id for lease in leases) == sorted(runs)
    for lease in leases:
        assert lease.config == {"auth": f"Bearer {VALUE}", "n": 1}  # what the worker is sent
        assert lease.step.input == {"auth": "Bearer ***", "n": 1}  # what is kept
    done, failed, released = leases
    await engine.leases.complete(done.step.id, 1, "w1", {"echo": done.config, VALUE: "as a key"}, ME)
    await engine.leases.fail(failed.step.id, 1, "w1", f"could not log in with {done.config['auth']}",
                             False, ME)
    await engine.leases.release(released.step.id, 1, "w1", f"giving back {VALUE}", ME)

    steps = {lease.run.id: (await steps_of(engine, lease.run.id))["t"] for lease in leases}
    assert steps[done.run.id].output == {"echo": {"auth": "Bearer ***", "n": 1}, "***": "as a key"}
    assert steps[failed.run.id].error == "could not log in with Bearer ***"
    assert await status(engine, failed.run.id) == RunStatus.FAILED
    assert steps[released.run.id].error == "attempt 1 lost: released by 'w1': giving back ***"
    (again,) = await engine.leases.acquire("q", "w2", 60, 10, ME)  # offered again, with the value
    assert again.config["auth"] == f"Bearer {VALUE}" and again.step.attempt == 2
    assert_nowhere(await every_row_as_text(database))


async def test_a_template_error_quoting_the_value_is_masked(engine: Engine, database: Database) -> None:
    await engine.secrets.put(ADMIN, "default", "token", VALUE)
    await engine.workflows.create(wf("odd", [task("t", {"x": "{{ payload[secrets.token] }}"})]), ME)
    run_id = await trigger(engine, "odd")
    assert await engine.leases.acquire("q", "w", 60, 1, ME) == []
    step = (await steps_of(engine, run_id))["t"]
    assert step.status == StepStatus.FAILED and "no such key '***'" in step.error
    assert_nowhere(await every_row_as_text(database))


async def test_an_unknown_secret_fails_the_attempt_for_good_naming_it(engine: Engine, server: Server) -> None:
    await engine.workflows.create(wf("call", [http("call", {"url": server.url("/?k={{ secrets.nope }}")},
                                                   attempts=3)]), ME)
    run_id = await trigger(engine, "call")
    assert await engine.http.run_once() == 0  # failed as it started: no request
    step = (await steps_of(engine, run_id))["call"]
    assert (step.status, step.attempt) == (StepStatus.FAILED, 1)  # 3 attempts allowed, none retried
    assert step.error == "SECRET_NOT_FOUND: secret 'nope' is not set in project 'default'"
    failed = [e for e in await events_of(engine, run_id) if e.type == "step.failed"]
    assert failed[-1].data["reason"] == "SECRET_NOT_FOUND"
    assert server.requests == []

    # Set in another project only: still not this run's.
    await engine.secrets.put(ADMIN, "elsewhere", "nope", "x")
    await engine.steps.retry(run_id, "call", ME)
    await engine.tick()
    assert await engine.http.run_once() == 0
    assert "SECRET_NOT_FOUND" in (await steps_of(engine, run_id))["call"].error


async def test_a_value_sealed_under_another_key_or_for_another_row_does_not_open(
        make_engine: Callable[..., Engine], database: Database) -> None:
    key_a, key_b = new_key_text(), new_key_text()
    a = make_engine(secret_key=key_a)
    await a.secrets.put(ADMIN, "default", "token", VALUE)
    await a.secrets.put(ADMIN, "other", "token", "the other project's")
    await a.workflows.create(wf("work", [task("t", {"auth": "{{ secrets.token }}"})]), ME)
    await a.workflows.create(wf("work", [task("t", {"auth": "{{ secrets.token }}"})], project_id="other"), ME)

    b = make_engine(secret_key=key_b)  # a replica with the wrong key
    run_id = await trigger(b, "work")
    assert await b.leases.acquire("q", "w", 60, 1, ME) == []
    step = (await steps_of(b, run_id))["t"]
    assert step.status == StepStatus.FAILED and step.error.startswith("SECRET_UNREADABLE: secret 'token' ")

    # A sealed value copied into another project's row does not open there either (it is bound
    # to its project and name), so a database writer cannot move one project's credential.
    async with database.write() as conn:
        sealed = (await conn.execute(SecretRow.__table__.select().where(
            SecretRow.project_id == "default"))).mappings().one()["ciphertext"]
        await conn.execute(update(SecretRow).where(SecretRow.project_id == "other").values(ciphertext=sealed))
    run_other = await trigger(a, "work", project_id="other")
    assert await a.leases.acquire("q", "w", 60, 5, ME) == []
    assert (await steps_of(a, run_other))["t"].error.startswith("SECRET_UNREADABLE")


async def test_a_replaced_value_is_what_the_next_attempt_gets(engine: Engine, clock: ManualClock) -> None:
    await engine.secrets.put(ADMIN, "default", "token", "old value")
    await engine.workflows.create(wf("work", [task("t", {"auth": "{{ secrets.token }}"}, attempts=2)]), ME)
    await trigger(engine, "work")
    (first,) = await engine.leases.acquire("q", "w", 60, 1, ME)
    await engine.secrets.put(ADMIN, "default", "token", "new value")
    await engine.leases.fail(first.step.id, 1, "w", "no", True, ME)
    clock.advance(60)  # the retry's backoff
    (second,) = await engine.leases.acquire("q", "w", 60, 1, ME)
    assert (first.config["auth"], second.config["auth"]) == ("old value", "new value")
