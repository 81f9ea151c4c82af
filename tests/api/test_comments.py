"""Run comments through the real server: each is a `run.comment` event of the run (listed with the
events, sent to watchers), listed alone and paged; empty, oversized and foreign ones are refused."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from conveyor.v1 import resources_pb2 as pb
from conveyor.v1 import workflow_runs_service_pb2 as runs_pb
from tests.api.support import Api, failure, gated, listed, stream_failure, two_steps
from tests.auth import bearer, key


async def comment(api: Api, run_id: str, content: str, metadata: Any = ()) -> pb.RunComment:
    return await api.runs.AddRunComment(runs_pb.AddRunCommentRequest(workflow_run_id=run_id, content=content),
                                        metadata=metadata)


async def comments(api: Api, run_id: str, metadata: Any = (),
                   **fields: Any) -> tuple[list[pb.RunComment], str]:
    return await listed(api.runs.ListRunComments(
        runs_pb.ListRunCommentsRequest(workflow_run_id=run_id, **fields), metadata=metadata))


async def events(api: Api, run_id: str) -> list[pb.RunEvent]:
    items, _ = await listed(api.runs.ListRunEvents(runs_pb.ListRunEventsRequest(workflow_run_id=run_id,
                                                                                 limit=1000)))
    return items


async def waiting_run(api: Api, project: str = "default") -> pb.WorkflowRun:
    wf = await api.create_workflow({**gated(), "project_id": project})
    run = await api.trigger(wf.id)
    await api.engine.tick()
    return run


async def test_a_comment_is_a_run_comment_event_with_its_author(api: Api) -> None:
    run = await waiting_run(api, "acme")
    operator = bearer(await key(api.engine, "alice", "acme", "operator"))
    api.clock.advance(60)
    before = await events(api, run.id)

    added = await comment(api, run.id, "  looks good, approving after lunch  ", metadata=operator)

    assert added.workflow_run_id == run.id
    assert added.content == "  looks good, approving after lunch  "
    assert added.created_by == "alice"
    assert added.seq == before[-1].seq + 1
    assert added.created_at.ToDatetime().replace(tzinfo=None) == api.clock.now().replace(tzinfo=None)
    after = await events(api, run.id)
    assert after[:-1] == before
    event = after[-1]
    assert (event.seq, event.type, event.message, event.actor) == (added.seq, "run.comment", added.content,
                                                                    "alice")
    # It changes nothing else about the run.
    got = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    assert got.status == pb.RunStatus.running
    listed_comments, token = await comments(api, run.id)
    assert listed_comments == [added] and token == ""


async def test_comments_list_alone_in_order_and_paged(api: Api) -> None:
    run = await waiting_run(api)
    written = []
    for i in range(5):
        written.append(await comment(api, run.id, f"note {i}"))
        # Other events in between must not show up among the comments.
        await api.runs.PauseWorkflowRun(runs_pb.PauseWorkflowRunRequest(workflow_run_id=run.id))
        await api.runs.ResumeWorkflowRun(runs_pb.ResumeWorkflowRunRequest(workflow_run_id=run.id))

    seen: list[pb.RunComment] = []
    token = ""
    pages = 0
    while True:
        items, token = await comments(api, run.id, limit=2, page_token=token)
        assert len(items) <= 2
        seen += items
        pages += 1
        if not token:
            break
    assert pages == 3
    assert seen == written
    assert [c.content for c in seen] == [f"note {i}" for i in range(5)]
    assert [c.seq for c in seen] == sorted(c.seq for c in seen)
    kinds = [e.type for e in await events(api, run.id)]
    assert kinds.count("run.comment") == 5 and "run.paused" in kinds
    err = await stream_failure(api.runs.ListRunComments(
        runs_pb.ListRunCommentsRequest(workflow_run_id=run.id, page_token="forged")))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_watcher_sees_the_comment(api: Api) -> None:
    run = await waiting_run(api)
    call = api.runs.WatchWorkflowRun(runs_pb.WatchWorkflowRunRequest(workflow_run_id=run.id))
    stream = call.__aiter__()
    try:
        first = await anext(stream)
        assert first.HasField("snapshot")
        added = await comment(api, run.id, "watch this")
        async with asyncio.timeout(10):
            while True:
                item = await anext(stream)
                if item.HasField("event") and item.event.type == "run.comment":
                    break
        assert (item.event.seq, item.event.message, item.event.actor) == (added.seq, "watch this",
                                                                           "test-admin")
    finally:
        call.cancel()


async def test_a_finished_run_takes_comments(api: Api) -> None:
    wf = await api.create_workflow(two_steps())
    run = await api.trigger(wf.id)
    await api.engine.tick()
    done = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    assert done.status == pb.RunStatus.completed

    added = await comment(api, run.id, "post-mortem: fine")

    assert (await events(api, run.id))[-1].type == "run.comment"
    again = await api.runs.GetWorkflowRun(runs_pb.GetWorkflowRunRequest(workflow_run_id=run.id))
    assert again.status == pb.RunStatus.completed and again.finished_at == done.finished_at
    assert (await comments(api, run.id))[0] == [added]


async def test_empty_whitespace_and_oversized_comments_are_refused(api: Api) -> None:
    run = await waiting_run(api)
    before = await events(api, run.id)
    for content in ("", "   ", "\n\t ", "x" * 10_001, "nul\x00byte"):
        err = await failure(comment(api, run.id, content))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, content[:10]
        assert err.info is not None and err.info.reason
        assert [f for f, _ in err.violations] == ["content"]
    assert await events(api, run.id) == before
    # The limit itself is fine, and kept whole.
    longest = await comment(api, run.id, "y" * 10_000)
    assert (await comments(api, run.id))[0][0].content == "y" * 10_000 == longest.content


async def test_viewers_may_read_but_not_comment_and_foreign_runs_are_absent(api: Api) -> None:
    run = await waiting_run(api, "acme")
    await comment(api, run.id, "hello")
    viewer = bearer(await key(api.engine, "acme-viewer", "acme", "viewer"))
    foreign = bearer(await key(api.engine, "beta-op", "beta", "operator"))
    before = await events(api, run.id)

    err = await failure(comment(api, run.id, "me too", metadata=viewer))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.info is not None
    assert err.info.reason == "ROLE_TOO_LOW"
    assert [c.content for c in (await comments(api, run.id, metadata=viewer))[0]] == ["hello"]

    err = await failure(comment(api, run.id, "sneaky", metadata=foreign))
    assert err.code == grpc.StatusCode.NOT_FOUND and err.info is not None
    assert err.info.reason == "RUN_NOT_FOUND"
    missing = await failure(comment(api, "no-such-run", "x", metadata=foreign))
    assert missing.code == err.code and missing.info is not None and missing.info.reason == err.info.reason
    err = await stream_failure(api.runs.ListRunComments(
        runs_pb.ListRunCommentsRequest(workflow_run_id=run.id), metadata=foreign))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert await events(api, run.id) == before
