"""Run families (domain/families.py), the engine's own actors (domain/actors.py) and how a
notification recognises this server's webhooks (domain/notifications.py): the lineage header a
webhook trusts only when this server signed it, the loop and depth rules, the names `run_as`
may not claim, the own-URL match and a Conveyor refusal in a response body."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.api.caller import ANONYMOUS, WEBHOOK
from conveyor.cli import keys as cli_keys
from conveyor.domain import actors
from conveyor.domain.errors import ConveyorError, ErrorKind
from conveyor.domain.families import (
    NESTING_TOO_DEEP,
    WORKFLOW_LOOP,
    Cause,
    refusal,
    sign_cause,
    verified_cause,
)
from conveyor.domain.notifications import conveyor_refusal, own_webhook_token
from conveyor.domain.planner import ENGINE
from conveyor.engine.notify import ACTOR as NOTIFY_ACTOR
from conveyor.engine.schedules import SCHEDULE

SECRET = "s3cret"
CAUSE = Cause("run-1", ("wf-a", "wf-b"), 1)
TOKEN = "whk_" + "A" * 43


# -- the lineage header -------------------------------------------------------------------------

def test_a_signed_cause_comes_back_whole() -> None:
    assert verified_cause(SECRET, sign_cause(SECRET, CAUSE)) == CAUSE
    assert verified_cause(SECRET, "  " + sign_cause(SECRET, CAUSE) + " ") == CAUSE


def test_a_header_this_server_did_not_sign_counts_for_nothing() -> None:
    header = sign_cause(SECRET, CAUSE)
    version, data, mac = header.split(".")
    forged_doc = json.dumps({"run": "run-1", "lineage": [], "depth": 0}).encode()
    forged = base64.urlsafe_b64encode(forged_doc).rstrip(b"=").decode()
    for bad in (
        sign_cause("another server's secret", CAUSE),
        f"{version}.{forged}.{mac}",  # the data changed under the old MAC
        f"{version}.{data}.{mac[:-1]}0" if mac[-1] != "0" else f"{version}.{data}.{mac[:-1]}1",
        f"v2.{data}.{mac}", f"{data}.{mac}", f"{version}.{data}.{mac}.x", "", "v1..", "garbage",
        f"v1.{data}.{'0' * 64}", header + "x" * 5000,
    ):
        assert verified_cause(SECRET, bad) is None, bad
    assert verified_cause("", header) is None  # no secret: nothing is trusted


def test_a_signed_header_of_the_wrong_shape_is_refused_not_crashed_on() -> None:
    # Only this server signs, but a bug that signed a wrong shape must not become a 500.
    from conveyor.domain import families

    for doc in (b"[]", b"{}", b'{"run": 1, "lineage": [], "depth": 0}',
                b'{"run": "r", "lineage": "ab", "depth": 0}', b'{"run": "r", "lineage": [1], "depth": 0}',
                b'{"run": "r", "lineage": [], "depth": true}', b'{"run": "r", "lineage": [], "depth": "1"}',
                b"\xff\xfe", b"not json"):
        data = base64.urlsafe_b64encode(doc).rstrip(b"=").decode()
        assert verified_cause(SECRET, f"v1.{data}.{families._mac(SECRET, data)}") is None, doc


@given(st.text(max_size=300))
def test_no_text_breaks_the_header_check(text: str) -> None:
    assert verified_cause(SECRET, text) is None


# -- the loop and depth rules -------------------------------------------------------------------

def test_a_workflow_its_family_reached_before_is_a_loop_and_depth_is_capped() -> None:
    assert refusal(("a", "b"), 1, "b", "bee", "run-1", 10, "x") == (
        WORKFLOW_LOOP, "workflow 'bee' would start itself (through run run-1)")
    assert refusal(("a", "b"), 1, "a", "ay", "run-1", 10, "x") == (
        WORKFLOW_LOOP, "workflow 'ay' would start itself (through run run-1)")
    assert refusal(("a", "b"), 1, "c", "c", "run-1", 10, "x") is None
    assert refusal(("a", "b"), 1, "c", "c", "run-1", 2, "x") is None  # depth 2 is allowed at 2
    assert refusal(("a", "b", "c"), 2, "d", "d", "run-1", 2, "runs by notifications") == (
        NESTING_TOO_DEEP, "runs by notifications nest at most 2 deep")


# -- the engine's own actors --------------------------------------------------------------------

def test_every_actor_the_engine_records_is_reserved() -> None:
    # The names the engine, the API and the CLI record when no key acted (a test, so a new one
    # is not forgotten): `run_as` may claim none of them.
    names = [ENGINE, SCHEDULE, NOTIFY_ACTOR, WEBHOOK.name, ANONYMOUS.name, cli_keys._LOCAL,
             "engine:http:host-1:4242"]  # the http executor's lease holder, a report's actor
    for name in names:
        assert actors.is_reserved(name), name


@pytest.mark.parametrize("claimed", [
    "schedule", "webhook", "engine", "Schedule", "WEBHOOK", " engine", "engine ", "\tschedule\n",
    "\u00a0webhook\u2003", "sch\u200bedule", "\ufeffengine", "ENGINE:notify", "engine:http:x",
    "anonymous", "Anonymous ", "conveyor-cli", *("".join(chr(ord(c) + 0xFEE0) for c in name)
                                                 for name in ("schedule", "ENGINE")),  # fullwidth
])
def test_run_as_may_not_claim_an_engine_actor(claimed: str) -> None:
    with pytest.raises(ConveyorError) as e:
        actors.check_run_as(claimed)
    assert e.value.kind == ErrorKind.INVALID_ARGUMENT and e.value.reason == "RUN_AS_RESERVED"
    assert [v.field for v in e.value.violations] == ["run_as"]


@pytest.mark.parametrize("person", ["", "alice", "scheduler", "web hook", "engineer", "engine-room",
                                    "my engine", "webhooks", "schedule-bot", "ops@example.com"])
def test_run_as_may_name_anybody_else(person: str) -> None:
    actors.check_run_as(person)


# -- recognising this server's own webhooks -----------------------------------------------------

BASES = ["http://127.0.0.1:8080", "https://conveyor.example.com/ci/"]


@pytest.mark.parametrize(("url", "token"), [
    (f"http://127.0.0.1:8080/v1/webhooks/{TOKEN}", TOKEN),
    (f"HTTP://127.0.0.1:8080/v1/webhooks/{TOKEN}?x=1#f", TOKEN),
    (f"https://Conveyor.Example.com/ci/v1/webhooks/{TOKEN}", TOKEN),
    (f"https://conveyor.example.com.:443/ci/v1/webhooks/{TOKEN}", TOKEN),
    ("http://127.0.0.1:8080/v1/webhooks/whk_%41", "whk_A"),
    (f"http://127.0.0.1:8081/v1/webhooks/{TOKEN}", None),  # another port
    (f"https://127.0.0.1:8080/v1/webhooks/{TOKEN}", None),  # another scheme
    (f"http://localhost:8080/v1/webhooks/{TOKEN}", None),  # another spelling: the header's job
    (f"https://conveyor.example.com/v1/webhooks/{TOKEN}", None),  # outside the base's path
    (f"http://127.0.0.1:8080/v1/webhooks/{TOKEN}/x", None),
    ("http://127.0.0.1:8080/v1/webhooks/", None),
    (f"http://127.0.0.1:8080/v1/workflows/{TOKEN}", None),
    ("http://[::1/v1/webhooks/x", None),  # malformed
    ("http://127.0.0.1:99999/v1/webhooks/x", None),
])
def test_own_webhook_urls_are_recognised(url: str, token: str | None) -> None:
    assert own_webhook_token(url, BASES) == token


def test_a_malformed_base_is_skipped() -> None:
    assert own_webhook_token(f"http://a:1/v1/webhooks/{TOKEN}", ["http://[::1", "", "http://a:1"]) == TOKEN


def test_a_conveyor_refusal_is_read_from_a_response_body() -> None:
    body = {"code": 9, "message": "workflow 'w' would start itself (through run r)",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "domain": "conveyor.dev",
                         "reason": "WORKFLOW_LOOP", "metadata": {}}]}
    assert conveyor_refusal(json.dumps(body).encode()) == (
        "WORKFLOW_LOOP", "workflow 'w' would start itself (through run r)")
    other = {**body, "details": [{**body["details"][0], "domain": "example.com"}]}
    for not_ours in (json.dumps(other).encode(), b"", b"<html>", b"[]", b'{"details": 1}', b"{" * 5000,
                     b'{"details": [1, {"@type": "x"}]}', b"\xff"):
        assert conveyor_refusal(not_ours) is None
