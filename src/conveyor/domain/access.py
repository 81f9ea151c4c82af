"""Who may do what (SPEC §6): roles, API keys and their tokens, webhook tokens, audit entries.

Pure: the rules and the records. Storing keys, resolving tokens and writing the audit log belong
to the engine (engine/keys.py, engine/audit.py); which RPC needs which role to the API.

Tokens are 256 random bits with a recognizable prefix ("cvk_" for API keys, "whk_" for webhook
URLs, so a leaked one is easy to grep for and to tell apart). Only their SHA-256 is stored: a
token this random cannot be guessed from its hash, so a slow password hash would buy nothing
and cost every cache miss milliseconds. Lookups go by the hash (a unique index), and the found
row's hash is compared with `hmac.compare_digest`, so no byte-by-byte comparison of anything a
client sent decides the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from conveyor.domain.errors import ConveyorError, ErrorKind, FieldViolation, invalid
from conveyor.domain.records import Caller

# A key of every project ("*" on the wire, None in `Caller.project`).
ALL_PROJECTS = "*"
KEY_TOKEN_PREFIX = "cvk_"
WEBHOOK_TOKEN_PREFIX = "whk_"
# Characters of a token kept in the clear, to recognize a key in lists ("cvk_3fA9").
TOKEN_PREFIX_LENGTH = 8
# Every character a token may hold (well_formed_token).
_TOKEN = re.compile(r"[\x21-\x7e]+")
# Names travel in events and audit entries as the actor: a boring alphabet, like project ids.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:-]{0,99}")


class Role(IntEnum):
    """Roles. Viewer, operator and admin are a ladder: each may do everything the ones below it
    may. The worker stands beside the ladder: it may only lease, heartbeat, report and release
    its project's tasks (not even read a run), which operators and admins may do too."""

    WORKER = 0  # lease, heartbeat, report and release tasks; nothing else
    VIEWER = 1  # read and watch
    OPERATOR = 2  # + trigger, every run and step operation, comments, worker leases
    ADMIN = 3  # + workflow definitions, webhooks, keys, the audit log

    @property
    def label(self) -> str:
        return self.name.lower()

    def includes(self, needed: Role) -> bool:
        """Whether a key of this role may do what needs `needed`."""
        if needed is Role.WORKER:
            return self is Role.WORKER or self >= Role.OPERATOR
        return self >= needed  # the worker (0) is below every rung of the ladder


ROLE_NAMES = ", ".join(r.label for r in Role)


def parse_role(text: str) -> Role:
    """The role named `text` ("worker", "viewer", "operator", "admin"); INVALID_ARGUMENT
    otherwise."""
    try:
        return Role[text.upper()]
    except KeyError:
        raise invalid(f"role must be one of {ROLE_NAMES}, not {text!r}",
                      [FieldViolation("role", f"must be one of {ROLE_NAMES}")],
                      reason="INVALID_ROLE") from None


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise invalid("a key's name must be 1-100 letters, digits, '_', '.', '@', ':' or '-'",
                      [FieldViolation("name", "must be 1-100 letters, digits, '_', '.', '@', ':' or '-'")],
                      reason="INVALID_KEY_NAME")
    return name


def new_token(prefix: str) -> str:
    """A fresh bearer token: `prefix` then 43 URL-safe characters (256 random bits)."""
    return prefix + secrets.token_urlsafe(32)


def well_formed_token(token: str) -> bool:
    """Whether `token` could be a token at all: visible ASCII only (no space, control character,
    line break or NUL), which is also all an HTTP/2 header value can carry safely. The gate
    refuses anything else MALFORMED_TOKEN; the CLI refuses to send it."""
    return _TOKEN.fullmatch(token) is not None


def token_hash(token: str) -> str:
    """What is stored of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_hash(stored: str, presented: str) -> bool:
    """Constant-time equality of two token hashes."""
    return hmac.compare_digest(stored.encode(), presented.encode())


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored: never its token, only the token's hash and first characters."""

    id: str
    name: str
    project_id: str  # a project, or ALL_PROJECTS
    role: Role
    token_hash: str
    token_prefix: str
    created_at: datetime
    created_by: str = ""
    rate_limit: int = 0  # requests per second; 0: the server's default
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def caller(self) -> Caller:
        project = None if self.project_id == ALL_PROJECTS else self.project_id
        return Caller(name=self.name, project=project, role=self.role.label, key_id=self.id)

    def usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def role_of(caller: Caller) -> Role:
    return Role[caller.role.upper()]


def require(caller: Caller, needed: Role, what: str) -> None:
    """PERMISSION_DENIED unless the caller's role includes `needed`."""
    if not role_of(caller).includes(needed):
        raise ConveyorError(ErrorKind.PERMISSION_DENIED, "ROLE_TOO_LOW",
                            f"{what} needs the {needed.label} role; key {caller.name!r} is {caller.role}",
                            metadata={"needed": needed.label, "role": caller.role})


def grantable(caller: Caller, project_id: str, role: Role) -> None:
    """A key may only create keys within its own reach: its project (a `*` key: any) and at
    most its own role (only admins call this, so the role check is a guard for the future)."""
    if caller.project is not None and project_id != caller.project:
        raise ConveyorError(ErrorKind.PERMISSION_DENIED, "PROJECT_FORBIDDEN",
                            f"this key may not create keys for project {project_id!r}")
    require(caller, role, f"creating a {role.label} key")


@dataclass(frozen=True)
class AuditEntry:
    """One write call and how it ended."""

    at: datetime
    actor: str
    project_id: str
    method: str
    resource_id: str
    code: str  # "OK" or a gRPC status code name
    reason: str = ""
    message: str = ""
    id: int = 0  # assigned by storage


@dataclass(frozen=True)
class AuditQuery:
    project_id: str = ""
    actor: str = ""
    failures_only: bool = False
