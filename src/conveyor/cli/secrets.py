"""`conveyor secrets`: a project's secrets (admin keys): set, list and delete.

A value is never an argument: what is on a command line is in the shell's history and in every
`ps` listing while the command runs. `set` reads it from standard input (a hidden prompt on a
terminal) or from `--value-file`; one trailing newline is dropped (what `echo` and most editors
add). No command prints a value: the server never returns one.
"""

from __future__ import annotations

import sys

import click

from conveyor.cli.errors import USAGE, CliError
from conveyor.cli.output import Output, output_options

PROJECT_HELP = "Project (default: the key's, else 'default')."


@click.group()
def secrets() -> None:
    """Set, list and delete a project's secrets (`{{ secrets.NAME }}` in http and task steps)."""


def _value(value_file: str | None) -> str:
    """The value from --value-file, else standard input (prompted for, hidden, on a terminal)."""
    if value_file is not None:
        try:
            with open(value_file, encoding="utf-8", newline="") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"cannot read {value_file}: {e.strerror if isinstance(e, OSError) else e}",
                           USAGE) from None
    elif sys.stdin.isatty():
        text = click.prompt("value", hide_input=True, prompt_suffix=": ", err=True)
    else:
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise CliError("standard input is not UTF-8 text", USAGE) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CliError("the value is empty (pipe it in, or name a file with --value-file)", USAGE)
    return text


@secrets.command("set")
@click.argument("name")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.option("--value-file", metavar="FILE", default=None,
              help="Read the value from FILE (default: standard input).")
@output_options
@click.pass_context
def set_secret(ctx: click.Context, name: str, project: str, value_file: str | None, out: Output) -> None:
    """Create or replace secret NAME; its value comes from standard input or --value-file."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import SECRET
    from conveyor.v1 import secrets_service_pb2 as secrets_pb

    value = _value(value_file)
    with connect(ctx) as api:
        secret = api.call(api.secrets.PutSecret,
                          secrets_pb.PutSecretRequest(project_id=project, name=name, value=value))
    out.one(secret, SECRET)


@secrets.command("list")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.option("-n", "--limit", type=click.IntRange(min=0), default=0, help="At most this many (0: all).")
@output_options
@click.pass_context
def list_secrets(ctx: click.Context, project: str, limit: int, out: Output) -> None:
    """List a project's secrets, newest first: names and dates, never values."""
    from conveyor.cli.client import connect
    from conveyor.cli.views import SECRET
    from conveyor.v1 import secrets_service_pb2 as secrets_pb

    with connect(ctx) as api:
        request = secrets_pb.ListSecretsRequest(project_id=project)
        out.many(api.pages(api.secrets.ListSecrets, request, limit), SECRET)


@secrets.command("delete")
@click.argument("name")
@click.option("-p", "--project", default="", help=PROJECT_HELP)
@click.pass_context
def delete_secret(ctx: click.Context, name: str, project: str) -> None:
    """Delete secret NAME: steps that name it then fail with SECRET_NOT_FOUND."""
    from conveyor.cli.client import connect
    from conveyor.v1 import secrets_service_pb2 as secrets_pb

    with connect(ctx) as api:
        api.call(api.secrets.DeleteSecret, secrets_pb.DeleteSecretRequest(project_id=project, name=name))
    click.echo(f"secret {name} deleted")
