"""Exit codes of the `conveyor` command and the one-line error every failure prints.

The codes are documented in `conveyor --help` and the README; a command fails by raising
`CliError`, which `main` shows as `error: <message> (<REASON>)` on stderr, never a traceback.
(Usage errors stay click's own: usage, a hint and exit code 2.)
"""

from __future__ import annotations

import click

OK = 0
FAILURE = 1
USAGE = 2
INVALID_TRANSITION = 3
AUTH = 4
NOT_FOUND = 5
INTERRUPTED = 130


class CliError(Exception):
    """A failure to report in one line, with the exit code it means."""

    def __init__(self, message: str, exit_code: int = FAILURE, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.reason = reason

    def show(self) -> None:
        suffix = f" ({self.reason})" if self.reason else ""
        click.echo(f"error: {self.message}{suffix}", err=True)
