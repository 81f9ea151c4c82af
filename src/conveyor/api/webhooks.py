"""WebhooksService: a POST to a workflow's webhook URL triggers a run (seed 004's webhook_url).

The token in the URL is the credential (the gate asks for no key): it names one workflow, and
the delivery may do exactly one thing, trigger that workflow, in its project, with the body as
payload and the `Idempotency-Key` header honored, as `webhook`. Unknown, rotated-away and
disabled tokens all answer the same NOT_FOUND. Over REST the body arrives raw and must be a JSON
object (api/bodies.py). An `X-Conveyor-Lineage` header this server signed (a notification of one
of its runs) makes the run join that run's family (engine/webhooks.py).
"""

from __future__ import annotations

import dataclasses

import grpc

from conveyor.api import convert
from conveyor.api.caller import bind, caller_from
from conveyor.domain.families import LINEAGE_HEADER
from conveyor.engine.facade import Engine
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import webhooks_service_pb2 as hooks_pb
from conveyor.v1 import webhooks_service_pb2_grpc as hooks_grpc

# The gRPC metadata key Envoy forwards the X-Conveyor-Lineage header as.
_LINEAGE_KEY = LINEAGE_HEADER.lower()


class WebhooksServicer(hooks_grpc.WebhooksServiceServicer):
    """Turns webhook deliveries into triggers."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def DeliverWebhook(self, request: hooks_pb.DeliverWebhookRequest,
                             context: grpc.aio.ServicerContext) -> pb.WorkflowRun:
        wf = await self._engine.workflows.webhook_target(request.token)
        # The delivery proved its webhook: from here on, a refusal is audited like a key's (the
        # gate counts those of tokens that name no webhook instead, api/access.py).
        bind(dataclasses.replace(caller_from(context), project=wf.project_id))
        metadata = context.invocation_metadata() or ()
        lineage = next((v for k, v in metadata if k == _LINEAGE_KEY and isinstance(v, str)), "")
        run = await self._engine.webhooks.deliver(wf, convert.struct_to_dict(request, "payload"),
                                                  convert.idempotency_key("", metadata), lineage)
        return convert.run_to_proto(run, self._engine.clock.now())
