"""`conveyor backup FILE`: a consistent copy of the server's live SQLite database (SPEC §11).

Like `conveyor keys`, it opens the database itself (`--db-url`, default the server's own
`.conveyor/conveyor.db`) rather than asking a server; the copy is made while servers keep
writing (storage/backup.py says how and why). A PostgreSQL URL is refused with the pg_dump
recipe; an existing FILE is refused unless --force.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import click

from conveyor.cli.errors import FAILURE, USAGE, CliError


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--db-url", envvar="CONVEYOR_DB_URL",
              help="sqlite:///path [env CONVEYOR_DB_URL; default: the SQLite file in the data directory]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The server's data directory (default .conveyor).")
def backup(file: Path, force: bool, db_url: str | None, data_dir: Path | None) -> None:
    """Copy the live SQLite database to FILE, consistently, while the server keeps writing.

    Restore by stopping the server and starting it on the copy (--db-url sqlite:///FILE).
    PostgreSQL: use pg_dump and pg_restore (printed when given a PostgreSQL URL).
    """
    from conveyor.settings import Settings
    from conveyor.storage.backup import BackupRefused, backup_sqlite

    settings = Settings.from_env(db_url=db_url, data_dir=data_dir)
    try:
        done = backup_sqlite(settings.db_url, file, force=force, busy_timeout_ms=settings.db_busy_timeout_ms)
    except ValueError as e:  # a URL that names no database Conveyor knows
        raise CliError(str(e), USAGE, "INVALID_DB_URL") from None
    except BackupRefused as e:
        raise CliError(e.message, USAGE, e.reason) from None
    except (OSError, sqlite3.Error) as e:
        raise CliError(f"backup failed: {e}", FAILURE, "BACKUP_FAILED") from None
    click.echo(f"backed up {done.source} to {done.target}: {done.size} bytes in {done.seconds:.2f} s "
               f"(integrity check ok)")
