"""AuditService: the audit log for admins (the gate checks the role) over the engine's `audit`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.domain.access import AuditQuery
from conveyor.engine.facade import Engine
from conveyor.v1 import audit_service_pb2 as audit_pb
from conveyor.v1 import audit_service_pb2_grpc as audit_grpc
from conveyor.v1 import resources_pb2 as pb


class AuditServicer(audit_grpc.AuditServiceServicer):
    """Lists audit entries, newest first."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def ListAuditEntries(self, request: audit_pb.ListAuditEntriesRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AuditEntry]:
        query = AuditQuery(project_id=request.project_id, actor=request.actor,
                           failures_only=request.failures_only)
        page = await self._engine.audit.list(caller_from(context), query, request.limit, request.page_token)
        await convert.send_next_page_token(context, page.next_token)
        for entry in page.items:
            yield convert.audit_to_proto(entry)
