"""Conveyor's Python worker SDK: serve `task` steps from your own process.

    from conveyor.sdk import task, Worker

    @task(queue="builds")
    async def build(ctx, input):
        return {"sha": input["commit"][:7]}

    Worker(tasks=[build], slots=8).run()   # or: conveyor worker mymodule:worker

Modules: `task` (the decorator and the handler's `Context`), `errors` (`NonRetryableError`,
`RetryAfter`), `worker` (leasing, heartbeats, reports, shutdown), `values` (JSON <-> Struct),
`threads` (where sync handlers run), `command` (`conveyor worker module:attr`).
The SDK imports only the generated `conveyor.v1` stubs, grpc and protobuf: never the server.
"""

from conveyor.sdk.errors import NonRetryableError, RetryAfter
from conveyor.sdk.task import Context, TaskDefinition, task
from conveyor.sdk.worker import Worker

__all__ = ["Context", "NonRetryableError", "RetryAfter", "TaskDefinition", "Worker", "task"]
