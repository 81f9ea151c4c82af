"""The `conveyor` command: the root group, its global options, and the table of subcommands.

Owns what `conveyor --help` shows (commands, exit codes, where the address and token come from)
and `main`, the console script's entry point, which turns every way a command can end into one
exit code. Nothing heavy is imported here: each subcommand's module is imported only when that
subcommand runs (`conveyor --help` must stay under 300 ms), and grpc, protobuf and rich are
imported inside the commands that use them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from conveyor.cli.errors import FAILURE, INTERRUPTED, CliError
from conveyor.cli.lazy import LazyGroup

# name -> ("module:attr" of its click command, one-line summary for `conveyor --help`). A new
# subcommand is one line here; its module is imported only when it runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("conveyor.cli.server:serve", "Serve gRPC and, through Envoy, REST."),
    "worker": ("conveyor.cli.server:worker", "Run a worker: MODULE:ATTR names a conveyor.sdk.Worker."),
    "login": ("conveyor.cli.config:login", "Save the server address and token for later commands."),
    "workflows": ("conveyor.cli.workflows:workflows", "List, show, apply and archive workflows."),
    "runs": ("conveyor.cli.runs:runs", "List, trigger, follow and steer workflow runs."),
    "steps": ("conveyor.cli.steps:steps", "Act on one step of a run: approve, input, skip, retry..."),
    "watch": ("conveyor.cli.watch:watch", "Follow a run (or a project's runs) live until it ends."),
    "keys": ("conveyor.cli.keys:keys", "Create, list and revoke API keys (in the database)."),
    "audit": ("conveyor.cli.audit:audit", "List the audit log: every write call, refused ones too."),
    "secrets": ("conveyor.cli.secrets:secrets", "Set, list and delete a project's secrets (never shown)."),
    "events": ("conveyor.cli.events:events", "Publish events (starting runs that listen) and list them."),
    "backup": ("conveyor.cli.backup:backup", "Copy the live SQLite database to a file, consistently."),
}

EPILOG = """\b
Address and token: --address / --token, else CONVEYOR_ADDRESS / CONVEYOR_TOKEN, else the file
`conveyor login` writes ($XDG_CONFIG_HOME/conveyor/config.json), else 127.0.0.1:50051 and the
token in ./.conveyor/admin.token (written by the server on its first start).

\b
Exit codes:
  0    ok
  1    failure (the run did not complete with --wait or watch, server unreachable, refused...)
  2    usage (bad option, argument or value)
  3    invalid transition (the run or step is not in a state that allows it)
  4    authentication or permission refused
  5    not found
  130  interrupted (Ctrl-C)
"""


@click.group(cls=LazyGroup, lazy=COMMANDS, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--address", envvar="CONVEYOR_ADDRESS", metavar="HOST:PORT",
              help="gRPC address of the server [env CONVEYOR_ADDRESS; default 127.0.0.1:50051]")
@click.option("--token", envvar="CONVEYOR_TOKEN", metavar="TOKEN",
              help="API key sent as `authorization: Bearer` [env CONVEYOR_TOKEN]")
@click.pass_context
def cli(ctx: click.Context, address: str | None, token: str | None) -> None:
    """Conveyor: trigger, follow and steer workflow runs; serve the engine."""
    from conveyor.cli.config import Target

    ctx.obj = Target(address_flag=address, token_flag=token)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; its exit code (documented in EPILOG)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # while an error was being reported
        _interrupted()


def _run(argv: Sequence[str] | None) -> int:
    try:
        code = cli.main(args=list(argv) if argv is not None else None, prog_name="conveyor",
                        standalone_mode=False)
    except click.Abort as e:
        # click turns a Ctrl-C it catches into Abort.
        if isinstance(e.__cause__, KeyboardInterrupt):
            _interrupted()
        click.echo("error: aborted", err=True)
        return FAILURE
    except KeyboardInterrupt:
        _interrupted()
    except (click.ClickException, CliError) as e:
        e.show()
        return e.exit_code
    except BrokenPipeError:
        # `conveyor runs list | head`: the reader left; what it did not read is not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code if isinstance(code, int) else 0


def _interrupted() -> NoReturn:
    """Exit 130 at once. A Ctrl-C can land inside grpc's bookkeeping of a call, after which
    closing or even collecting its channel waits forever; the process ends without either."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(INTERRUPTED)
