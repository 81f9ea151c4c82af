"""Domain errors: every failure a caller can see, with a stable UPPER_SNAKE reason.

Only `api/` maps these kinds to gRPC codes; everything below raises them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# The domain of every ErrorInfo the API sends (AIP-193: the service's name).
ERROR_DOMAIN = "conveyor.dev"


class ErrorKind(enum.Enum):
    """What went wrong, independent of the wire (api/errors.py maps it to a gRPC code)."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass
class ConveyorError(Exception):
    """A failure with a kind, a stable reason and a message safe to show to clients."""

    kind: ErrorKind
    reason: str
    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def invalid(message: str, violations: list[FieldViolation] | None = None,
            reason: str = "INVALID_ARGUMENT") -> ConveyorError:
    """An INVALID_ARGUMENT error, optionally with one field violation per problem."""
    return ConveyorError(ErrorKind.INVALID_ARGUMENT, reason, message, violations or [])


def not_found(what: str, ident: str) -> ConveyorError:
    """A NOT_FOUND error with reason `<WHAT>_NOT_FOUND`, e.g. RUN_NOT_FOUND."""
    label = what.lower().replace("_", " ")
    return ConveyorError(ErrorKind.NOT_FOUND, f"{what.upper()}_NOT_FOUND", f"{label} {ident!r} not found")


def invalid_transition(message: str) -> ConveyorError:
    """The operation is not allowed in the current state (AIP-216)."""
    return ConveyorError(ErrorKind.FAILED_PRECONDITION, "INVALID_TRANSITION", message)


def unavailable(message: str, reason: str = "UNAVAILABLE") -> ConveyorError:
    """A transient failure (e.g. the database is locked or unreachable): the caller may retry
    the same request later. `message` is shown to clients, so it must stay generic."""
    return ConveyorError(ErrorKind.UNAVAILABLE, reason, message)


# The database aborted a transaction that conflicted with another (PostgreSQL: a deadlock, a
# serialization failure): UNAVAILABLE to the client, who may retry, but no outage: the same
# requests in smaller transactions get through.
TRANSACTION_CONFLICT = "TRANSACTION_CONFLICT"


def is_outage(error: BaseException) -> bool:
    """True for an UNAVAILABLE error (the Store's answer when the database is gone or locked),
    a transaction conflict excepted: it is the database's trouble, not one request's, so a
    batch meeting it fails as a batch."""
    return (isinstance(error, ConveyorError) and error.kind is ErrorKind.UNAVAILABLE
            and error.reason != TRANSACTION_CONFLICT)


def overloaded(reason: str, message: str, retry_after_seconds: int = 1) -> ConveyorError:
    """RESOURCE_EXHAUSTED with a retry-after (sent as the `retry-after` header and trailer):
    a bounded queue is full; the same request later will be taken."""
    return ConveyorError(ErrorKind.RESOURCE_EXHAUSTED, reason, message,
                         metadata={"retry_after": str(retry_after_seconds)})


class ConcurrentChange(Exception):
    """A compare-and-set matched no row: another writer changed the record first."""


class DuplicateKey(Exception):
    """An insert hit a unique key that another writer inserted first (e.g. an idempotency key)."""
