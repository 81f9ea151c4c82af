"""Hostile REST requests against `conveyor serve` and its real Envoy (issue 5, item 3): each
answers a 4xx JSON error with a stable reason, never a 5xx nor exception text, and stores
nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from typing import Any

import httpx

from conveyor.domain.limits import Limits
from tests.system.conftest import SpawnFactory

LIMITS = Limits()
DEPLOY = {"name": "deploy", "steps": [{"ref": "build", "kind": "noop"},
                                      {"ref": "gate", "kind": "input", "depends_on": ["build"]}]}
# Text that must never reach a client (SPEC §1.1).
LEAKS = ("Traceback", "DecodeError", "Error parsing", "Exception", "<class", "upb", "SERVER:")


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def reason(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    return str(next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo")))


def assert_refused(response: httpx.Response, status: int, expected_reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert not any(leak in response.text for leak in LEAKS), response.text[:500]
    assert reason(response) == expected_reason, response.text[:500]
    body: dict[str, Any] = response.json()
    return body


def violations(body: dict[str, Any]) -> list[str]:
    return [v["field"] for d in body["details"] if d["@type"].endswith("BadRequest")
            for v in d["fieldViolations" if "fieldViolations" in d else "field_violations"]]


async def raw_request(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    """A request over a bare socket: the status and the body of the response.

    For URLs over 64 KB (httpx refuses them), and for bodies Envoy refuses before reading them
    whole: it answers 413 at once and closes, so the body is written while the response is read
    (as curl does), and a write cut short by the close is expected.
    """
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode())
            for start in range(0, len(body), 65536):
                writer.write(body[start:start + 65536])
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
        # Read by Content-Length, not to EOF: the reset that follows Envoy's close would
        # discard a response read to the end of the stream.
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        text = (await reader.readexactly(length)).decode()
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
    return status, text


async def test_hostile_rest_requests_are_4xx_json_and_store_nothing(spawn: SpawnFactory, db_url: str) -> None:
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=30) as client):
        assert (await client.post("/v1/workflows", json=DEPLOY)).status_code == 200

        # Definitions: unknown fields are named, not dropped; a string is not a bool; templates
        # must close; steps may only read steps they depend on.
        misspelt = {"name": "typo", "steps": [{"ref": "a", "kind": "noop", "timeout_second": 60}]}
        body = assert_refused(await client.post("/v1/workflows", json=misspelt), 400, "UNKNOWN_FIELD")
        assert "steps[0].timeout_second" in violations(body)
        string_bool = {"name": "sb", "variables": [{"name": "v", "required": "true"}],
                       "steps": [{"ref": "a", "kind": "noop"}]}
        body = assert_refused(await client.post("/v1/workflows", json=string_bool), 400, "INVALID_FIELD")
        assert "variables[0].required" in violations(body)
        unclosed = {"name": "uc",
                    "steps": [{"ref": "a", "kind": "noop", "config": {"output": "{{ payload.x"}}]}
        assert_refused(await client.post("/v1/workflows", json=unclosed), 400, "INVALID_WORKFLOW")
        unknown_ref = {"name": "ur", "steps": [{"ref": "a", "kind": "noop", "when": "steps.ghost.output.ok"}]}
        assert_refused(await client.post("/v1/workflows", json=unknown_ref), 400, "INVALID_WORKFLOW")
        update = await client.put("/v1/workflows/deploy", json={**DEPLOY, "colour": "blue"})
        assert_refused(update, 400, "UNKNOWN_FIELD")

        # Triggers: deep, NUL, long, unknown, string bools, a forged body field.
        bad_triggers = [
            ({"payload": nested(33)}, 400, "JSON_TOO_DEEP"),
            ({"payload": nested(98)}, 400, "JSON_TOO_DEEP"),
            ({"payload": {"x": "a\u0000b"}}, 400, "INVALID_CHARACTER"),
            ({"tags": {"team": "we\u0000b"}}, 400, "INVALID_CHARACTER"),
            ({"tags": {"k" * 100_000: "v"}}, 400, "FIELD_TOO_LONG"),
            ({"entity_id": "e\u0000"}, 400, "INVALID_CHARACTER"),
            ({"run_as": "r" * 100_000}, 400, "FIELD_TOO_LONG"),
            ({"idempotency_key": "\u0000"}, 400, "INVALID_CHARACTER"),
            ({"timeout_second": 60}, 400, "UNKNOWN_FIELD"),
            ({"check_conditions": "true"}, 400, "INVALID_FIELD"),
            ({"payload": [1, 2]}, 400, "INVALID_FIELD"),
            ({"tags": {f"t{i}": "v" for i in range(LIMITS.max_tags + 1)}}, 400, "TOO_MANY_VALUES"),
        ]
        for trigger, status, expected in bad_triggers:
            response = await client.post("/v1/workflows/deploy/runs", json=trigger)
            assert_refused(response, status, expected)
        not_json = await client.post("/v1/workflows/deploy/runs", content=b'{"payload": NaN}')
        assert_refused(not_json, 400, "INVALID_JSON")
        nul_header = await client.post("/v1/workflows/deploy/runs", json={},
                                       headers={"Idempotency-Key": "k" * 1000})
        assert_refused(nul_header, 400, "FIELD_TOO_LONG")

        # Bodies Envoy transcodes itself: nested past protobuf's limit, the server cannot decode.
        for depth in (40, 98):
            deep_input = await client.post("/v1/workflow-runs/nope/steps/gate/input",
                                           json={"data": nested(depth)})
            assert deep_input.status_code == 400, deep_input.text[:300]
            assert not any(leak in deep_input.text for leak in LEAKS), deep_input.text[:300]

        # Oversized bodies: 413 REQUEST_TOO_LARGE as JSON, raw or transcoded alike.
        ten_mb = "x" * (10 * 1024 * 1024)
        oversized = (("/v1/workflows/deploy/runs", {"payload": {"x": ten_mb}}),
                     ("/v1/workflow-runs/nope/steps/gate/force-complete", {"result": {"x": ten_mb}}))
        for path, document in oversized:
            status, text = await raw_request(served.rest_url, "POST", path, json.dumps(document).encode())
            assert status == 413 and json.loads(text)["details"][0]["reason"] == "REQUEST_TOO_LARGE", text

        # Under Envoy's limit but over what the request may need: refused on their length (a
        # trigger) or their count (steps) before anything in them is converted.
        numbers = b'{"payload": {"l": [' + b",".join([b"1"] * 1_900_000) + b"]}}"  # 3.8 MB
        status, text = await raw_request(served.rest_url, "POST", "/v1/workflows/deploy/runs", numbers)
        assert status == 413 and json.loads(text)["details"][0]["reason"] == "REQUEST_TOO_LARGE", text
        padded = b'{"payload": {"l": [' + b",".join([b"1"] * 750_000) + b"]}}"  # 1.5 MB, under 2 MiB
        body = assert_refused(await client.post("/v1/workflows/deploy/runs", content=padded),
                              400, "REQUEST_TOO_LARGE")
        assert violations(body) == ["body"]
        # Over max_payload_bytes as JSON, under the trigger body bound (4 x that, and more).
        compact = b'{"payload": {"l": [' + b",".join([b"1"] * (LIMITS.max_payload_bytes // 2 + 1000)) + b"]}}"
        body = assert_refused(await client.post("/v1/workflows/deploy/runs", content=compact),
                              400, "JSON_TOO_LARGE")
        assert violations(body) == ["payload"]
        chain = [{"ref": f"s{i}", "kind": "noop", **({"depends_on": [f"s{i - 1}"]} if i else {})}
                 for i in range(3 * LIMITS.max_steps)]
        body = assert_refused(await client.post("/v1/workflows", json={"name": "chain", "steps": chain}),
                              400, "TOO_MANY_VALUES")
        assert violations(body) == ["steps"]

        # Lists: forged cursors, too many filters, bad filter syntax.
        forged_tokens = [base64.urlsafe_b64encode(json.dumps(v).encode()).decode()
                         for v in ({"a": 1}, ["not-a-date", "x"], [1, 2], ["2026-01-01T00:00:00", "x"])]
        for token in [*forged_tokens, "%%%", "A" * 5000]:
            assert_refused(await client.get("/v1/workflow-runs", params={"page_token": token}),
                           400, "INVALID_PAGE_TOKEN" if len(token) < 1000 else "FIELD_TOO_LONG")
        many_tags = "&".join(f"tag=k{i}:v" for i in range(1000))
        assert_refused(await client.get(f"/v1/workflow-runs?{many_tags}"), 400, "TOO_MANY_VALUES")
        assert_refused(await client.get("/v1/workflow-runs?tag=nocolon"), 400, "INVALID_TAG_FILTER")

        # Long URLs: never a random 429 (the URL is no longer forwarded as gRPC metadata).
        for _ in range(10):
            assert_refused(await client.get("/v1/workflow-runs/" + "r" * 10_000), 400, "FIELD_TOO_LONG")
        status, text = await raw_request(served.rest_url, "GET", "/v1/workflow-runs/" + "r" * 100_000)
        assert status == 431 and json.loads(text)["details"][0]["reason"] == "REQUEST_HEADERS_TOO_LARGE"

        # Nothing of the above was stored.
        runs = await client.get("/v1/workflow-runs")
        assert runs.status_code == 200 and runs.json() == []
        workflows = await client.get("/v1/workflows")
        assert [w["name"] for w in workflows.json()] == ["deploy"]
        assert (await client.get("/v1/workflows/deploy")).json()["version"] == 1

        # And the server still serves normal requests, with the JSON shapes unchanged.
        ok = await client.post("/v1/workflows/deploy/runs?project_id=default",
                               json={"payload": {"env": "prod"}, "maxParallelSteps": 1, "tags": {"t": "v"}})
        assert ok.status_code == 200, ok.text
        assert ok.json()["max_parallel_steps"] == 1 and ok.json()["tags"] == {"t": "v"}


async def test_runs_with_large_or_deep_outputs_read_back_whole(spawn: SpawnFactory, db_url: str) -> None:
    """A run whose steps produce big outputs, one too big and one too deep to keep (both fail
    with OUTPUT_TOO_LARGE), reads back through Envoy as complete JSON on every read endpoint
    (issue 5: such runs made GET 500/502 and lists answer 200 with an empty or cut body)."""
    blob = "x" * (LIMITS.max_payload_bytes - 1024)
    big = {"out": "{{ payload.blob }}"}
    too_big = {f"o{i}": "{{ payload.blob }}" for i in range(LIMITS.max_output_bytes // len(blob) + 1)}
    # A CEL list one level deeper than a stored document may be (the parser allows it).
    too_deep = "[" * (LIMITS.max_json_depth + 1) + "1" + "]" * (LIMITS.max_json_depth + 1)
    workflow = {"name": "heavy", "steps": [
        {"ref": "a", "kind": "noop", "config": {"output": big}},
        {"ref": "b", "kind": "noop", "config": {"output": big}},
        {"ref": "wide", "kind": "noop", "depends_on": ["a", "b"], "config": {"output": too_big}},
        {"ref": "deep", "kind": "condition", "depends_on": ["a"], "config": {"expression": too_deep}}]}
    async with (spawn(db_url, envoy=True) as served,
                httpx.AsyncClient(base_url=served.rest_url, headers=served.headers, timeout=30) as client):
        assert (await client.post("/v1/workflows", json=workflow)).status_code == 200, workflow
        runs = [(await client.post("/v1/workflows/heavy/runs", json={"payload": {"blob": blob}})).json()
                for _ in range(3)]
        for run in runs:
            got = await client.get(f"/v1/workflow-runs/{run['id']}")
            assert got.status_code == 200 and got.json()["status"] == "failed", got.text[:300]
            listed_steps = (await client.get(f"/v1/workflow-runs/{run['id']}/steps")).json()
            steps = {s["step_ref"]: s for s in listed_steps}
            assert steps["a"]["output"] == {"out": blob} and steps["b"]["status"] == "completed"
            for ref in ("wide", "deep"):
                assert steps[ref]["status"] == "failed" and steps[ref]["error"].startswith("OUTPUT_TOO_LARGE")
            events = (await client.get(f"/v1/workflow-runs/{run['id']}/events")).json()
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        listed = await client.get("/v1/workflow-runs", params={"workflow_id": "heavy", "limit": 10})
        assert listed.status_code == 200 and {r["id"] for r in listed.json()} == {r["id"] for r in runs}
