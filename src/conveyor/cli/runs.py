"""`conveyor runs`: list, show, trigger, follow and steer workflow runs, one or in bulk.

`--wait` (trigger, retry) follows the run with WatchWorkflowRun, printing its events on stderr,
then prints the run as it ended and exits 1 unless it completed (like `gh run watch
--exit-status`). Bulk commands resolve their filters to run ids with the same listing `runs
list` uses, then ask "apply to N runs? [y/N]" unless --yes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from conveyor.cli.args import JSON_OBJECT, KEY_VALUE, Moment
from conveyor.cli.errors import FAILURE, CliError
from conveyor.cli.output import Output, output_options

if TYPE_CHECKING:
    from conveyor.cli.client import Client

# RunStatus.Value names (the proto's), spelled out so `--help` needs no protobuf import.
RUN_STATUSES = ("pending", "running", "paused", "completed", "failed", "timed_out", "canceled")


@click.group()
def runs() -> None:
    """List, trigger, follow and steer workflow runs."""


def run_filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters of ListWorkflowRuns, shared by `runs list` and the bulk commands."""
    for option in reversed([
        click.option("-w", "--workflow", multiple=True,
                     help="Runs of this workflow (id or name); repeatable."),
        click.option("-s", "--status", multiple=True, type=click.Choice(RUN_STATUSES),
                     help="Runs in this status; repeatable."),
        click.option("-p", "--project", default="", help="Project (default: the key's, else 'default')."),
        click.option("--tag", multiple=True, type=KEY_VALUE, help="Runs with this tag; repeatable."),
        click.option("--triggered-by", default="", help="Runs of this initiator."),
        click.option("--search", default="",
                     help="Runs of workflows whose name or description contains this text (any case)."),
    ]):
        command = option(command)
    return command


def _list_request(workflow: tuple[str, ...], status: tuple[str, ...], project: str,
                  tag: tuple[tuple[str, str], ...], triggered_by: str, search: str) -> Any:
    from conveyor.v1 import resources_pb2 as pb
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    return runs_pb.ListWorkflowRunsRequest(
        project_id=project, workflow_id=list(workflow), triggered_by=triggered_by, search=search,
        status=[pb.RunStatus.Value.Value(s) for s in status], tag=[f"{k}:{v}" for k, v in tag])


@runs.command("list")
@run_filters
@click.option("-n", "--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="At most this many runs, newest first (0: all).")
@output_options
@click.pass_context
def list_runs(ctx: click.Context, workflow: tuple[str, ...], status: tuple[str, ...], project: str,
              tag: tuple[tuple[str, str], ...], triggered_by: str, search: str, limit: int,
              out: Output) -> None:
    """List runs, newest first."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import RUN

    with connect(ctx) as api:
        request = _list_request(workflow, status, project, tag, triggered_by, search)
        out.many(api.pages(api.runs.ListWorkflowRuns, request, limit), RUN)


@runs.command("get")
@click.argument("run_id", metavar="RUN_ID")
@output_options
@click.pass_context
def get_run(ctx: click.Context, run_id: str, out: Output) -> None:
    """Show a run (and, on a terminal, its steps)."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import RUN, STEP
    from conveyor.v1 import step_runs_service_pb2 as steps_pb
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    with connect(ctx) as api:
        run = api.call(api.runs.GetWorkflowRun, runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))
        out.one(run, RUN)
        if out.human and out.is_tty:
            steps = api.pages(api.steps.ListStepRuns, steps_pb.ListStepRunsRequest(workflow_run_id=run_id))
            click.echo()
            out.many(steps, STEP, title="Steps")


@runs.command("trigger")
@click.argument("workflow")
@click.option("--payload", type=JSON_OBJECT, help="The run's payload: a JSON object, or @file.")
@click.option("--tag", multiple=True, type=KEY_VALUE, help="Tag the run; repeatable.")
@click.option("--idempotency-key", default="", help="A retried trigger with this key returns the same run.")
@click.option("--run-as", default="", help="Record this initiator instead of the key's name.")
@click.option("-p", "--project", default="", help="Project of the workflow named.")
@click.option("--priority", type=click.IntRange(-100, 100), default=0,
              help="-100..100: higher goes first among runs waiting for a slot and tasks in a queue.")
