"""`conveyor audit`: the audit log (admin keys): every write call, accepted or refused."""

from __future__ import annotations

import click

from conveyor.cli.output import Output, output_options


@click.command()
@click.option("-p", "--project", default="", help="Only entries of this project.")
@click.option("--actor", default="", help="Only calls made with this key (its name).")
@click.option("--failures", is_flag=True, help="Only refused calls and triggers that failed to start.")
@click.option("-n", "--limit", type=click.IntRange(min=0), default=50, show_default=True,
              help="At most this many (0: all).")
@output_options
@click.pass_context
def audit(ctx: click.Context, project: str, actor: str, failures: bool, limit: int, out: Output) -> None:
    """List audit entries, newest first."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import AUDIT_ENTRY
    from conveyor.v1 import audit_service_pb2 as audit_pb

    with connect(ctx) as api:
        request = audit_pb.ListAuditEntriesRequest(project_id=project, actor=actor, failures_only=failures)
        out.many(api.pages(api.audit.ListAuditEntries, request, limit), AUDIT_ENTRY)
