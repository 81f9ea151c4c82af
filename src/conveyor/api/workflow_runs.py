"""WorkflowRunsService: trigger, inspect and steer runs (SPEC §3) over the engine's `runs`.

WatchWorkflowRun streams a snapshot and then the run's events (SPEC §5); WatchProjectRuns every
run status change of a project, resumable from a cursor. Errors after a stream began are its
last message (StreamError): SSE clients see no status once the body started.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

import grpc

from conveyor.api import convert
from conveyor.api.caller import caller_from
from conveyor.api.errors import stream_error
from conveyor.domain.fanout import progress_of
from conveyor.domain.records import EventRecord, RunRecord
from conveyor.engine.facade import Engine
from conveyor.engine.watch import Heartbeat, Snapshot
from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from conveyor.v1 import workflow_runs_service_pb2_grpc as runs_grpc

# Events whose watch message is kept for the next watcher (a few pages of a busy run).
_EVENT_MESSAGES = 4096


class EventMessages:
    """Each event's watch message, built once for every watcher it goes to: the 1,000 watchers
    of a run share one tail (engine/tails.py), so they also share one conversion."""

    def __init__(self, size: int = _EVENT_MESSAGES) -> None:
        self._size = size
        self._messages: OrderedDict[tuple[str, int], runs_pb.WatchWorkflowRunResponse] = OrderedDict()

    def of(self, event: EventRecord) -> runs_pb.WatchWorkflowRunResponse:
        key = (event.workflow_run_id, event.seq)  # an event never changes once written
        message = self._messages.get(key)
        if message is None:
            message = self._messages[key] = runs_pb.WatchWorkflowRunResponse(
                event=convert.event_to_proto(event))
            if len(self._messages) > self._size:
                self._messages.popitem(last=False)
        return message


class WorkflowRunsServicer(runs_grpc.WorkflowRunsServiceServicer):
    """Run-level use cases: one engine call per RPC, converted both ways."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._event_messages = EventMessages()

    def _run(self, run: RunRecord) -> pb.WorkflowRun:
        # The engine's clock, not the wall clock, ends a live run's duration (tests inject it).
        return convert.run_to_proto(run, self._engine.clock.now())

    async def TriggerWorkflowRun(self, request: runs_pb.TriggerWorkflowRunRequest,
                                 context: grpc.aio.ServicerContext) -> pb.WorkflowRun:
        req = convert.trigger_request(request, context.invocation_metadata())
        run = await self._engine.runs.trigger(req, caller=caller_from(context))
        return self._run(run)

    async def GetWorkflowRun(self, request: runs_pb.GetWorkflowRunRequest,
                             context: grpc.aio.ServicerContext) -> pb.WorkflowRun:
        run = await self._engine.runs.get(request.workflow_run_id, caller=caller_from(context))
        return self._run(run)

    async def ListWorkflowRuns(self, request: runs_pb.ListWorkflowRunsRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WorkflowRun]:
        query = convert.run_query(request)
        if query is None:  # a filter of only `unspecified` statuses: nothing can match
            return
        page = await self._engine.runs.list(query, request.limit, request.page_token,
                                            caller=caller_from(context))
        await convert.send_next_page_token(context, page.next_token)
        now = self._engine.clock.now()  # one instant for the page's live durations
        to_proto = convert.run_to_proto
        # One run converted per message, not the page up front: only one message is alive at a
        # time (a 1,000-run page of maximum-size documents would take gigabytes as messages),
        # and the loop gets a turn between runs.
        for run in page.items:
            yield to_proto(run, now)

    async def CancelWorkflowRun(self, request: runs_pb.CancelWorkflowRunRequest,
                                context: grpc.aio.ServicerContext) -> runs_pb.CancelWorkflowRunResponse:
        await self._engine.runs.cancel(request.workflow_run_id, caller=caller_from(context))
        return runs_pb.CancelWorkflowRunResponse()

    async def PauseWorkflowRun(self, request: runs_pb.PauseWorkflowRunRequest,
                               context: grpc.aio.ServicerContext) -> runs_pb.PauseWorkflowRunResponse:
        await self._engine.runs.pause(request.workflow_run_id, caller=caller_from(context))
        return runs_pb.PauseWorkflowRunResponse()

    async def ResumeWorkflowRun(self, request: runs_pb.ResumeWorkflowRunRequest,
                                context: grpc.aio.ServicerContext) -> runs_pb.ResumeWorkflowRunResponse:
        await self._engine.runs.resume(request.workflow_run_id, caller=caller_from(context))
        return runs_pb.ResumeWorkflowRunResponse()

    async def RetryWorkflowRun(self, request: runs_pb.RetryWorkflowRunRequest,
                               context: grpc.aio.ServicerContext) -> pb.WorkflowRun:
        run = await self._engine.runs.retry(request.workflow_run_id, caller=caller_from(context))
        return self._run(run)

    async def BulkCancelWorkflowRuns(
            self, request: runs_pb.BulkCancelWorkflowRunsRequest,
            context: grpc.aio.ServicerContext) -> runs_pb.BulkCancelWorkflowRunsResponse:
        canceled, failed = await self._engine.runs.bulk_cancel(list(request.workflow_run_ids),
                                                               caller=caller_from(context))
        return runs_pb.BulkCancelWorkflowRunsResponse(canceled=canceled, failed=failed)

    async def BulkReplayWorkflowRuns(
            self, request: runs_pb.BulkReplayWorkflowRunsRequest,
            context: grpc.aio.ServicerContext) -> runs_pb.BulkReplayWorkflowRunsResponse:
        replayed, failed = await self._engine.runs.bulk_replay(list(request.workflow_run_ids),
                                                               caller=caller_from(context))
        return runs_pb.BulkReplayWorkflowRunsResponse(replayed=replayed, failed=failed)

    async def ListRunEvents(self, request: runs_pb.ListRunEventsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunEvent]:
        page = await self._engine.runs.events(request.workflow_run_id, request.after_seq,
                                              request.limit, request.page_token,
                                              caller=caller_from(context))
        await convert.send_next_page_token(context, page.next_token)
        for event in page.items:
            yield convert.event_to_proto(event)

    async def AddRunComment(self, request: runs_pb.AddRunCommentRequest,
                            context: grpc.aio.ServicerContext) -> pb.RunComment:
        event = await self._engine.runs.comment(request.workflow_run_id, request.content,
                                                caller=caller_from(context))
        return convert.comment_to_proto(event)

    async def ListRunComments(self, request: runs_pb.ListRunCommentsRequest,
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.RunComment]:
        page = await self._engine.runs.comments(request.workflow_run_id, request.limit, request.page_token,
                                                caller=caller_from(context))
        await convert.send_next_page_token(context, page.next_token)
        for event in page.items:
            yield convert.comment_to_proto(event)

    async def WatchWorkflowRun(
            self, request: runs_pb.WatchWorkflowRunRequest,
            context: grpc.aio.ServicerContext) -> AsyncIterator[runs_pb.WatchWorkflowRunResponse]:
        items = await self._engine.watches.watch_run(request.workflow_run_id, request.after_seq,
                                                     caller=caller_from(context))
        await _open_stream(context)
        async with contextlib.aclosing(items):
            try:
                async for item in items:
                    if isinstance(item, Snapshot):
                        progress = progress_of(item.steps)  # a map's, from its items among them
                        snapshot = runs_pb.RunSnapshot(
                            run=self._run(item.run), seq=item.seq,
                            steps=[convert.step_to_proto(s, progress.get(s.id)) for s in item.steps])
                        yield runs_pb.WatchWorkflowRunResponse(snapshot=snapshot)
                    elif isinstance(item, Heartbeat):
                        yield runs_pb.WatchWorkflowRunResponse(heartbeat=convert.heartbeat_to_proto(item.at))
                    else:
                        yield self._event_messages.of(item)
            except Exception as e:
                # The stream began: an HTTP/1.1 client can no longer see a status (SSE), so the
                # error is the stream's last message instead.
                yield runs_pb.WatchWorkflowRunResponse(error=stream_error(e, "WatchWorkflowRun"))

    async def WatchProjectRuns(
            self, request: runs_pb.WatchProjectRunsRequest,
            context: grpc.aio.ServicerContext) -> AsyncIterator[runs_pb.WatchProjectRunsResponse]:
        statuses = convert.run_statuses(request.status)
        if statuses is None:  # only `unspecified`: no change can match
            return
        items = await self._engine.watches.watch_project(request.project_id, list(request.workflow_id),
                                                         [str(s) for s in statuses], request.cursor,
                                                         caller=caller_from(context))
        await _open_stream(context)
        async with contextlib.aclosing(items):
            try:
                async for item in items:
                    if isinstance(item, Heartbeat):
                        yield runs_pb.WatchProjectRunsResponse(heartbeat=convert.heartbeat_to_proto(item.at))
                    else:
                        yield runs_pb.WatchProjectRunsResponse(run=self._run(item.run), cursor=item.cursor)
            except Exception as e:
                yield runs_pb.WatchProjectRunsResponse(error=stream_error(e, "WatchProjectRuns"))


async def _open_stream(context: grpc.aio.ServicerContext) -> None:
    """A watch was accepted: its headers go out now, not with its first message (a project
    watch may have nothing to send for a heartbeat period), so a REST client behind Envoy gets
    its 200 and text/event-stream at once. A refusal (NOT_FOUND, INVALID_ARGUMENT ...) was
    raised before this, as a status (404, 400 ... over REST); after it, errors are messages."""
    await context.send_initial_metadata(())
