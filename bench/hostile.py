"""Hostile inputs against a live server (issue 5): for each class of bad input, what the server
answers and how long it takes, and whether a normal client issuing requests at the same moment
was delayed. Target: no class delays another client by more than 100 ms.

Starts `conveyor serve` with its Envoy on a fresh SQLite file (common.spawn_server), creates a
normal workflow and one run of it, and starts a probe in its own process (so nothing the bench
does to build or send hostile requests slows the probe down): every 10 ms it issues a GetWorkflowRun
of that run and a TriggerWorkflowRun of that workflow over gRPC, without waiting for earlier calls
(open loop, at most 100 in flight per kind), recording when each started and how long it took.

Then, class after class: 0.5 s of quiet (the probe alone; the baseline p50 is taken over all of
these quiet windows together, and each class's own is printed too, showing spill-over), then
the class's hostile requests over REST through Envoy and over gRPC where it applies, sent back to
back by one client and repeated for at least 1 s (once for those that create something); classes
that make the engine work at run time (CEL in a `when`, a condition step or the workflow
condition, a 1,000-step chain, outputs too large or too deep) trigger a run and wait until it is
finished, and the reads of those runs (GET, list, steps, events) are a class of their own.
Per class it prints each hostile request's answer (HTTP status or gRPC code, the ErrorInfo reason)
and its worst response time, and the probe calls that overlapped the class's window: baseline
p50, p99 and worst latency during the window, and delay = worst - baseline p50, next to the
target. Two control classes (no hostile request at all) show the noise floor of the machine.
At the end: every 5xx (or gRPC INTERNAL/UNKNOWN/UNAVAILABLE), every refusal expected but
not given, and what is stored (workflows and runs, by workflow) against what should be.

The machine has 2 cores shared with the server, Envoy, the probe and this client (and, on a
shared machine, other work): latencies include scheduling noise; the load average is printed.

Run: .venv/bin/python bench/hostile.py [--window 1.0]
Exits 0 whether or not the target is met (it reports, it does not assert), 1 if it crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import common
import grpc
import httpx
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc

TARGET_MS = 100.0
PROBE_INTERVAL = 0.010
PROBE_MAX_IN_FLIGHT = 100
QUIET = 0.5
RUN_TIMEOUT = 60.0
PROBE_WORKFLOW = "probe"
TARGET_WORKFLOW = "target"  # hostile triggers aim here: it must end with no runs
FORTY = ",".join(str(i) for i in range(40))
NESTED_MAP = f"[{FORTY}].map(x, [{FORTY}].map(y, [{FORTY}].map(z, x*y*z)))"
BIG_STRING = "x" * 200_000
FINAL = {pb.RunStatus.completed, pb.RunStatus.failed, pb.RunStatus.timed_out, pb.RunStatus.canceled}
BAD_GRPC = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}


# --- the probe (its own process) --------------------------------------------------------------


def probe_process(target: str, run_id: str, stop: EventType, out: Any) -> None:
    out.put(asyncio.run(_probe(target, run_id, stop)))


async def _probe(target: str, run_id: str, stop: EventType) -> list[tuple[str, float, float, str]]:
    """(kind, started at [wall clock], latency [s], error) of every probe call."""
    samples: list[tuple[str, float, float, str]] = []
    async with common.open_channel(target) as channel:
        runs = runs_grpc.WorkflowRunsServiceStub(channel)
        get = runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id)
        trigger = runs_pb.TriggerWorkflowRunRequest(workflow_id=PROBE_WORKFLOW)
        in_flight = {"get": 0, "trigger": 0}

        async def call(kind: str) -> None:
            in_flight[kind] += 1
            started, t0 = time.time(), time.perf_counter()
            error = ""
            try:
                if kind == "get":
                    await runs.GetWorkflowRun(get, timeout=30)
                else:
                    await runs.TriggerWorkflowRun(trigger, timeout=30)
            except grpc.aio.AioRpcError as e:
                error = e.code().name
            samples.append((kind, started, time.perf_counter() - t0, error))
            in_flight[kind] -= 1

        await runs.GetWorkflowRun(get, timeout=30)  # connected before the clock matters
        tasks: set[asyncio.Task[None]] = set()
        next_at = time.perf_counter()
        while not stop.is_set():
            for kind in ("get", "trigger"):
                if in_flight[kind] < PROBE_MAX_IN_FLIGHT:
                    task = asyncio.create_task(call(kind))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            next_at += PROBE_INTERVAL
            now = time.perf_counter()
            if next_at < now:  # late (the probe's own loop was starved): no burst to catch up
                next_at = now
            await asyncio.sleep(next_at - now)
        await asyncio.gather(*tasks)
    return samples


# --- hostile requests ---------------------------------------------------------------------------


@dataclass
class Outcome:
    label: str
    answer: str  # "HTTP 400 INVALID_PAGE_TOKEN", "gRPC INVALID_ARGUMENT JSON_TOO_DEEP", "HTTP 200"
    ms: float
    ok: bool  # 2xx / gRPC OK
    bad: bool  # 5xx or gRPC INTERNAL/UNKNOWN/UNAVAILABLE: never acceptable
    note: str = ""


@dataclass
class Request:
    label: str
    send: Callable[[], Awaitable[tuple[str, bool, bool, str]]]
    refused: bool = True  # expected to be refused (4xx / a gRPC error)


@dataclass
class ClassResult:
    name: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    quiet: tuple[float, float] = (0.0, 0.0)
    window: tuple[float, float] = (0.0, 0.0)
    sent: int = 0


def rest_reason(text: str) -> str:
    with contextlib.suppress(Exception):
        body = json.loads(text)
        return str(next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo")))
    return ""


def rest_answer(status: int, text: str) -> tuple[str, bool, bool, str]:
    ok = 200 <= status < 300
    answer = f"HTTP {status}" + ("" if ok else f" {rest_reason(text) or '(no reason) ' + text[:80]!s}")
    return answer, ok, status >= 500, ""


def grpc_answer(error: grpc.aio.AioRpcError) -> tuple[str, bool, bool, str]:
    reason = ""
    with contextlib.suppress(Exception):
        status = rpc_status.from_call(error)
        for detail in status.details if status else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
    code = error.code().name
    text = reason or f"({(error.details() or '')[:80]})"
    return f"gRPC {code} {text}", False, code in BAD_GRPC, ""


async def raw_request(url: str, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    """A request over a bare socket (URLs over httpx's 64 KB, and bodies Envoy refuses before
    reading them whole: it answers 413 at once and closes, so the body is written while the
    response is read, as curl does). The status and the body of the response."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode())
            for start in range(0, len(body), 65536):
                writer.write(body[start : start + 65536])
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
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


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _length_delimited(number: int, payload: bytes) -> bytes:
    length, size = b"", len(payload)
    while True:
        byte, size = size & 0x7F, size >> 7
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            return bytes([number << 3 | 2]) + length + payload