@click.option("--start-at", type=Moment(), default=None,
              help="Start later: an RFC 3339 time or +N[s|m|h|d] from now (at most a year ahead).")
@click.option("--wait", is_flag=True, help="Follow the run until it ends; exit 1 unless it completed.")
@output_options
@click.pass_context
def trigger(ctx: click.Context, workflow: str, payload: dict[str, Any] | None,
            tag: tuple[tuple[str, str], ...], idempotency_key: str, run_as: str, project: str, priority: int,
            start_at: datetime | None, wait: bool, out: Output) -> None:
    """Trigger a run of WORKFLOW (id or name)."""
    from conveyor.cli.client import connect
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    request = runs_pb.TriggerWorkflowRunRequest(workflow_id=workflow, project_id=project, tags=dict(tag),
                                                idempotency_key=idempotency_key, run_as=run_as,
                                                priority=priority)
    if start_at is not None:
        request.start_at.FromDatetime(start_at)
    if payload is not None:
        request.payload.update(payload)
    with connect(ctx) as api:
        run = api.call(api.runs.TriggerWorkflowRun, request)
        _show_or_wait(ctx, api, run, wait, out)


@runs.command("retry")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--wait", is_flag=True, help="Follow the new run until it ends; exit 1 unless it completed.")
@output_options
@click.pass_context
def retry(ctx: click.Context, run_id: str, wait: bool, out: Output) -> None:
    """Retry a finished run as a new run of the same version and payload."""
    from conveyor.cli.client import connect
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    with connect(ctx) as api:
        run = api.call(api.runs.RetryWorkflowRun, runs_pb.RetryWorkflowRunRequest(workflow_run_id=run_id))
        _show_or_wait(ctx, api, run, wait, out)


def _show_or_wait(ctx: click.Context, api: Client, run: Any, wait: bool, out: Output) -> None:
    from conveyor.cli.views import RUN, TERMINAL_RUN_STATUSES, run_status
    from conveyor.v1 import resources_pb2 as pb

    if not wait:
        out.one(run, RUN)
        return
    click.echo(f"run {run.id} ({run.workflow_name or run.workflow_id}): {run_status(run)}", err=True)
    if run.status not in TERMINAL_RUN_STATUSES:
        run = follow(api, run.id)
    out.one(run, RUN)
    if run.status != pb.RunStatus.completed:
        ctx.exit(FAILURE)


def follow(api: Client, run_id: str) -> Any:
    """Watch a run until its stream ends (the run ended), printing its events on stderr; the run
    as it ended."""
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    request = runs_pb.WatchWorkflowRunRequest(workflow_run_id=run_id)
    for message in api.stream(api.runs.WatchWorkflowRun, request):
        kind = message.WhichOneof("message")
        if kind == "event":
            e = message.event
            # "step.failed" already says the status; "run.comment" does not.
            parts = [e.type, e.step_ref, "" if e.type.endswith("." + e.status) else e.status, e.message]
            click.echo("  " + " ".join(p for p in parts if p), err=True)
        elif kind == "error":
            raise CliError(message.error.message, FAILURE, message.error.reason)
    return api.call(api.runs.GetWorkflowRun, runs_pb.GetWorkflowRunRequest(workflow_run_id=run_id))


def _transition(name: str, rpc: str, request_type: str, done: str) -> click.Command:
    """`runs cancel|pause|resume RUN_ID`: one call, one line saying what happened."""

    @click.pass_context
    def command(ctx: click.Context, run_id: str) -> None:
        from conveyor.cli.client import connect
        from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

        with connect(ctx) as api:
            api.call(getattr(api.runs, rpc), getattr(runs_pb, request_type)(workflow_run_id=run_id))
        click.echo(f"run {run_id} {done}")

    command.__doc__ = f"{name.capitalize()} a run."
    return click.argument("run_id", metavar="RUN_ID")(click.command(name)(command))


runs.add_command(_transition("cancel", "CancelWorkflowRun", "CancelWorkflowRunRequest", "canceled"))
runs.add_command(_transition("pause", "PauseWorkflowRun", "PauseWorkflowRunRequest", "paused"))
runs.add_command(_transition("resume", "ResumeWorkflowRun", "ResumeWorkflowRunRequest", "resumed"))


