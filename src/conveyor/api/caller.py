"""Who is calling: the one place that holds the engine's `Caller` of the RPC being served.

The gate (api/access.py) binds the caller its API key names before the handler runs; servicers
read it with `caller_from(context)`. A context variable carries it: grpc.aio serves every RPC in
a task of its own, and a task's context is its own copy, so a binding never leaks into another
call.
"""

from __future__ import annotations

from contextvars import ContextVar

import grpc

from conveyor.domain import actors
from conveyor.domain.records import Caller

# Every caller when authentication is disabled (CONVEYOR_AUTH=disabled): admin of every project.
ANONYMOUS = Caller(name=actors.ANONYMOUS, project=None, role="admin")
# Who a webhook delivery acts as: it may trigger the workflow its token names, nothing else
# (the webhook servicer scopes it to that workflow's project).
WEBHOOK = Caller(name=actors.WEBHOOK, project=None, role="operator")

_CALLER: ContextVar[Caller | None] = ContextVar("conveyor_caller", default=None)


def bind(caller: Caller) -> None:
    """Make `caller` the caller of the RPC being served."""
    _CALLER.set(caller)


def bound() -> Caller | None:
    """The caller bound to the RPC being served, if any yet."""
    return _CALLER.get()


def caller_from(context: grpc.aio.ServicerContext) -> Caller:
    """The caller of the RPC whose context this is (the gate bound one before the handler ran)."""
    caller = _CALLER.get()
    if caller is None:
        # Unreachable through the server (the gate admits every Conveyor RPC first); a handler
        # called some other way must not act with anybody's rights.
        raise RuntimeError("no caller bound to this call")
    return caller