def deep_struct_bytes(depth: int) -> bytes:
    """A serialized Struct `depth` levels deep, written by hand (protobuf's API refuses to build
    one past its recursion limit; a hostile client does not need that API)."""
    struct = b""
    for _ in range(depth):
        value = _length_delimited(5, struct)
        entry = _length_delimited(1, b"a") + _length_delimited(2, value)
        struct = _length_delimited(1, entry)
    return struct


def forged(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


class Hostile:
    """The hostile requests, over one httpx client (REST through Envoy) and one gRPC channel."""

    def __init__(self, rest: httpx.AsyncClient, rest_url: str, channel: grpc.aio.Channel) -> None:
        self.rest = rest
        self.rest_url = rest_url
        self.channel = channel
        self.runs = runs_grpc.WorkflowRunsServiceStub(channel)
        self.steps = steps_grpc.StepRunsServiceStub(channel)
        self.workflows = wf_grpc.WorkflowsServiceStub(channel)

    # Senders return (answer, ok, bad, note); the caller times them.
    def http(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None, params: Any = None
    ) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        content = raw if raw is not None else (None if body is None else json.dumps(body).encode())

        async def send() -> tuple[str, bool, bool, str]:
            response = await self.rest.request(
                method, path, content=content, params=params, headers={"content-type": "application/json"}
            )
            return rest_answer(response.status_code, response.text)

        return send

    def socket(
        self, method: str, path: str, body: bytes = b""
    ) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        async def send() -> tuple[str, bool, bool, str]:
            status, text = await raw_request(self.rest_url, method, path, body)
            return rest_answer(status, text)

        return send

    def unary(
        self, method: Callable[..., Any], request: Any
    ) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        async def send() -> tuple[str, bool, bool, str]:
            try:
                await method(request, timeout=60)
            except grpc.aio.AioRpcError as e:
                return grpc_answer(e)
            return "gRPC OK", True, False, ""

        return send

    def stream(
        self, method: Callable[..., Any], request: Any
    ) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        async def send() -> tuple[str, bool, bool, str]:
            try:
                count = len([item async for item in method(request, timeout=60)])
            except grpc.aio.AioRpcError as e:
                return grpc_answer(e)
            return "gRPC OK", True, False, f"{count} items"

        return send

    def raw_unary(
        self, path: str, request: bytes, reply: Callable[[bytes], Any]
    ) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        call = self.channel.unary_unary(path, request_serializer=lambda raw: raw, response_deserializer=reply)
        return self.unary(call, request)


def definition(name: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": steps, **extra}


def grpc_workflow(doc: dict[str, Any]) -> wf_pb.CreateWorkflowRequest:
    return wf_pb.CreateWorkflowRequest(workflow=json_format.ParseDict(doc, pb.Workflow()))


def grpc_trigger(workflow: str, **fields: Any) -> runs_pb.TriggerWorkflowRunRequest:
    payload = fields.pop("payload", None)
    request = runs_pb.TriggerWorkflowRunRequest(workflow_id=workflow, **fields)
    if payload is not None:
        request.payload.update(payload)
    return request


def hostile_classes(h: Hostile) -> list[tuple[str, list[Request], bool]]:
    """(class, requests, repeat) in order; `repeat`: send again until the window is long enough."""
    trigger_path = f"/v1/workflows/{TARGET_WORKFLOW}/runs"
    runs, workflows = h.runs, h.workflows
    tokens = [
        "!!!not base64!!!",
        forged({"a": 1}),
        forged(["not a time", "id"]),
        forged(["2026-01-01T00:00:00+00:00", 10**30]),
        forged([[[[[[[[[[]]]]]]]]]]),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ]
    many_tags = "&".join(f"tag=k{i}:v" for i in range(1000))
    ten_mb = "x" * (10 * 1024 * 1024)
    ten_mb_body = json.dumps({"payload": {"x": ten_mb}}).encode()
    # ~10 MB of protobuf as a million small numbers: far costlier to decode than one string.
    million = runs_pb.TriggerWorkflowRunRequest(workflow_id=TARGET_WORKFLOW)
    million.payload.get_or_create_list("l").extend([1.0] * 1_000_000)
    numbers = ('{"payload": {"l": [' + ",".join(["1"] * 1_900_000) + "]}}").encode()
    result_numbers = ('{"result": {"l": [' + ",".join(["1"] * 1_900_000) + "]}}").encode()
    big_string = grpc_trigger(TARGET_WORKFLOW, payload={"x": ten_mb})
    raw_trigger = runs_pb.TriggerWorkflowRunRequest(workflow_id=TARGET_WORKFLOW).SerializeToString()
    trigger_method = "/conveyor.v1.WorkflowRunsService/TriggerWorkflowRun"
    create_method = "/conveyor.v1.WorkflowsService/CreateWorkflow"
    strings: dict[str, dict[str, Any]] = {
        "tag key 100 KB": {"tags": {"k" * 100_000: "v"}},
        "tag value 100 KB": {"tags": {"k": "v" * 100_000}},
        "entity_id 100 KB": {"entity_id": "e" * 100_000},
        "run_as 100 KB": {"run_as": "r" * 100_000},
        "payload key 100 KB": {"payload": {"k" * 100_000: 1}},
        "NUL in tag key": {"tags": {"k\u0000": "v"}},
        "NUL in tag value": {"tags": {"k": "v\u0000"}},
        "NUL in entity_id": {"entity_id": "e\u0000"},
        "NUL in run_as": {"run_as": "\u0000"},
        "NUL in payload key": {"payload": {"k\u0000": 1}},
    }
    unknown = definition("unknown", [{"ref": "a", "kind": "noop", "timeout_second": 60}])
    unclosed = definition("unclosed", [{"ref": "a", "kind": "noop", "config": {"output": "{{ payload.x"}}])
    terms = "+".join(["1"] * 100_000)
    long_when = definition("terms", [{"ref": "a", "kind": "noop", "when": terms + " > 0"}])
    long_condition = definition(
        "terms2", [{"ref": "a", "kind": "condition", "config": {"expression": terms}}]
    )
    long_template = definition(
        "terms3", [{"ref": "a", "kind": "noop", "config": {"output": "{{ " + terms + " }}"}}]
    )
    three_thousand = definition("chain3000", common.chain(3000))
    return [
        (
            "forged page_tokens",
            [
                *[
                    Request(
                        f"REST runs page_token {t[:12]}",
                        h.http("GET", "/v1/workflow-runs", params={"page_token": t}),
                    )
                    for t in tokens
                ],
                Request(
                    "REST workflows page_token",
                    h.http("GET", "/v1/workflows", params={"page_token": tokens[1]}),
                ),
                Request(
                    "REST page_token 5,000 chars",
                    h.http("GET", "/v1/workflow-runs", params={"page_token": "A" * 5000}),
                ),
                *[
                    Request(
                        f"gRPC runs page_token {t[:12]}",
                        h.stream(runs.ListWorkflowRuns, runs_pb.ListWorkflowRunsRequest(page_token=t)),
                    )
                    for t in tokens[:3]
                ],
            ],
            True,
        ),
        (
            "1,000 tag= filters",
            [
                Request("REST ?tag= x 1,000", h.http("GET", f"/v1/workflow-runs?{many_tags}")),
                Request(
                    "gRPC tag x 1,000",
                    h.stream(
                        runs.ListWorkflowRuns,
                        runs_pb.ListWorkflowRunsRequest(tag=[f"k{i}:v" for i in range(1000)]),
                    ),
                ),
            ],
            True,
        ),
        (
            "payloads nested 33-98 levels",
            [
                *[
                    Request(
                        f"REST trigger payload depth {d}",
                        h.http("POST", trigger_path, {"payload": nested(d)}),
                    )
                    for d in (33, 98)
                ],
                *[
                    Request(
                        f"REST input data depth {d} (Envoy transcodes)",
                        h.http("POST", "/v1/workflow-runs/nope/steps/gate/input", {"data": nested(d)}),
                    )
                    for d in (40, 98)
                ],
                *[
                    Request(
                        f"gRPC trigger payload depth {d}",
                        h.raw_unary(
                            trigger_method,
                            raw_trigger + _length_delimited(3, deep_struct_bytes(d)),
                            pb.WorkflowRun.FromString,
                        ),
                    )
                    for d in (33, 98)
                ],
            ],
            True,
        ),
        (
            "10 MB bodies",
            [
                Request("REST trigger 10 MB", h.socket("POST", trigger_path, ten_mb_body)),
                Request(
                    "REST force-complete 10 MB",
                    h.socket(
                        "POST",
                        "/v1/workflow-runs/nope/steps/gate/force-complete",
                        json.dumps({"result": {"x": ten_mb}}).encode(),
                    ),
                ),
                Request("gRPC trigger 10 MB string", h.unary(runs.TriggerWorkflowRun, big_string)),
            ],
            True,
        ),
        (
            "1,000,000+ small numbers (under the size limits)",
            [
                Request("gRPC trigger 1,000,000 numbers (~11 MB)", h.unary(runs.TriggerWorkflowRun, million)),
                # Under Envoy's 4 MiB: the server parses the trigger's raw body itself ...
                Request("REST trigger 1,900,000 numbers (3.8 MB)", h.http("POST", trigger_path, raw=numbers)),
                # ... and Envoy transcodes a force-complete's result into a Struct for gRPC.
                Request(
                    "REST force-complete 1,900,000 numbers (3.8 MB)",
                    h.http("POST", "/v1/workflow-runs/nope/steps/gate/force-complete", raw=result_numbers),
                ),
            ],
            True,
        ),
        (
            "100 KB strings and NUL bytes",
            [
                *[
                    Request(f"REST {label}", h.http("POST", trigger_path, body))
                    for label, body in strings.items()
                ],
                *[
                    Request(
                        f"gRPC {label}",
                        h.unary(runs.TriggerWorkflowRun, grpc_trigger(TARGET_WORKFLOW, **body)),
                    )
                    for label, body in strings.items()
                ],
                Request(
                    "REST Idempotency-Key 100 KB",
                    h.http("POST", trigger_path, {"idempotency_key": "k" * 100_000}),
                ),
            ],
            True,
        ),
        (
            "unknown definition fields",
            [
                Request("REST steps[0].timeout_second", h.http("POST", "/v1/workflows", unknown)),
                Request("REST trigger timeout_second", h.http("POST", trigger_path, {"timeout_second": 60})),
                Request(
                    "gRPC unknown field 99",
                    h.raw_unary(
                        create_method,
                        grpc_workflow(definition("unknown", common.chain(1))).SerializeToString()
                        + b"\x98\x06\x01",
                        pb.Workflow.FromString,
                    ),
                ),
            ],
            True,
        ),
        (
            "unclosed {{ templates",
            [
                Request("REST create", h.http("POST", "/v1/workflows", unclosed)),
                Request("gRPC create", h.unary(workflows.CreateWorkflow, grpc_workflow(unclosed))),
            ],
            True,
        ),
        (
            "100,000-term CEL expression",
            [
                Request("REST create, when", h.http("POST", "/v1/workflows", long_when)),
                Request("REST create, condition step", h.http("POST", "/v1/workflows", long_condition)),
                Request("REST create, template", h.http("POST", "/v1/workflows", long_template)),
                Request("gRPC create, when", h.unary(workflows.CreateWorkflow, grpc_workflow(long_when))),
                Request(
                    "gRPC create, template", h.unary(workflows.CreateWorkflow, grpc_workflow(long_template))
                ),
            ],
            True,
        ),
        (
            "3,000-step definition",
            [
                Request("REST create", h.http("POST", "/v1/workflows", three_thousand)),
                Request("gRPC create", h.unary(workflows.CreateWorkflow, grpc_workflow(three_thousand))),
            ],
            True,
        ),
        (
            "10 KB and 100 KB URLs",
            [
                Request("REST GET 10 KB run id", h.http("GET", "/v1/workflow-runs/" + "r" * 10_000)),
                Request("REST GET 100 KB URL", h.socket("GET", "/v1/workflow-runs/" + "r" * 100_000)),
                Request(
                    "gRPC GET 10 KB run id",
                    h.unary(runs.GetWorkflowRun, runs_pb.GetWorkflowRunRequest(workflow_run_id="r" * 10_000)),
                ),
                Request(
                    "gRPC GET 100 KB run id",
                    h.unary(
                        runs.GetWorkflowRun, runs_pb.GetWorkflowRunRequest(workflow_run_id="r" * 100_000)
                    ),
                ),
            ],
            True,
        ),
    ]


def nested_template(levels: int, inner: str) -> Any:
    value: Any = inner
    for _ in range(levels):
        value = {"a": value}
    return value


# Run-time classes: definitions that are valid, and what their runs make the engine do.
RUN_TIME_DEFINITIONS: dict[str, dict[str, Any]] = {
    "cel-when": definition(
        "cel-when",
        [
            {"ref": "a", "kind": "noop"},
            {"ref": "b", "kind": "noop", "depends_on": ["a"], "when": NESTED_MAP + ".size() > 0"},
        ],
    ),
    "cel-condition-step": definition(
        "cel-condition-step", [{"ref": "c", "kind": "condition", "config": {"expression": NESTED_MAP}}]
    ),
    "cel-workflow-condition": definition(
        "cel-workflow-condition", [{"ref": "a", "kind": "noop"}], condition=NESTED_MAP + ".size() > 0"
    ),
    "chain1000": definition("chain1000", common.chain(1000)),
    # ~8 MB from one CEL map: refused by the CEL size bound, the step fails.
    "out-map": definition(
        "out-map",
        [{"ref": "c", "kind": "condition", "config": {"expression": "[" + FORTY + "].map(x, payload.s)"}}],
    ),
    # 50 steps of 200 KB each: ~10 MB of run output, over max_run_output_bytes.
    "out-wide": definition(
        "out-wide",
        [{"ref": f"s{i}", "kind": "noop", "config": {"output": {"v": "{{ payload.s }}"}}} for i in range(50)],
    ),
    # A 19-level payload wrapped in 14 more levels by a step, then 14 more by the next: 33, 47.
    "out-deep": definition(
        "out-deep",
        [
            {"ref": "s1", "kind": "noop", "config": {"output": "{{ payload.d }}"}},
            {
                "ref": "s2",
                "kind": "noop",
                "depends_on": ["s1"],
                "config": {"output": nested_template(14, "{{ steps.s1.output }}")},
            },
            {
                "ref": "s3",
                "kind": "noop",
                "depends_on": ["s2"],
                "config": {"output": nested_template(14, "{{ steps.s2.output }}")},
            },
        ],
    ),
}


# --- the bench ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, hostile: Hostile, window: float) -> None:
        self.h = hostile
        self.window = window
        self.results: list[ClassResult] = []
        self.run_ids: dict[str, str] = {}
        self.expected_runs: dict[str, int] = {}

    async def run_class(
        self,
        name: str,
        requests: Sequence[Request],
        repeat: bool,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> ClassResult:
        result = ClassResult(name)
        quiet_start = time.time()
        await asyncio.sleep(QUIET)
        result.quiet = (quiet_start, time.time())
        start = time.time()
        print(f"\n{name}")
        first = True
        if not requests:
            await asyncio.sleep(self.window)
        while requests and (first or (repeat and time.time() - start < self.window)):
            for request in requests:
                t0 = time.perf_counter()
                try:
                    answer, ok, bad, note = await request.send()
                except Exception as e:  # a transport failure is an answer too
                    answer, ok, bad, note = f"client error {type(e).__name__}: {str(e)[:80]}", False, True, ""
                ms = (time.perf_counter() - t0) * 1000
                result.sent += 1
                seen = result.outcomes.get(request.label)
                if seen is None:
                    result.outcomes[request.label] = Outcome(request.label, answer, ms, ok, bad, note)
                else:
                    seen.ms = max(seen.ms, ms)
                    seen.bad |= bad
                    if answer != seen.answer and "also" not in seen.note:
                        seen.note += f" also {answer}"
            first = False
        if then is not None:
            await then()
        result.window = (start, time.time())
        for request in requests:
            o = result.outcomes[request.label]
            flag = ""
            if o.bad:
                flag = "  5xx/INTERNAL!"
            elif request.refused and o.ok:
                flag = "  ACCEPTED (expected a refusal)"
            print(f"  {o.label:44} {o.answer[:58]:58} {o.ms:8.1f} ms{(' ' + o.note) if o.note else ''}{flag}")
        self.results.append(result)
        return result

    async def create(self, doc: dict[str, Any]) -> None:
        response = await self.h.rest.post("/v1/workflows", content=json.dumps(doc).encode())
        if response.status_code != 200:
            raise RuntimeError(f"creating {doc['name']}: HTTP {response.status_code} {response.text[:300]}")

    async def wait_final(self, run_id: str) -> pb.WorkflowRun:
        request = runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id)
        async with asyncio.timeout(RUN_TIMEOUT):
            while True:
                run = await self.h.runs.GetWorkflowRun(request, timeout=30)
                if run.status in FINAL:
                    return run
                await asyncio.sleep(0.02)

    async def run_time_class(
        self, name: str, workflow: str, payload: dict[str, Any] | None = None, **trigger: Any
    ) -> None:
        """Trigger a run of `workflow` over REST and over gRPC and wait until both are finished."""
        runs: list[str] = []
        body = {"payload": payload or {}, **trigger}
        rest_path = f"/v1/workflows/{workflow}/runs"

        async def rest() -> tuple[str, bool, bool, str]:
            response = await self.h.rest.post(rest_path, content=json.dumps(body).encode())
            if response.status_code == 200:
                runs.append(response.json()["id"])
            return rest_answer(response.status_code, response.text)

        async def over_grpc() -> tuple[str, bool, bool, str]:
            try:
                run = await self.h.runs.TriggerWorkflowRun(
                    grpc_trigger(workflow, payload=payload or {}, **trigger), timeout=60
                )
            except grpc.aio.AioRpcError as e:
                return grpc_answer(e)
            runs.append(run.id)
            return "gRPC OK", True, False, ""

        finals: list[pb.WorkflowRun] = []

        async def until_finished() -> None:
            t0 = time.perf_counter()
            finals.extend([await self.wait_final(r) for r in runs])
            self.expected_runs[workflow] = self.expected_runs.get(workflow, 0) + len(runs)
            if runs:
                self.run_ids[workflow] = runs[0]
            print(f"  runs finished {1000 * (time.perf_counter() - t0):.0f} ms after their triggers answered")

        await self.run_class(
            name,
            [Request("REST trigger", rest, refused=False), Request("gRPC trigger", over_grpc, refused=False)],
            False,
            until_finished,
        )
        for run in finals:
            status = pb.RunStatus.Value.Name(run.status)
            steps = [
                s
                async for s in self.h.steps.ListStepRuns(
                    steps_pb.ListStepRunsRequest(workflow_run_id=run.id, limit=1000), timeout=30
                )
            ]
            failed = [s for s in steps if s.error]
            why = (run.status_message or run.error or (failed[0].error if failed else ""))[:110]
            print(f"  run {run.id}: {status}, {len(steps)} step rows; {why}")

    async def reads_class(self) -> None:
        """GET, list, steps and events of the runs with (attempted) hostile outputs: JSON, complete."""
        requests: list[Request] = []
        for workflow in ("out-map", "out-wide", "out-deep", "cel-when", "chain1000"):
            run_id = self.run_ids.get(workflow)
            if not run_id:
                continue
            for label, path, params in (
                ("GET", f"/v1/workflow-runs/{run_id}", None),
                ("list", "/v1/workflow-runs", {"workflow_id": workflow, "limit": 1000}),
                ("steps", f"/v1/workflow-runs/{run_id}/steps", {"limit": 1000}),
                ("events", f"/v1/workflow-runs/{run_id}/events", {"limit": 1000}),
            ):
                requests.append(
                    Request(f"REST {label} {workflow}", self.complete_json(path, params), refused=False)
                )
            requests.append(
                Request(
                    f"gRPC GET {workflow}",
                    self.h.unary(
                        self.h.runs.GetWorkflowRun, runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id)
                    ),
                    refused=False,
                )
            )
            requests.append(
                Request(
                    f"gRPC steps {workflow}",
                    self.h.stream(
                        self.h.steps.ListStepRuns,
                        steps_pb.ListStepRunsRequest(workflow_run_id=run_id, limit=1000),
                    ),
                    refused=False,
                )
            )
            requests.append(
                Request(
                    f"gRPC events {workflow}",
                    self.h.stream(
                        self.h.runs.ListRunEvents,
                        runs_pb.ListRunEventsRequest(workflow_run_id=run_id, limit=1000),
                    ),
                    refused=False,
                )
            )
        await self.run_class("reads of those runs (GET, list, steps, events)", requests, True)

    def complete_json(self, path: str, params: Any) -> Callable[[], Awaitable[tuple[str, bool, bool, str]]]:
        async def send() -> tuple[str, bool, bool, str]:
            response = await self.h.rest.get(path, params=params)
            answer, ok, bad, _ = rest_answer(response.status_code, response.text)
            try:
                body = response.json()
                note = f"{len(body)} items" if isinstance(body, list) else "object"
                note += f", {len(response.content) // 1024} KB"
            except ValueError:
                return answer + " BODY NOT JSON", False, True, f"{len(response.content)} bytes"
            if ok and isinstance(body, list) and not body:
                return answer + " EMPTY", False, True, note
            return answer, ok, bad, note

        return send


async def stored_check(
    h: Hostile, expected_workflows: set[str], expected_runs: dict[str, int], probe_triggers: int
) -> list[str]:
    """Workflows and runs stored, against what the bench created legitimately."""
    problems: list[str] = []
    workflows = [
        w async for w in h.workflows.ListWorkflows(wf_pb.ListWorkflowsRequest(limit=1000), timeout=30)
    ]
    names = {w.name for w in workflows}
    extra = names - expected_workflows
    print(f"\nstored workflows: {len(names)} ({', '.join(sorted(names))})")
    if extra:
        problems.append(f"workflows stored that should not be: {sorted(extra)}")
    ids = {w.id: w.name for w in workflows}
    counts: dict[str, int] = {}
    token = ""
    while True:
        call = h.runs.ListWorkflowRuns(
            runs_pb.ListWorkflowRunsRequest(limit=1000, page_token=token), timeout=60
        )
        metadata = await call.initial_metadata()
        async for run in call:
            name = ids.get(run.workflow_id, run.workflow_id)
            counts[name] = counts.get(name, 0) + 1
        token = str(dict(metadata or ()).get("x-next-page-token", ""))
        if not token:
            break
    want = {**expected_runs, PROBE_WORKFLOW: probe_triggers + 1}
    print(
        "stored runs by workflow (stored / expected): "
        + ", ".join(
            f"{name} {counts.get(name, 0)}/{want.get(name, 0)}" for name in sorted(set(counts) | set(want))
        )
    )
    for name in sorted(set(counts) | set(want)):
        if counts.get(name, 0) > want.get(name, 0):
            problems.append(f"{counts[name] - want.get(name, 0)} runs of {name} stored that should not be")
    return problems


def probe_stats(
    samples: list[tuple[str, float, float, str]], kind: str, span: tuple[float, float], overlap: bool
) -> tuple[list[float], int]:
    """Sorted latencies (ms) of the probe calls of `kind` started in `span` (or, with `overlap`,
    in flight at any moment of it), and how many of them failed."""
    lo, hi = span
    chosen = [
        (latency, error)
        for k, started, latency, error in samples
        if k == kind and (lo <= started < hi if not overlap else started < hi and started + latency > lo)
    ]
    return sorted(1000 * latency for latency, _ in chosen), sum(1 for _, error in chosen if error)


async def bench(args: argparse.Namespace) -> None:
    common.cancel_on_sigterm()
    wall = time.perf_counter()
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(shared machine: latencies include scheduling noise)"
    )
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="conveyor-hostile-") as tmp:
        data_dir = Path(tmp)
        try:
            async with common.spawn_server(data_dir, envoy=True) as served:
                results, problems = await _bench(served, context, args)
        finally:
            common.print_server_problems(data_dir / "server.log")
    print(
        f"\nprobe latency in ms: baseline (the {QUIET:g} s of quiet before the class) p50 / p99, then "
        "p99 / worst of the calls in flight during the class; delay = worst - overall baseline p50"
    )
    print(f"{'class':46} {'GET':>7} {'':7} {'':7} {'':7}  {'trigger':>7}")
    print(
        f"{'':46} {'p50':>7} {'p99':>7} {'p99':>7} {'worst':>7}  "
        f"{'p50':>7} {'p99':>7} {'p99':>7} {'worst':>7} {'delay':>7}  target delay <= {TARGET_MS:.0f} ms"
    )
    worst_delay = 0.0
    for name, row in results:
        worst_delay = max(worst_delay, row[-1])
        met = "ok" if row[-1] <= TARGET_MS else "OVER"
        print(
            f"{name[:46]:46} "
            + " ".join(f"{v:7.1f}" for v in row[:4])
            + "  "
            + " ".join(f"{v:7.1f}" for v in row[4:])
            + f"  {met}"
        )
    print(f"\nworst delay of a probe call: {worst_delay:.1f} ms (target <= {TARGET_MS:.0f} ms)")
    print(
        "problems: "
        + ("; ".join(problems) if problems else "none (no 5xx, nothing stored that should not be)")
    )
    print(f"load average at end: {os.getloadavg()[0]:.1f}; total {time.perf_counter() - wall:.0f} s")