@runs.command("comment")
@click.argument("run_id", metavar="RUN_ID")
@click.argument("content")
@output_options
@click.pass_context
def comment(ctx: click.Context, run_id: str, content: str, out: Output) -> None:
    """Add a comment to a run (it is also an event of the run)."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import COMMENT
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    with connect(ctx) as api:
        added = api.call(api.runs.AddRunComment,
                         runs_pb.AddRunCommentRequest(workflow_run_id=run_id, content=content))
    out.one(added, COMMENT)


@runs.command("comments")
@click.argument("run_id", metavar="RUN_ID")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=0, help="At most this many (0: all).")
@output_options
@click.pass_context
def comments(ctx: click.Context, run_id: str, limit: int, out: Output) -> None:
    """A run's comments, oldest first."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import COMMENT
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    with connect(ctx) as api:
        request = runs_pb.ListRunCommentsRequest(workflow_run_id=run_id)
        out.many(api.pages(api.runs.ListRunComments, request, limit), COMMENT)


@runs.command("events")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only events after this seq.")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=0, help="At most this many (0: all).")
@output_options
@click.pass_context
def events(ctx: click.Context, run_id: str, after: int, limit: int, out: Output) -> None:
    """A run's event history, oldest first."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import EVENT
    from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

    with connect(ctx) as api:
        request = runs_pb.ListRunEventsRequest(workflow_run_id=run_id, after_seq=after)
        out.many(api.pages(api.runs.ListRunEvents, request, limit), EVENT)


def _bulk(name: str, rpc: str, request_type: str, counted: str) -> click.Command:
    """`runs bulk-cancel|bulk-replay [RUN_ID...] [filters]`."""

    @click.pass_context
    def command(ctx: click.Context, run_ids: tuple[str, ...], workflow: tuple[str, ...],
                status: tuple[str, ...], project: str, tag: tuple[tuple[str, str], ...], triggered_by: str,
                search: str, yes: bool, out: Output) -> None:
        from conveyor.cli.client import MAX_PAGE, connect
        from conveyor.v1 import workflow_runs_service_pb2 as runs_pb

        filtered = bool(workflow or status or project or tag or triggered_by or search)
        if run_ids and filtered:
            raise click.UsageError("name runs either by id or by filters, not both")
        if not run_ids and not filtered:
            raise click.UsageError("name the runs: ids, or at least one filter (--workflow, --status, ...)")
        with connect(ctx) as api:
            ids = list(run_ids) or [run.id for run in api.pages(
                api.runs.ListWorkflowRuns, _list_request(workflow, status, project, tag, triggered_by,
                                                         search))]
            if not ids:
                click.echo("no runs match", err=True)
                return
            if not yes and not _confirm(f"{name}: apply to {len(ids)} runs? [y/N] "):
                raise CliError("nothing done", FAILURE)
            method = getattr(api.runs, rpc)
            done = failed = 0
            # The server takes at most MAX_PAGE ids a call (max_bulk_ids).
            for start in range(0, len(ids), MAX_PAGE):
                chunk = ids[start:start + MAX_PAGE]
                answer = api.call(method, getattr(runs_pb, request_type)(workflow_run_ids=chunk))
                done += getattr(answer, counted)
                failed += answer.failed
        if out.format in ("json", "jsonl"):
            import json

            click.echo(json.dumps({counted: done, "failed": failed}))
        else:
            click.echo(f"{counted} {done}, failed {failed}")
        if failed:
            ctx.exit(FAILURE)

    command.__doc__ = (f"{name.split('-')[1].capitalize()} many runs: the RUN_IDs, or every run the filters "
                       f"match. Asks first unless --yes; exits 1 when any run could not be changed.")
    command = output_options(command)
    command = click.option("-y", "--yes", is_flag=True, help="Do not ask.")(command)
    command = run_filters(command)
    command = click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")(command)
    return click.command(name)(command)


runs.add_command(_bulk("bulk-cancel", "BulkCancelWorkflowRuns", "BulkCancelWorkflowRunsRequest", "canceled"))
runs.add_command(_bulk("bulk-replay", "BulkReplayWorkflowRuns", "BulkReplayWorkflowRunsRequest", "replayed"))


def _confirm(prompt: str) -> bool:
    """Ask on stderr, read one line of stdin: only y or yes agrees (end of input is no)."""
    click.echo(prompt, nl=False, err=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")
