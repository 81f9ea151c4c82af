"""Schema migrations, programmatically: the Alembic Config is built here (there is no
alembic.ini), its script_location is the package's `migrations` directory, and the revisions run
on a connection of `Database.schema_change()`. `migrate()` is safe on every server start: on a
database already at head it changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from conveyor.storage.db import Database

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic Config of Conveyor's migrations; env.py runs them on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def migrate(url: str) -> None:
    """Apply every pending migration to the database at `url`, all in one transaction."""
    # No deadline on statements: an index built over a big table, or another replica's
    # migration (its advisory lock), may take long; the connect timeout still applies.
    database = Database(url, command_timeout=None)
    try:
        # schema_change() takes the database's write lock before Alembic starts, which also
        # keeps concurrent migrate() calls of one process apart: Alembic's context is global.
        async with database.schema_change() as conn:
            await conn.run_sync(lambda sync_conn: command.upgrade(alembic_config(sync_conn), "head"))
    finally:
        await database.dispose()


async def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None when it was never migrated."""
    database = Database(url)
    try:
        async with database.read() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await database.dispose()
