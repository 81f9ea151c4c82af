"""`conveyor keys`: create, list and revoke API keys, straight in the database (SPEC §8).

These are the administrator's commands that make the first keys, so they open the database
themselves (`--db-url`, default the server's own `.conveyor/conveyor.db`) rather than calling a
server, which would need a key already. A database that does not exist is refused (exit 2), never
created: a mistyped path or data directory would otherwise get a new, empty database with the key
in it, which no server reads. Admin keys can do the same over the API (KeysService).
`keys create` prints the key, then its token alone on the last line (`| tail -1` takes it).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from conveyor.cli.errors import FAILURE, NOT_FOUND, USAGE, CliError
from conveyor.cli.output import Output, output_options, to_dict

if TYPE_CHECKING:
    from conveyor.engine.keys import Keys

T = TypeVar("T")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Who the command acts as: the operator at the machine that holds the database.
_LOCAL = "conveyor-cli"


def _duration(value: str) -> timedelta:
    m = _DURATION.fullmatch(value.strip())
    if m is None or int(m.group(1)) == 0:
        raise click.BadParameter(f"{value!r} is not a duration such as 90m, 12h, 30d or 2w",
                                 param_hint="--expires-in")
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def _db_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                           help="The server's data directory (default .conveyor).")(command)
    return click.option("--db-url", envvar="CONVEYOR_DB_URL",
                        help="sqlite:///path or postgresql://… [env CONVEYOR_DB_URL; default: the "
                             "SQLite file in the data directory]")(command)


def _with_keys(db_url: str | None, data_dir: Path | None, use: Callable[[Keys], Awaitable[T]]) -> T:
    """Run `use` with the key use cases over the (migrated) database."""
    from conveyor.domain.errors import ConveyorError, ErrorKind
    from conveyor.engine.clock import SystemClock
    from conveyor.engine.keys import Keys
    from conveyor.settings import Settings
    from conveyor.storage.db import Database, NoDatabase, require_database
    from conveyor.storage.migrate import migrate
    from conveyor.storage.store import SqlStore

    settings = Settings.from_env(db_url=db_url, data_dir=data_dir)

    async def run() -> T:
        await require_database(settings.db_url)
        await migrate(settings.db_url)
        db = Database(settings.db_url)
        try:
            return await use(Keys(SqlStore(db), SystemClock()))
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except ConveyorError as e:
        code = {ErrorKind.NOT_FOUND: NOT_FOUND, ErrorKind.INVALID_ARGUMENT: USAGE}.get(e.kind, FAILURE)
        raise CliError(e.message, code, e.reason) from None
    except ValueError as e:  # a URL that names no database Conveyor knows (password masked)
        raise CliError(str(e), USAGE, "INVALID_DB_URL") from None
    except NoDatabase as e:
        raise CliError(f"{e}: name an existing one with --db-url or --data-dir (`conveyor serve` "
                       f"creates its SQLite file on its first start)", USAGE, "NO_DATABASE") from None


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (in the database: --db-url)."""


@keys.command("create")
@click.option("--name", required=True, help="Unique name; runs and events record it as the actor.")
@click.option("--project", required=True, help="The project the key may act in, or * for every project.")
@click.option("--role", required=True, type=click.Choice(["worker", "viewer", "operator", "admin"]),
              help="worker: only leases and reports tasks; viewer: reads and watches; operator: + triggers "
                   "and steers runs; admin: + definitions, webhooks, keys, the audit log.")
@click.option("--expires-in", "expires_in", metavar="DURATION",
              help="e.g. 30d, 12h, 90m, 2w (default: never).")
@click.option("--rate-limit", type=click.IntRange(min=0), default=0,
              help="Requests per second (default 0: the server's limit).")
@_db_options
@output_options
def create(name: str, project: str, role: str, expires_in: str | None, rate_limit: int, db_url: str | None,
           data_dir: Path | None, out: Output) -> None:
    """Create a key; its token is printed once, alone on the last line."""
    from conveyor.api.convert import key_to_proto
    from conveyor.cli.views import API_KEY
    from conveyor.domain.records import Caller

    expires_at = datetime.now(UTC) + _duration(expires_in) if expires_in else None
    local = Caller(name=_LOCAL, project=None, role="admin")
    key, token = _with_keys(db_url, data_dir,
                            lambda k: k.create(local, name, project, role, expires_at, rate_limit))
    if out.format in ("json", "jsonl"):
        click.echo(json.dumps({"key": to_dict(key_to_proto(key)), "token": token}))
        return
    if out.format != "name":
        out.one(key_to_proto(key), API_KEY)
        click.echo("The token is shown this once; keep it secret:", err=True)
    click.echo(token)


@keys.command("list")
@click.option("--project", default="", help="Only keys of this project (* for keys of every project).")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
@_db_options
@output_options
def list_keys(project: str, include_revoked: bool, db_url: str | None, data_dir: Path | None,
              out: Output) -> None:
    """List keys (never their tokens), newest first."""
    from conveyor.api.convert import key_to_proto
    from conveyor.cli.views import API_KEY
    from conveyor.domain.records import Caller

    local = Caller(name=_LOCAL, project=None, role="admin")

    async def every(k: Keys) -> list[Any]:
        found, token = [], ""
        while True:
            page = await k.list(local, project, include_revoked, 1000, token)
            found += page.items
            if not (token := page.next_token):
                return found

    out.many([key_to_proto(key) for key in _with_keys(db_url, data_dir, every)], API_KEY)


@keys.command("revoke")
@click.argument("key")
@_db_options
@output_options
def revoke(key: str, db_url: str | None, data_dir: Path | None, out: Output) -> None:
    """Revoke KEY (name or id): it stops working within seconds on every server."""
    from conveyor.api.convert import key_to_proto
    from conveyor.cli.views import API_KEY
    from conveyor.domain.records import Caller

    local = Caller(name=_LOCAL, project=None, role="admin")
    revoked = _with_keys(db_url, data_dir, lambda k: k.revoke(local, key))
    out.one(key_to_proto(revoked), API_KEY)