async def _bench(
    served: common.Served, context: Any, args: argparse.Namespace
) -> tuple[list[tuple[str, list[float]]], list[str]]:
    limits = httpx.Limits(max_connections=4)
    async with (
        httpx.AsyncClient(base_url=served.rest_url, timeout=120, limits=limits,
                          headers=common.rest_headers()) as rest,
        common.open_channel(
            served.grpc_target,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        ) as channel,
    ):
        h = Hostile(rest, served.rest_url, channel)
        b = Bench(h, args.window)
        await b.create(definition(PROBE_WORKFLOW, common.chain(2)))
        await b.create(
            definition(
                TARGET_WORKFLOW,
                [{"ref": "build", "kind": "noop"}, {"ref": "gate", "kind": "input", "depends_on": ["build"]}],
            )
        )
        for doc in RUN_TIME_DEFINITIONS.values():
            await b.create(doc)
        probe_run = await h.runs.TriggerWorkflowRun(
            runs_pb.TriggerWorkflowRunRequest(workflow_id=PROBE_WORKFLOW)
        )

        stop = context.Event()
        out = context.Queue()
        probe = context.Process(target=probe_process, args=(served.grpc_target, probe_run.id, stop, out))
        probe.start()
        try:
            await asyncio.sleep(2.0)  # the probe process starts and connects
            await b.run_class("control: no hostile request (noise floor)", [], True)
            for name, requests, repeat in hostile_classes(h):
                await b.run_class(name, requests, repeat)
            await b.run_time_class("nested map over 40 items in a when", "cel-when")
            await b.run_time_class("nested map over 40 items in a condition step", "cel-condition-step")
            await b.run_time_class(
                "nested map in the workflow condition (check_conditions)",
                "cel-workflow-condition",
                check_conditions=True,
            )
            await b.run_time_class("1,000-step chain: trigger", "chain1000")
            await b.run_time_class(
                "output ~8 MB from a CEL map (condition step)", "out-map", {"s": BIG_STRING}
            )
            await b.run_time_class("output ~10 MB: 50 steps of 200 KB", "out-wide", {"s": BIG_STRING})
            await b.run_time_class("output nested 33 and 47 levels", "out-deep", {"d": nested(19)})
            await b.reads_class()
            # The 1,000-step definition itself, created over REST then gRPC (stores 2 workflows).
            big = [definition(f"chain1000-{n}", common.chain(1000)) for n in ("rest", "grpc")]
            await b.run_class(
                "1,000-step chain: create",
                [
                    Request("REST create", h.http("POST", "/v1/workflows", big[0]), refused=False),
                    Request(
                        "gRPC create",
                        h.unary(h.workflows.CreateWorkflow, grpc_workflow(big[1])),
                        refused=False,
                    ),
                ],
                False,
            )
            await b.run_class("control again: no hostile request", [], True)
            await asyncio.sleep(QUIET)
        finally:
            stop.set()
            samples: list[tuple[str, float, float, str]] = await asyncio.to_thread(out.get, True, 120)
            await asyncio.to_thread(probe.join, 30)

        probe_triggers = sum(1 for kind, _, _, error in samples if kind == "trigger" and not error)
        expected = {
            PROBE_WORKFLOW,
            TARGET_WORKFLOW,
            *RUN_TIME_DEFINITIONS,
            "chain1000-rest",
            "chain1000-grpc",
        }
        problems = await stored_check(h, expected, b.expected_runs, probe_triggers)

    rows: list[tuple[str, list[float]]] = []
    probe_errors = 0
    # The baseline: the probe's p50 over every quiet window together, so that one class whose
    # work outlives its answer (and spills into the next quiet window) does not lower the bar.
    baseline = {
        kind: common.percentile(
            sorted(x for r in b.results for x in probe_stats(samples, kind, r.quiet, overlap=False)[0]), 50)
        for kind in ("get", "trigger")
    }
    print(f"\nprobe baseline p50 over all quiet windows: GET {baseline['get']:.1f} ms, "
          f"trigger {baseline['trigger']:.1f} ms")
    for result in b.results:
        row: list[float] = []
        delay = 0.0
        for kind in ("get", "trigger"):
            base, _ = probe_stats(samples, kind, result.quiet, overlap=False)
            during, errors = probe_stats(samples, kind, result.window, overlap=True)
            probe_errors += errors
            worst = during[-1] if during else float("nan")
            row += [common.percentile(base, 50), common.percentile(base, 99),
                    common.percentile(during, 99), worst]
            delay = max(delay, worst - baseline[kind])
        rows.append((result.name, [*row, delay]))
        for o in result.outcomes.values():
            if o.bad:
                problems.append(f"{result.name}: {o.label} answered {o.answer}")
    if probe_errors:
        problems.append(f"{probe_errors} probe calls failed")
    print(f"\nprobe: {len(samples)} calls, {probe_triggers} triggers")
    return rows, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--window",
        type=float,
        default=1.0,
        help="repeat each class's requests for at least this many seconds (default 1)",
    )
    return common.run_bench(bench(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
