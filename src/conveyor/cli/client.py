"""The client commands' one connection to the server.

Owns the gRPC channel, the `authorization: Bearer` metadata sent on every call, paging through
list streams (the next page's cursor arrives in the `x-next-page-token` initial metadata), and
turning every failed call into a `CliError`: the server's message and ErrorInfo reason, with the
exit code its status code means. Imported only inside commands (grpc costs ~100 ms to import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import click
import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conveyor.cli.config import Target
from conveyor.cli.errors import AUTH, FAILURE, INVALID_TRANSITION, NOT_FOUND, CliError
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import events_service_pb2_grpc as events_grpc
from conveyor.v1 import secrets_service_pb2_grpc as secrets_grpc
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc
from conveyor.v1 import workflows_service_pb2_grpc as workflows_grpc

EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.FAILED_PRECONDITION: INVALID_TRANSITION,
    grpc.StatusCode.ABORTED: INVALID_TRANSITION,
    grpc.StatusCode.UNAUTHENTICATED: AUTH,
    grpc.StatusCode.PERMISSION_DENIED: AUTH,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
}

# A unary call that has not answered in this long is not going to; streams have no deadline.
CALL_TIMEOUT = 60.0
NEXT_PAGE_TOKEN = "x-next-page-token"
# The most a list page may hold (the server's maximum).
MAX_PAGE = 1000

T = TypeVar("T")


class Client:
    """Stubs of the services on one channel to the address the root options name."""

    def __init__(self, target: Target) -> None:
        self.address = target.address()
        token = target.token()
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._open()

    def _open(self) -> None:
        self.channel = grpc.insecure_channel(self.address)
        self.workflows: Any = workflows_grpc.WorkflowsServiceStub(self.channel)
        self.runs: Any = runs_grpc.WorkflowRunsServiceStub(self.channel)
        self.steps: Any = steps_grpc.StepRunsServiceStub(self.channel)
        self.audit: Any = audit_grpc.AuditServiceStub(self.channel)
        self.secrets: Any = secrets_grpc.SecretsServiceStub(self.channel)
        self.events: Any = events_grpc.EventsServiceStub(self.channel)

    def reconnect(self) -> None:
        """A new channel, after the server dropped the old one: it connects at once, where the
        old one would wait out grpc's reconnect backoff (up to two minutes)."""
        self.channel.close()
        self._open()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Ctrl-C can land inside grpc's own bookkeeping of a call, after which close() waits
        # forever for that call to finish; `main` ends the process at once instead.
        if not isinstance(exc, KeyboardInterrupt):
            self.channel.close()

    def call(self, method: Callable[..., T], request: Any) -> T:
        """A unary call; a failure raises CliError."""
        try:
            return method(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            raise self.failure(e) from None

    def stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        """The messages of a server-streaming call; a failure raises CliError."""
        try:
            yield from method(request, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.failure(e) from None

    def pages(self, method: Callable[..., Any], request: Any, limit: int = 0) -> Iterator[Any]:
        """Up to `limit` items (0: all) of a paged list stream, following its page cursor."""
        left = limit
        while True:
            request.limit = min(left, MAX_PAGE) if limit else MAX_PAGE
            try:
                call = method(request, metadata=self.metadata)
                for item in call:
                    yield item
                    left -= 1
                token = dict(call.initial_metadata() or ()).get(NEXT_PAGE_TOKEN, "")
            except grpc.RpcError as e:
                raise self.failure(e) from None
            if not token or (limit and left <= 0):
                return
            request.page_token = token

    def failure(self, error: grpc.RpcError) -> CliError:
        """The CliError a failed call means: the server's message and reason, or why it was not
        reached."""
        code: grpc.StatusCode = error.code()
        message: str = error.details() or code.name.lower()
        reason, violations = _rich_details(error)
        if code == grpc.StatusCode.UNAVAILABLE and not reason:
            # grpc's text nests causes ("failed to connect to all addresses; last error: UNKNOWN:
            # ipv4:...: Connection refused"); the innermost one says it.
            cause = message.rsplit(": ", 1)[-1].rstrip("] ")
            return CliError(f"cannot reach conveyor at {self.address}: {cause}", FAILURE, "UNAVAILABLE")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not reason:
            return CliError(f"conveyor at {self.address} did not answer within {CALL_TIMEOUT:.0f} s",
                            FAILURE, "DEADLINE_EXCEEDED")
        # The message quotes the first field violation; the others are added to the same line.
        problems = [f"{field}: {text}" if field else text for field, text in violations]
        message = "; ".join([message, *(p for p in problems if p not in message)])
        return CliError(message, EXIT_CODES.get(code, FAILURE), reason or code.name)


def _rich_details(error: grpc.RpcError) -> tuple[str, list[tuple[str, str]]]:
    """The ErrorInfo reason and BadRequest field violations of a rich status, if it has them."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return "", []
    reason = ""
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return reason, violations


def connect(ctx: click.Context) -> Client:
    """A Client to the server the root options (or environment, or config) name."""
    target = ctx.find_object(Target)
    if target is None:
        raise RuntimeError("client commands run under the `conveyor` group")
    return Client(target)
