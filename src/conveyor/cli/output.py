"""How client commands print what the server answered.

One `Output` per command, chosen by `-o json|jsonl|wide|name` or `--json`: without either, a
table (rich) when stdout is a terminal and tab-separated rows under a header line when it is not
(so `conveyor runs list | cut -f1` works); `wide` adds columns; `name` prints ids one per line;
JSON is protobuf's own mapping with the proto field names. What a resource shows in each column
is a `View` (conveyor.cli.views). rich and protobuf are imported only when used.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import click

FORMATS = ("json", "jsonl", "wide", "name")

Cell = str | datetime | None

# Colors of statuses in tables (runs and steps share most names).
STATUS_STYLES = {
    "completed": "green", "failed": "red", "timed_out": "red", "canceled": "yellow",
    "running": "cyan", "queued": "cyan", "waiting": "magenta", "paused": "yellow",
    "pending": "dim", "skipped": "dim",
}


@dataclass(frozen=True)
class Column:
    """One column: its header and what it shows of a message."""

    header: str
    get: Callable[[Any], Cell]
    wide: bool = False  # shown only by -o wide
    clock: bool = False  # a time shown as a wall-clock time in tables instead of an age
    status: bool = False  # colored by STATUS_STYLES in tables


@dataclass(frozen=True)
class View:
    """How one kind of resource is shown: its columns and its `-o name` identifier."""

    columns: Sequence[Column]
    name: Callable[[Any], str]


@dataclass
class Output:
    """The format one command prints in."""

    format: str | None = None
    is_tty: bool = field(default_factory=lambda: sys.stdout.isatty())

    @property
    def human(self) -> bool:
        """True for the table formats (default and wide), where extra context may be printed."""
        return self.format in (None, "wide")

    def many(self, items: Iterable[Any], view: View, title: str | None = None) -> None:
        """A list of messages."""
        if self.format == "json":
            click.echo(json.dumps([to_dict(m) for m in items], indent=2))
        elif self.format == "jsonl":
            for m in items:
                click.echo(json.dumps(to_dict(m), separators=(",", ":")))
        elif self.format == "name":
            for m in items:
                click.echo(view.name(m))
        else:
            self._table(list(items), view, title)

    def one(self, item: Any, view: View) -> None:
        """A single message (a JSON object, not an array)."""
        if self.format == "json":
            click.echo(json.dumps(to_dict(item), indent=2))
        else:
            self.many([item], view)

    def _table(self, items: list[Any], view: View, title: str | None) -> None:
        columns = [c for c in view.columns if self.format == "wide" or not c.wide]
        if not self.is_tty:
            click.echo("\t".join(c.header for c in columns))
            for m in items:
                click.echo("\t".join(_plain(c.get(m)) for c in columns))
            return
        if not items:
            click.echo("(none)" if title is None else f"{title}: (none)")
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", title=title, title_justify="left",
                      title_style="bold", pad_edge=False)
        for c in columns:
            table.add_column(c.header, no_wrap=c.header == "ID", overflow="fold")
        now = datetime.now(UTC)
        for m in items:
            row = []
            for c in columns:
                text = _human(c.get(m), c.clock, now)
                row.append(Text(text, style=STATUS_STYLES.get(text, "")) if c.status else Text(text))
            table.add_row(*row)
        Console(soft_wrap=False).print(table)


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add `-o/--output` and `--json` to a command, passed to it as one `out: Output`."""

    @functools.wraps(command)
    def wrapper(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, "json"):
            raise click.UsageError(f"--json and -o {output} contradict each other")
        return command(*args, out=Output("json" if as_json else output), **kwargs)

    wrapper = click.option("--json", "as_json", is_flag=True, help="Same as -o json.")(wrapper)
    return click.option("-o", "--output", type=click.Choice(FORMATS),
                        help="json, jsonl (one object a line), wide (more columns) or name (ids). "
                             "Default: a table on a terminal, tab-separated rows otherwise.")(wrapper)


def to_dict(message: Any) -> Any:
    """A message as JSON-ready data: proto field names, enums by name, whole numbers whole."""
    from google.protobuf import json_format

    return _whole(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _whole(value: Any) -> Any:
    # protobuf holds every JSON number as a double; the server keeps whole numbers whole over
    # REST, and so does this output (a payload's 5 prints as 5, not 5.0).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def _plain(cell: Cell) -> str:
    # Tab-separated output is read by programs: exact times, one line per row.
    if isinstance(cell, datetime):
        return cell.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return (cell or "").replace("\t", " ").replace("\n", " ")


def _human(cell: Cell, clock: bool, now: datetime) -> str:
    if not isinstance(cell, datetime):
        return cell or ""
    if clock:
        return cell.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return age(now - cell) + " ago"


def age(delta: Any) -> str:
    """A timedelta in kubectl's short style: 45s, 3m12s, 5h4m, 2d3h."""
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds}s" if seconds else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"
