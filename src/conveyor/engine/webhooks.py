"""Webhook deliveries (README "Inbound webhooks"): a POST to a workflow's webhook URL, or a
notification this server delivers to one of its own webhook URLs, triggers a run of that workflow
in its project, as `webhook`, with the body as payload.

Owns what a delivery carries besides its body: the Idempotency-Key, and its cause
(domain/families.py). A delivery whose X-Conveyor-Lineage header this server signed, or that the
notifier hands over directly, joins the family of the run whose notification it is: a workflow
its own family reaches again is refused FAILED_PRECONDITION WORKFLOW_LOOP, and a chain of runs
started by notifications is at most `max_nesting_depth` long (NESTING_TOO_DEEP).
"""

from __future__ import annotations

from typing import Any

from conveyor.domain.actors import WEBHOOK
from conveyor.domain.families import Cause, verified_cause
from conveyor.domain.records import Caller, RunRecord, TriggerRequest, WorkflowRecord
from conveyor.engine.triggers import Triggers
from conveyor.engine.workflows import WorkflowService


class Webhooks:
    """Turns webhook deliveries into triggers."""

    def __init__(self, workflows: WorkflowService, triggers: Triggers, secret: str) -> None:
        self.workflows = workflows
        self.triggers = triggers
        self.secret = secret

    async def deliver(self, wf: WorkflowRecord, payload: dict[str, Any], idempotency_key: str = "",
                      lineage_header: str = "") -> RunRecord:
        """A delivery over the API to `wf`'s webhook (the API found it by its token first,
        `WorkflowService.webhook_target`); its lineage header counts only when this server
        signed it."""
        return await self._trigger(wf, payload, idempotency_key, verified_cause(self.secret, lineage_header))

    async def deliver_caused(self, token: str, payload: dict[str, Any], idempotency_key: str,
                             cause: Cause | None) -> RunRecord:
        """A delivery whose cause is known (the notifier's, to this server's own webhook URL):
        NOT_FOUND when the token names no webhook."""
        wf = await self.workflows.webhook_target(token)
        return await self._trigger(wf, payload, idempotency_key, cause)

    async def _trigger(self, wf: WorkflowRecord, payload: dict[str, Any], idempotency_key: str,
                       cause: Cause | None) -> RunRecord:
        req = TriggerRequest(workflow_id=wf.id, project_id=wf.project_id, payload=payload,
                             idempotency_key=idempotency_key, caused_by=cause)
        return await self.triggers.trigger(req, Caller(name=WEBHOOK, project=wf.project_id, role="operator"))
