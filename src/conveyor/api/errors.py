"""The one place where failures become gRPC statuses.

Owns the mapping from the domain's `ErrorKind` to `grpc.StatusCode`, the rich status every
error carries (a `google.rpc.Status` in the `grpc-status-details-bin` trailer, holding a
`google.rpc.ErrorInfo` with the stable reason and, for field problems, a `google.rpc.BadRequest`),
and the server interceptor that applies it to every unary and server-streaming handler. Anything
that is not a `ConveyorError` becomes INTERNAL with a generic message; its traceback goes to the
server log only, never to the client (SPEC §1.1).

The interceptor also owns the two moments before a handler runs: decoding the request bytes (a
message protobuf cannot decode, e.g. a Struct nested past its recursion limit, is
INVALID_ARGUMENT REQUEST_UNDECODABLE instead of grpc's own UNKNOWN with the decoder's text) and
the `prepare` hook that checks every request against the limits (`conveyor.api.requests`), and
the bound on unary calls handled at once (`max_in_flight`): beyond it a call is refused at once
RESOURCE_EXHAUSTED SERVER_BUSY with a retry-after, before it holds any memory or connection, so
a database outage cannot pile up calls without bound. Streams are long-lived and not counted.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn, Protocol

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from conveyor.domain.errors import ERROR_DOMAIN, ConveyorError, ErrorKind, FieldViolation, overloaded
from conveyor.v1 import resources_pb2

logger = logging.getLogger(__name__)

STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
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

INTERNAL_MESSAGE = "internal error"

# Bounds on what one error status carries. It travels in the grpc-message and
# grpc-status-details-bin trailers, and clients (grpc's 8 KB soft metadata limit, Envoy) refuse
# oversized trailers; violations and messages may quote what a client sent, which can be long.
MAX_VIOLATIONS = 20
MAX_ERROR_TEXT = 500


def rich_status(code: grpc.StatusCode, reason: str, message: str,
                metadata: Mapping[str, str] | None = None,
                violations: Sequence[FieldViolation] = ()) -> grpc.Status:
    """A grpc.Status whose trailer carries ErrorInfo (and BadRequest when there are violations),
    bounded in size: at most MAX_VIOLATIONS violations, every text cut to MAX_ERROR_TEXT."""
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=ERROR_DOMAIN,
        metadata={_cut(k): _cut(v) for k, v in (metadata or {}).items()})
    details = [_pack(info)]
    if violations:
        bad_request = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_cut(v.field), description=_cut(v.description))
            for v in violations[:MAX_VIOLATIONS]])
        details.append(_pack(bad_request))
    # code.value is (int, name); the Status message wants the int.
    status = status_pb2.Status(code=code.value[0], message=_cut(message), details=details)
    return rpc_status.to_status(status)


class _Status(NamedTuple("_Status", [("code", grpc.StatusCode), ("details", str),
                                     ("trailing_metadata", tuple[tuple[str, str | bytes], ...])]),
              grpc.Status):
    """A status with trailing metadata of our choosing (grpc.Status is only an interface)."""


def _cut(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT - 1] + "…"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_of(error: ConveyorError) -> grpc.Status:
    """The wire status of a domain error."""
    return rich_status(STATUS_CODES[error.kind], error.reason, error.message, error.metadata,
                       error.violations)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str,
                message: str) -> NoReturn:
    """End the RPC with `code` and an ErrorInfo carrying `reason` (for errors raised by the API
    itself rather than the engine, e.g. UNIMPLEMENTED)."""
    await context.abort_with_status(rich_status(code, reason, message))
    # abort_with_status always raises; this line only tells type checkers so.
    raise AssertionError("unreachable")


def stream_error(exc: Exception, method: str) -> resources_pb2.StreamError:
    """The `StreamError` last message of a stream that failed after it began: the error's code,
    reason and message (an unexpected exception: INTERNAL, its traceback logged only)."""
    if isinstance(exc, ConveyorError):
        return resources_pb2.StreamError(code=STATUS_CODES[exc.kind].value[0], reason=exc.reason,
                                         message=_cut(exc.message),
                                         resume_after_seq=int(exc.metadata.get("resume_after_seq", 0)))
    logger.exception("unexpected error in %s after the stream began", method, exc_info=exc)
    return resources_pb2.StreamError(code=grpc.StatusCode.INTERNAL.value[0], reason="INTERNAL",
                                     message=INTERNAL_MESSAGE)


# The status every unexpected exception becomes; built once, it never varies.
_INTERNAL = rich_status(grpc.StatusCode.INTERNAL, "INTERNAL", INTERNAL_MESSAGE)

# A request checker: given the request and the call's metadata, returns the request the handler
# gets (possibly rebuilt, e.g. from a raw REST body) or raises ConveyorError.
Prepare = Callable[[Any, Sequence[tuple[str, Any]]], Any]


class _Undecodable:
    """Stands in for a request whose bytes protobuf could not decode."""


_UNDECODABLE = _Undecodable()


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that never raises. grpc answers a raising one with UNKNOWN and the
    exception's text ("Unexpected <class 'DecodeError'>...", a 500 through Envoy); the
    sentinel lets the guarded handler answer INVALID_ARGUMENT instead."""
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:
            logger.info("undecodable request of %d bytes", len(data))
            return _UNDECODABLE

    return safe


