"""Backups of a live SQLite database (`conveyor backup FILE`; README "Retention and backup").

The copy is made with SQLite's online backup API (`sqlite3.Connection.backup`) in ONE step: the
whole database is read inside one read transaction, so the copy is the database as of one
moment — every transaction committed before it, none of those after, nothing half-written — and,
the server's database being in WAL mode, that reader never blocks the server's writer, which
keeps committing meanwhile. One step, not several: between steps the API starts over whenever
another connection has written, which under a steady load may never end. Not `VACUUM INTO`,
which also reads one snapshot but rebuilds every table and index into the copy: a smaller file,
for a copy that takes several times as long on a large database, holding its snapshot (and the
WAL's growth) as long.

FILE appears whole or not at all: the copy is written beside it under a temporary name, checked
(`PRAGMA quick_check`), switched out of WAL mode (one self-contained file: a server started on
it switches back), flushed to disk, and only then linked to FILE's name — which fails if FILE
exists, unless `force` (then it replaces FILE in one rename). PostgreSQL has its own tools;
`pg_dump_recipe` says how.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL

from conveyor.storage.db import normalize_url


class BackupRefused(Exception):
    """A backup that cannot be made as asked; `reason` is an ErrorInfo-style code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class BackupDone:
    source: Path
    target: Path
    size: int
    seconds: float


def pg_dump_recipe(url: str) -> str:
    """How to back up and restore a PostgreSQL database (the README's recipe), for this URL."""
    # Without its password (never printed): pg_dump reads it from PGPASSWORD or ~/.pgpass.
    given = normalize_url(url)
    plain = URL.create("postgresql", username=given.username, host=given.host, port=given.port,
                       database=given.database, query=given.query).render_as_string(hide_password=False)
    return (f"PostgreSQL is backed up with its own tools, while the servers run (one consistent\n"
            f"snapshot):\n"
            f"  pg_dump -Fc -f conveyor.dump '{plain}'\n"
            f"and restored into a new, empty database, then the servers started on it:\n"
            f"  createdb conveyor_restored && pg_restore --no-owner -d conveyor_restored conveyor.dump")


def backup_sqlite(url: str, target: Path, force: bool = False, busy_timeout_ms: int = 5000) -> BackupDone:
    """Copy the SQLite database at `url` to `target` consistently, while others write to it."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise BackupRefused(f"conveyor backup copies SQLite databases only.\n{pg_dump_recipe(url)}",
                            "NOT_SQLITE")
    source = Path(parsed.database or "")
    if not source.is_file():
        # sqlite3.connect would create an empty database there and back that up.
        raise BackupRefused(f"no database at {source}", "NO_DATABASE")
    if target.exists() and not force:
        raise BackupRefused(f"{target} exists; give --force to replace it", "TARGET_EXISTS")
    if target.exists() and target.resolve() == source.resolve():
        raise BackupRefused(f"{target} is the database itself", "TARGET_IS_SOURCE")
    if target.is_dir():
        raise BackupRefused(f"{target} is a directory", "TARGET_IS_DIRECTORY")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    started = time.monotonic()
    try:
        _copy(source, partial, busy_timeout_ms)
        _publish(partial, target, force)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return BackupDone(source, target, target.stat().st_size, time.monotonic() - started)


def _copy(source: Path, partial: Path, busy_timeout_ms: int) -> None:
    # The source's busy timeout covers the moment a checkpoint or recovery holds the WAL index.
    src = sqlite3.connect(source, timeout=busy_timeout_ms / 1000)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=-1)  # one step: one snapshot (see the module's docstring)
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise BackupRefused(f"the copy failed its integrity check: {check}", "COPY_CORRUPT")
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    with partial.open("rb") as f:
        os.fsync(f.fileno())


def _publish(partial: Path, target: Path, force: bool) -> None:
    if force:
        os.replace(partial, target)
    else:
        try:
            os.link(partial, target)  # fails if FILE appeared meanwhile: never overwritten
        except FileExistsError:
            raise BackupRefused(f"{target} exists; give --force to replace it", "TARGET_EXISTS") from None
    # The new name is durable once its directory is.
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
