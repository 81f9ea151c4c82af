"""WorkflowsService: versioned workflow definitions (SPEC §2) over the engine's `workflows`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.engine.facade import Engine
from conveyor.settings import Settings
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflows_service_pb2 as wf_pb
from conveyor.v1 import workflows_service_pb2_grpc as wf_grpc


class WorkflowsServicer(wf_grpc.WorkflowsServiceServicer):
    """Create, read (at any version), list, version and archive workflow definitions; list a
    workflow's versions; pause and resume schedules; enable, rotate and disable webhooks."""

    def __init__(self, engine: Engine, settings: Settings,
                 rest_base_url: Callable[[], str] | None = None) -> None:
        self._engine = engine
        self._settings = settings
        # Where webhook URLs point: asked at each rotation, as the REST port may be known only
        # once Envoy has bound it (a port of 0 asked for).
        self._rest_base_url = rest_base_url or (lambda: settings.rest_base_url)

    async def CreateWorkflow(self, request: wf_pb.CreateWorkflowRequest,
                             context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.create(convert.workflow_data(request.workflow),
                                                 caller=caller_from(context))
        return convert.workflow_to_proto(wf)

    async def GetWorkflow(self, request: wf_pb.GetWorkflowRequest,
                          context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.get(request.workflow_id, request.project_id,
                                              caller=caller_from(context), version=request.version)
        return convert.workflow_to_proto(wf)

    async def ListWorkflowVersions(self, request: wf_pb.ListWorkflowVersionsRequest,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Workflow]:
        page = await self._engine.workflows.versions(
            request.workflow_id, request.project_id, request.limit, request.page_token,
            caller=caller_from(context))
        await convert.send_next_page_token(context, page.next_token)
        for wf in page.items:
            yield convert.workflow_to_proto(wf)

    async def ListWorkflows(self, request: wf_pb.ListWorkflowsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Workflow]:
        page = await self._engine.workflows.list(
            request.project_id, request.limit, request.page_token,
            request.include_archived, caller=caller_from(context))
        await convert.send_next_page_token(context, page.next_token)
        for wf in page.items:
            yield convert.workflow_to_proto(wf)

    async def UpdateWorkflow(self, request: wf_pb.UpdateWorkflowRequest,
                             context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.update(request.workflow_id, convert.workflow_data(request.workflow),
                                                 caller=caller_from(context))
        return convert.workflow_to_proto(wf)

    async def ArchiveWorkflow(self, request: wf_pb.ArchiveWorkflowRequest,
                              context: grpc.aio.ServicerContext) -> wf_pb.ArchiveWorkflowResponse:
        await self._engine.workflows.archive(request.workflow_id, request.project_id,
                                             caller=caller_from(context))
        return wf_pb.ArchiveWorkflowResponse()

    async def PauseSchedule(self, request: wf_pb.PauseScheduleRequest,
                            context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.pause_schedule(request.workflow_id, request.project_id,
                                                         caller=caller_from(context))
        return convert.workflow_to_proto(wf)

    async def ResumeSchedule(self, request: wf_pb.ResumeScheduleRequest,
                             context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.resume_schedule(request.workflow_id, request.project_id,
                                                          caller=caller_from(context))
        return convert.workflow_to_proto(wf)

    async def RotateWebhook(self, request: wf_pb.RotateWebhookRequest,
                            context: grpc.aio.ServicerContext) -> wf_pb.RotateWebhookResponse:
        wf, token = await self._engine.workflows.rotate_webhook(request.workflow_id, request.project_id,
                                                                caller=caller_from(context))
        return wf_pb.RotateWebhookResponse(
            workflow=convert.workflow_to_proto(wf),
            webhook_url=f"{self._rest_base_url()}{convert.WEBHOOK_PATH}{token}")

    async def DisableWebhook(self, request: wf_pb.DisableWebhookRequest,
                             context: grpc.aio.ServicerContext) -> pb.Workflow:
        wf = await self._engine.workflows.disable_webhook(request.workflow_id, request.project_id,
                                                          caller=caller_from(context))
        return convert.workflow_to_proto(wf)
