"""Who is calling: the one place that turns an RPC's context into the engine's `Caller`.

Authentication (SPEC §6) is not wired yet, so every call acts as an anonymous admin of every
project. When API keys arrive, this function reads the `authorization` metadata instead and
every servicer picks that up unchanged.
"""

from __future__ import annotations

import grpc

from conveyor.domain.records import Caller

ANONYMOUS = Caller(name="anonymous", project=None, role="admin")


def caller_from(context: grpc.aio.ServicerContext) -> Caller:
    """The caller of the RPC whose context this is."""
    return ANONYMOUS
