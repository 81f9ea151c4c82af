"""`conveyor workflows`: list, show, apply (create or update by name) and archive workflows."""

from __future__ import annotations

import click

from conveyor.cli.output import Output, output_options

PROJECT_HELP = "Project (default: the key's, else 'default')."


@click.group()
def workflows() -> None:
    """List, show, apply and archive workflows."""


@workflows.command("list")
@click.option("-p", "--project", default="", help="Only this project's workflows.")
@click.option("--archived", is_flag=True, help="Include archived workflows.")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=0, help="At most this many (0: all).")
@output_options
@click.pass_context
def list_workflows(ctx: click.Context, project: str, archived: bool, limit: int, out: Output) -> None:
    """List workflows."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import WORKFLOW
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    with connect(ctx) as api:
        request = wf_pb.ListWorkflowsRequest(project_id=project, include_archived=archived)
        out.many(api.pages(api.workflows.ListWorkflows, request, limit), WORKFLOW)


@workflows.command("get")
@click.argument("workflow")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@output_options
@click.pass_context
def get_workflow(ctx: click.Context, workflow: str, project: str, out: Output) -> None:
    """Show WORKFLOW (id or name); -o json prints its whole definition."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import WORKFLOW
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    with connect(ctx) as api:
        request = wf_pb.GetWorkflowRequest(workflow_id=workflow, project_id=project)
        wf = api.call(api.workflows.GetWorkflow, request)
    out.one(wf, WORKFLOW)


@workflows.command("apply")
@click.option("-f", "--file", "path", required=True, metavar="FILE",
              help="The definition: a .json, .yaml or .yml file (-: standard input).")
@click.option("-p", "--project", default="", help=PROJECT_HELP + " Overrides the file's project_id.")
@output_options
@click.pass_context
def apply(ctx: click.Context, path: str, project: str, out: Output) -> None:
    """Create the workflow a file defines, or update it to a new version when a workflow of that
    name exists in the project."""
    from google.protobuf import json_format

    from conveyor.cli.args import load_definition
    from conveyor.cli.client import connect
    from conveyor.cli.errors import NOT_FOUND, CliError
    from conveyor.cli.views import WORKFLOW
    from conveyor.v1 import resources_pb2 as pb
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    data = load_definition(path)
    if project:
        data["project_id"] = project
    try:
        definition = json_format.ParseDict(data, pb.Workflow())
    except json_format.ParseError as e:
        raise click.BadParameter(str(e), param_hint="-f") from e
    if not definition.name:
        raise click.BadParameter(f"{path}: the definition has no name", param_hint="-f")
    with connect(ctx) as api:
        try:
            current = api.call(api.workflows.GetWorkflow, wf_pb.GetWorkflowRequest(
                workflow_id=definition.name, project_id=definition.project_id))
        except CliError as e:
            if e.exit_code != NOT_FOUND:
                raise
            wf = api.call(api.workflows.CreateWorkflow, wf_pb.CreateWorkflowRequest(workflow=definition))
            action = "created"
        else:
            wf = api.call(api.workflows.UpdateWorkflow,
                          wf_pb.UpdateWorkflowRequest(workflow_id=current.id, workflow=definition))
            action = "updated"
    # What happened goes to stderr: stdout holds the workflow, in the format asked for.
    click.echo(f"workflow {wf.name} {action} (version {wf.version})", err=True)
    out.one(wf, WORKFLOW)


@workflows.command("archive")
@click.argument("workflow")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.pass_context
def archive(ctx: click.Context, workflow: str, project: str) -> None:
    """Archive WORKFLOW (id or name): it starts no new runs; its runs stay."""
    from conveyor.cli.client import connect
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    with connect(ctx) as api:
        request = wf_pb.ArchiveWorkflowRequest(workflow_id=workflow, project_id=project)
        api.call(api.workflows.ArchiveWorkflow, request)
    click.echo(f"workflow {workflow} archived")


@workflows.group("webhook")
def webhook() -> None:
    """Enable, rotate or disable a workflow's inbound webhook."""


@webhook.command("rotate")
@click.argument("workflow")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.pass_context
def rotate_webhook(ctx: click.Context, workflow: str, project: str) -> None:
    """Enable WORKFLOW's webhook with a new secret URL, printed once (the old URL stops working)."""
    from conveyor.cli.client import connect
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    with connect(ctx) as api:
        answer = api.call(api.workflows.RotateWebhook,
                          wf_pb.RotateWebhookRequest(workflow_id=workflow, project_id=project))
    click.echo("POST a JSON object to this URL to trigger a run (shown this once):", err=True)
    click.echo(answer.webhook_url)


@webhook.command("disable")
@click.argument("workflow")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.pass_context
def disable_webhook(ctx: click.Context, workflow: str, project: str) -> None:
    """Disable WORKFLOW's webhook: its URL answers 404."""
    from conveyor.cli.client import connect
    from conveyor.v1 import workflows_service_pb2 as wf_pb

    with connect(ctx) as api:
        api.call(api.workflows.DisableWebhook,
                 wf_pb.DisableWebhookRequest(workflow_id=workflow, project_id=project))
    click.echo(f"workflow {workflow}: webhook disabled")
