"""Error mapping through the real server: domain errors keep their reason and details, anything
unexpected becomes a generic INTERNAL whose text never reaches the client."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from conveyor.api.errors import STATUS_CODES
from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, stream_failure

SECRET = "password=hunter2 at /srv/conveyor/secret.py"

EXPECTED_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def raising(exc: BaseException) -> Any:
    async def method(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return method


def test_every_error_kind_has_its_code() -> None:
    assert set(STATUS_CODES) == set(ErrorKind)
    assert STATUS_CODES == EXPECTED_CODES


@pytest.mark.parametrize("kind", list(ErrorKind))
async def test_domain_errors_keep_code_reason_metadata_and_violations(
        api: Api, monkeypatch: pytest.MonkeyPatch, kind: ErrorKind) -> None:
    error = ConveyorError(kind, "SOME_REASON", "what went wrong", [FieldViolation("a.b", "is bad")],
                          {"run_id": "r1"})
    monkeypatch.setattr(api.engine.runs, "cancel", raising(error))

    got = await failure(api.runs.CancelWorkflowRun(runs_pb.CancelWorkflowRunRequest(workflow_run_id="r1")))

    assert got.code == EXPECTED_CODES[kind]
    assert got.message == "what went wrong"
    assert got.info is not None
    assert got.info.reason == "SOME_REASON"
    assert got.info.domain == "conveyor.dev"
    assert dict(got.info.metadata) == {"run_id": "r1"}
    assert got.violations == [("a.b", "is bad")]


async def test_no_bad_request_detail_without_violations(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.engine.runs, "get",
                        raising(ConveyorError(ErrorKind.NOT_FOUND, "RUN_NOT_FOUND", "run 'x' not found")))

    got = await failure(api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id="x")))

    assert got.code == grpc.StatusCode.NOT_FOUND
    assert got.violations == []


async def test_unexpected_exception_is_internal_without_its_text(
        api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(api.engine.runs, "get", raising(RuntimeError(SECRET)))

    with caplog.at_level(logging.ERROR, logger="conveyor.api.errors"):
        try:
            await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id="x"))
        except grpc.aio.AioRpcError as error:
            raw = error
        else:
            raise AssertionError("the call succeeded")

    assert raw.code() == grpc.StatusCode.INTERNAL
    assert raw.details() == "internal error"
    everything_sent = (repr(raw.trailing_metadata()) + repr(raw.initial_metadata())
                       + (raw.debug_error_string() or ""))
    assert "hunter2" not in everything_sent
    assert "RuntimeError" not in everything_sent
    got = await failure(api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id="x")))
    assert got.info is not None and got.info.reason == "INTERNAL"
    # The traceback stays on the server, in the log.
    logged = [r for r in caplog.records if r.exc_info]
    assert logged, "the unexpected error was not logged"
    assert "hunter2" in str(logged[0].exc_info[1])  # type: ignore[index]


async def test_unexpected_exception_in_a_stream_is_internal(api: Api,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.engine.steps, "list", raising(KeyError(SECRET)))

    got = await stream_failure(api.steps.ListStepRuns(steps_pb.ListStepRunsRequest(workflow_run_id="x")))

    assert got.code == grpc.StatusCode.INTERNAL
    assert got.message == "internal error"
    assert got.info is not None and got.info.reason == "INTERNAL"


async def test_domain_error_in_a_stream_keeps_its_reason(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.engine.runs, "events", raising(
        ConveyorError(ErrorKind.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", "page_token is not valid")))

    got = await stream_failure(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id="x")))

    assert got.code == grpc.StatusCode.INVALID_ARGUMENT
    assert got.info is not None and got.info.reason == "INVALID_PAGE_TOKEN"


async def test_a_bad_page_token_from_storage_is_invalid_argument(api: Api) -> None:
    got = await stream_failure(api.runs.ListWorkflowRuns(runs_pb.ListWorkflowRunsRequest(page_token="%%%")))

    assert got.code == grpc.StatusCode.INVALID_ARGUMENT
    assert got.info is not None and got.info.reason == "INVALID_PAGE_TOKEN"
