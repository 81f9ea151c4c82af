"""StepRunsService: list a run's steps and steer them (SPEC §3) over the engine's `steps`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.engine.facade import Engine
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import step_runs_service_pb2 as steps_pb
from conveyor.v1 import step_runs_service_pb2_grpc as steps_grpc


class StepRunsServicer(steps_grpc.StepRunsServiceServicer):
    """Step-level use cases: one engine call per RPC, converted both ways."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def ListStepRuns(self, request: steps_pb.ListStepRunsRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepRun]:
        page = await self._engine.steps.list(request.workflow_run_id, request.limit, request.page_token,
                                             caller=caller_from(context),
                                             parent_ref=request.parent_ref or None)
        await convert.send_next_page_token(context, page.next_token)
        for step in page.items:
            yield convert.step_to_proto(step, page.progress.get(step.id))

    async def ApproveStep(self, request: steps_pb.ApproveStepRequest,
                          context: grpc.aio.ServicerContext) -> steps_pb.ApproveStepResponse:
        await self._engine.steps.approve(request.workflow_run_id, request.step_ref, request.comment,
                                         caller=caller_from(context))
        return steps_pb.ApproveStepResponse()

    async def SubmitStepInput(self, request: steps_pb.SubmitStepInputRequest,
                              context: grpc.aio.ServicerContext) -> steps_pb.SubmitStepInputResponse:
        await self._engine.steps.submit_input(request.workflow_run_id, request.step_ref,
                                              convert.struct_to_dict(request, "data"),
                                              caller=caller_from(context))
        return steps_pb.SubmitStepInputResponse()

    async def SkipStep(self, request: steps_pb.SkipStepRequest,
                       context: grpc.aio.ServicerContext) -> steps_pb.SkipStepResponse:
        await self._engine.steps.skip(request.workflow_run_id, request.step_ref, request.reason,
                                      caller=caller_from(context))
        return steps_pb.SkipStepResponse()

    async def ForceCompleteStep(self, request: steps_pb.ForceCompleteStepRequest,
                                context: grpc.aio.ServicerContext) -> steps_pb.ForceCompleteStepResponse:
        await self._engine.steps.force_complete(request.workflow_run_id, request.step_ref,
                                                convert.struct_to_dict(request, "result"),
                                                caller=caller_from(context))
        return steps_pb.ForceCompleteStepResponse()

    async def RetryStep(self, request: steps_pb.RetryStepRequest,
                        context: grpc.aio.ServicerContext) -> steps_pb.RetryStepResponse:
        step = await self._engine.steps.retry(request.workflow_run_id, request.step_ref,
                                              caller=caller_from(context))
        return steps_pb.RetryStepResponse(step_run=convert.step_to_proto(step))

    async def ReplaySubtree(self, request: steps_pb.ReplaySubtreeRequest,
                            context: grpc.aio.ServicerContext) -> steps_pb.ReplaySubtreeResponse:
        reset = await self._engine.steps.replay_subtree(request.workflow_run_id, request.step_ref,
                                                        caller=caller_from(context))
        return steps_pb.ReplaySubtreeResponse(reset_steps=reset)
