"""Run families: which runs caused which, and the rules that keep a family from growing forever
(SPEC §3, issue 16 finding 3).

A run's family is what started it: the parent whose `workflow` step started a child run, and the
run whose notification, delivered to a webhook of this server, started a webhook run. A run keeps
its `lineage` (the workflow ids of the runs that caused it, first cause first, its own last) and
its `depth` (how many causes precede it). A workflow may not be started again by its own family
(WORKFLOW_LOOP), and a family is at most `max_depth` deep (NESTING_TOO_DEEP).

The cause of a webhook delivery travels with the notification in the `X-Conveyor-Lineage`
header: `v1.<base64url of {"run", "lineage", "depth"}>.<hex HMAC-SHA256>` under the server's
notification secret, so a webhook trusts only what this server (or a replica sharing its secret)
wrote. The header only ever restricts what its delivery may start, so a replayed one harms no one
but its sender; a header that is not this server's is ignored (another Conveyor server's
notification, with its own secret, starts a run that is a family of its own).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conveyor.domain.records import RunRecord

WORKFLOW_LOOP = "WORKFLOW_LOOP"
NESTING_TOO_DEEP = "NESTING_TOO_DEEP"

LINEAGE_HEADER = "X-Conveyor-Lineage"
_VERSION = "v1"
# Separates this MAC's input from the body signature's ("<t>.<body>"), under the same secret.
_PURPOSE = b"conveyor-lineage."
# A header longer than this is not looked at (a lineage is at most max depth + 1 workflow ids).
MAX_HEADER_CHARS = 4096


@dataclass(frozen=True)
class Cause:
    """The run that caused a webhook delivery: its id and its family as the loop rules see it."""

    run_id: str
    lineage: tuple[str, ...]  # workflow ids, first cause first, the run's own workflow last
    depth: int


def lineage_of(run: RunRecord) -> list[str]:
    """The workflow ids of `run`'s family up to itself (a run nobody caused: its own workflow)."""
    return list(run.lineage or [run.workflow_id])


def cause_of(run: RunRecord) -> Cause:
    """`run` as the cause of what its notifications start."""
    return Cause(run.id, tuple(lineage_of(run)), run.depth)


def refusal(lineage: list[str] | tuple[str, ...], depth: int, workflow_id: str, workflow_name: str,
            through: str, max_depth: int, what: str) -> tuple[str, str] | None:
    """Why a run of `workflow_id` caused by a run (`through`) with this lineage and depth may not
    start, as (reason, message); None when it may. `what` names such runs in the message."""
    if workflow_id in lineage:
        return WORKFLOW_LOOP, f"workflow {workflow_name!r} would start itself (through run {through})"
    if depth + 1 > max_depth:
        return NESTING_TOO_DEEP, f"{what} nest at most {max_depth} deep"
    return None


def sign_cause(secret: str, cause: Cause) -> str:
    """The X-Conveyor-Lineage value that carries `cause`."""
    doc = json.dumps({"run": cause.run_id, "lineage": list(cause.lineage), "depth": cause.depth},
                     separators=(",", ":")).encode()
    data = base64.urlsafe_b64encode(doc).rstrip(b"=").decode()
    return f"{_VERSION}.{data}.{_mac(secret, data)}"


def verified_cause(secret: str, header: str) -> Cause | None:
    """The cause an X-Conveyor-Lineage value carries, when this server signed it; else None."""
    if not secret or not header or len(header) > MAX_HEADER_CHARS:
        return None
    parts = header.strip().split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        return None
    _, data, mac = parts
    if not hmac.compare_digest(_mac(secret, data), mac):
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        run_id, lineage, depth = doc["run"], doc["lineage"], doc["depth"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        return None
    if (not isinstance(run_id, str) or not isinstance(lineage, list) or isinstance(depth, bool)
            or not isinstance(depth, int) or not all(isinstance(w, str) for w in lineage)):
        return None
    return Cause(run_id, tuple(lineage), depth)


def _mac(secret: str, data: str) -> str:
    return hmac.new(secret.encode(), _PURPOSE + data.encode(), hashlib.sha256).hexdigest()
