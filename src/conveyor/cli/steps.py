"""`conveyor steps`: act on one step of a run — approve, input, skip, force-complete, retry,
replay — and list a run's steps."""

from __future__ import annotations

from typing import Any

import click

from conveyor.cli.args import JSON_OBJECT
from conveyor.cli.output import Output, output_options


@click.group()
def steps() -> None:
    """Act on one step of a run: approve, input, skip, force-complete, retry, replay."""


def _step_call(ctx: click.Context, rpc: str, request_type: str, run_id: str, step_ref: str,
               **fields: Any) -> Any:
    """Call one StepRunsService operation on RUN_ID's STEP_REF; its answer."""
    from conveyor.cli.client import connect
    from conveyor.v1 import step_runs_service_pb2 as steps_pb

    request = getattr(steps_pb, request_type)(workflow_run_id=run_id, step_ref=step_ref)
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(request, name).update(value)
        elif value is not None:
            setattr(request, name, value)
    with connect(ctx) as api:
        return api.call(getattr(api.steps, rpc), request)


def step_command(name: str) -> Any:
    """A `steps NAME RUN_ID STEP_REF` command."""

    def decorate(command: Any) -> click.Command:
        command = click.argument("step_ref")(command)
        command = click.argument("run_id", metavar="RUN_ID")(command)
        return steps.command(name)(click.pass_context(command))

    return decorate


@step_command("approve")
@click.option("-m", "--comment", default="", help="Recorded with the approval.")
def approve(ctx: click.Context, run_id: str, step_ref: str, comment: str) -> None:
    """Approve a waiting approval step."""
    _step_call(ctx, "ApproveStep", "ApproveStepRequest", run_id, step_ref, comment=comment)
    click.echo(f"step {step_ref} of run {run_id} approved")


@step_command("input")
@click.option("-d", "--data", type=JSON_OBJECT, required=True,
              help="The input: a JSON object, or @file; it becomes the step's output.")
def submit_input(ctx: click.Context, run_id: str, step_ref: str, data: dict[str, Any]) -> None:
    """Submit the data a waiting input step asks for."""
    _step_call(ctx, "SubmitStepInput", "SubmitStepInputRequest", run_id, step_ref, data=data)
    click.echo(f"step {step_ref} of run {run_id} received its input")


@step_command("skip")
@click.option("-r", "--reason", default="", help="Why (recorded on the step).")
def skip(ctx: click.Context, run_id: str, step_ref: str, reason: str) -> None:
    """Skip a step that has not finished."""
    _step_call(ctx, "SkipStep", "SkipStepRequest", run_id, step_ref, reason=reason)
    click.echo(f"step {step_ref} of run {run_id} skipped")


@step_command("force-complete")
@click.option("--result", type=JSON_OBJECT, help="The step's output: a JSON object, or @file.")
def force_complete(ctx: click.Context, run_id: str, step_ref: str, result: dict[str, Any] | None) -> None:
    """Mark a step completed without running it (or the rest of it)."""
    _step_call(ctx, "ForceCompleteStep", "ForceCompleteStepRequest", run_id, step_ref, result=result)
    click.echo(f"step {step_ref} of run {run_id} force-completed")


@step_command("retry")
@output_options
def retry(ctx: click.Context, run_id: str, step_ref: str, out: Output) -> None:
    """Retry a failed step (its run resumes)."""
    from conveyor.cli.views import STEP

    answer = _step_call(ctx, "RetryStep", "RetryStepRequest", run_id, step_ref)
    out.one(answer.step_run, STEP)


@step_command("replay")
def replay(ctx: click.Context, run_id: str, step_ref: str) -> None:
    """Run a step and every step after it again."""
    answer = _step_call(ctx, "ReplaySubtree", "ReplaySubtreeRequest", run_id, step_ref)
    click.echo(f"step {step_ref} of run {run_id} replayed: {answer.reset_steps} steps reset")


@steps.command("list")
@click.argument("run_id", metavar="RUN_ID")
@output_options
@click.pass_context
def list_steps(ctx: click.Context, run_id: str, out: Output) -> None:
    """List a run's steps."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import STEP
    from conveyor.v1 import step_runs_service_pb2 as steps_pb

    with connect(ctx) as api:
        request = steps_pb.ListStepRunsRequest(workflow_run_id=run_id)
        out.many(api.pages(api.steps.ListStepRuns, request), STEP)