def _undecodable_error() -> ConveyorError:
    return ConveyorError(
        ErrorKind.INVALID_ARGUMENT, "REQUEST_UNDECODABLE",
        "the request could not be decoded (for example, JSON nested too deeply for protobuf)")


class Admission(Protocol):
    """What runs around every handler: `admit` before (binds the caller or raises the error that
    refuses the call; `peer` is the connection's, for limits per client address), `audit`
    after (with how the call ended). api/access.py's Gate."""

    async def admit(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> None: ...
    def audit(self, method: str, request: Any, response: Any, error: BaseException | None) -> None: ...


class _Open:
    """Admits every call and audits none (tests of the interceptor alone)."""

    async def admit(self, method: str, metadata: Sequence[tuple[str, Any]], peer: str) -> None:
        return None

    def audit(self, method: str, request: Any, response: Any, error: BaseException | None) -> None:
        return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into statuses: ConveyorError -> its mapped status,
    anything else -> INTERNAL "internal error" (traceback logged). Aborts already in flight
    and cancellations pass through untouched. Before the handler runs, the call is admitted
    (`admission`: who calls, may they), undecodable requests are refused and `prepare` (when
    given) checks and may rebuild the request; after it, the outcome is audited."""

    def __init__(self, prepare: Prepare | None = None, admission: Admission | None = None,
                 max_in_flight: int = 0) -> None:
        self._prepare: Prepare = prepare or (lambda request, metadata: request)
        self._admission: Admission = admission or _Open()
        self.in_flight = InFlight(max_in_flight)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        guard = _Guard(method, self._prepare, self._admission)
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                self.in_flight.bound(guard.unary(handler.unary_unary), method),
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            # Streaming handlers come in two styles: async generators (ours) and coroutines
            # that write with context.write (grpc's health Watch).
            if inspect.isasyncgenfunction(behavior):
                wrapped: Any = guard.stream(behavior)
            elif inspect.iscoroutinefunction(behavior):
                wrapped = guard.unary(behavior)
            else:
                return handler
            return grpc.unary_stream_rpc_method_handler(
                wrapped,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        # Client-streaming handlers (only reflection's) are left alone.
        return handler


async def _fail(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> NoReturn:
    if isinstance(exc, ConveyorError):
        status = status_of(exc)
        if retry_after := exc.metadata.get("retry_after"):
            # As a header too, for REST clients: sent with the status, not as initial metadata
            # before it. A refusal is then a trailers-only response, whose metadata Envoy's
            # transcoder turns into response headers next to the mapped HTTP status; initial
            # metadata first would commit a streaming method's response to 200 (Envoy starts
            # the JSON array) and the 429 would be lost. gRPC clients read it from the
            # trailing metadata.
            status = _Status(status.code, status.details,
                             (*status.trailing_metadata, ("retry-after", retry_after)))
        await context.abort_with_status(status)
    else:
        logger.exception("unexpected error in %s", method, exc_info=exc)
        await context.abort_with_status(_INTERNAL)
    raise AssertionError("unreachable")


class InFlight:
    """Counts the unary calls being handled; beyond `most` (0: no bound) a call is refused."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.now = 0

    def bound(self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]], method: str
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.most and self.now >= self.most:
                # Not audited: a flood of refusals would be a flood of entries.
                await _fail(context, overloaded("SERVER_BUSY", "the server is handling too many calls; "
                                                               "retry shortly"), method)
            self.now += 1
            try:
                return await behavior(request, context)
            finally:
                self.now -= 1

        return counted


class _Guard:
    """One method's wrapping of its handler: admit, check, handle, map errors, audit."""

    def __init__(self, method: str, prepare: Prepare, admission: Admission) -> None:
        self.method = method
        self.prepare = prepare
        self.admission = admission

    async def _enter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata() or ()
        await self.admission.admit(self.method, metadata, context.peer())
        if request is _UNDECODABLE:
            raise _undecodable_error()
        return self.prepare(request, metadata)

    def _audit(self, request: Any, response: Any, error: BaseException | None) -> bool:
        decoded = None if request is _UNDECODABLE else request
        try:
            self.admission.audit(self.method, decoded, response, error)
        except Exception:
            # The call is done either way: a failure to record it must not turn its answer
            # into an UNKNOWN that quotes the exception (logged instead).
            logger.exception("recording the audit entry of %s failed", self.method)
        return True

    def unary(self, behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
              ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            response: Any = None
            error: BaseException | None = None
            audited = False
            try:
                response = await behavior(await self._enter(request, context), context)
                return response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                error = exc
                # Recorded before the status goes out (abort sends it at once): a client that
                # reads the log right after its refused call finds the entry.
                audited = self._audit(request, None, exc)
                await _fail(context, exc, self.method)
            except BaseException as exc:  # cancelled: the client went away
                error = exc
                raise
            finally:
                if not audited:
                    self._audit(request, response, error)

        return guarded

    def stream(self, behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
               ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in behavior(await self._enter(request, context), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, exc, self.method)

        return guarded
