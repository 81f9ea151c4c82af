"""WebhooksService: a POST to a workflow's webhook URL triggers a run (seed 004's webhook_url).

The token in the URL is the credential (the gate asks for no key): it names one workflow, and
the delivery may do exactly one thing, trigger that workflow, in its project, with the body as
payload and the `Idempotency-Key` header honored, as `webhook`. Unknown, rotated-away and
disabled tokens all answer the same NOT_FOUND.
"""

from __future__ import annotations

import dataclasses

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.domain.records import TriggerRequest
from conveyor.engine.facade import Engine
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import webhooks_service_pb2_grpc as hooks_grpc


class WebhooksServicer(hooks_grpc.WebhooksServiceServicer):
    """Turns webhook deliveries into triggers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def DeliverWebhook(self, request: hooks_pb.DeliverWebhookRequest,
                             context: grpc.aio.ServicerContext) -> pb.WorkflowRun:
        wf = await self._engine.workflows.webhook_target(request.token)
        caller = dataclasses.replace(caller_from(context), project=wf.project_id)
        req = TriggerRequest(workflow_id=wf.id, project_id=wf.project_id,
                             payload=convert.struct_to_dict(request, "payload"),
                             idempotency_key=convert.idempotency_key("", context.invocation_metadata()))
        run = await self._engine.runs.trigger(req, caller)
        return convert.run_to_proto(run, self._engine.clock.now())
