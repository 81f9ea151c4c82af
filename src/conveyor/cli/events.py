"""`conveyor events`: publish an event (operator keys) and list a project's events.

`send` answers what the publish did: the runs it started (workflows whose `on_events` name it),
the waiting steps it completed, and the listening workflows it skipped with their reasons (on
standard error, so a script reading the JSON sees only the event). Sending the same `--id` again
answers the first send; another body with that id is refused (IDEMPOTENCY_KEY_REUSED).
"""

from __future__ import annotations

from typing import Any

import click

from conveyor.cli.args import JSON_OBJECT
from conveyor.cli.output import Output, output_options

PROJECT_HELP = "Project (default: the key's, else 'default')."


@click.group()
def events() -> None:
    """Publish events (they start runs of workflows listening to them) and list them."""


@events.command("send")
@click.argument("name")
@click.option("-k", "--key", default="", help="The event's key (a customer, an order...).")
@click.option("--payload", type=JSON_OBJECT, help="The event's payload: a JSON object, or @file.")
@click.option("--id", "ident", default="", help="Idempotency id: sending it again answers the first send.")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@output_options
@click.pass_context
def send(ctx: click.Context, name: str, key: str, payload: dict[str, Any] | None, ident: str, project: str,
         out: Output) -> None:
    """Publish event NAME; prints it with the runs it started and the steps it resumed."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import PUBLISHED
    from conveyor.v1 import events_service_pb2 as events_pb

    request = events_pb.PublishEventRequest(project_id=project, name=name, key=key, id=ident)
    if payload is not None:
        request.payload.update(payload)
    with connect(ctx) as api:
        event = api.call(api.events.PublishEvent, request)
    out.one(event, PUBLISHED)
    for skipped in event.skipped:
        click.echo(f"skipped workflow {skipped.workflow_name}: {skipped.reason}", err=True)


@events.command("list")
@click.option("--name", default="", help="Only events of this name.")
@click.option("-k", "--key", default="", help="Only events with this key.")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.option("-n", "--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="At most this many (0: all).")
@output_options
@click.pass_context
def list_events(ctx: click.Context, name: str, key: str, project: str, limit: int, out: Output) -> None:
    """List a project's events, newest first."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import PUBLISHED
    from conveyor.v1 import events_service_pb2 as events_pb

    with connect(ctx) as api:
        request = events_pb.ListEventsRequest(project_id=project, name=name, key=key)
        out.many(api.pages(api.events.ListEvents, request, limit), PUBLISHED)
