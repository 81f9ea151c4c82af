"""The change feed's keys: what a committed unit of work is about, named so that each waiter
waits on its own key only (SPEC §5: a watcher never slows the engine).

- `run_key(run)`: the run's history grew (a run watch);
- `project_key(project)`: a run of the project changed status (a project watch);
- `queue_key(project, queue)`: task steps of a queue became ready (a worker's poll or stream);
- `worker_key(project, worker)`: a lease of that worker was reported or revoked (its stream);
- `HTTP_KEY`: an http step became ready (the engine's http executor);
- `NOTIFY_KEY`: events a run's notification targets may ask for were written (the notifier);
- `api_key_key(key)`: an API key stopped working (its open streams end; fired in-process only,
  by engine/keys.py, which re-reads the held keys to learn of other replicas' revocations).

`keys_of` is the one definition of which keys a set of committed changes fires: the engine fires
them in its own process after commit, and on PostgreSQL the same keys travel to every other
replica by NOTIFY inside the committing transaction (storage/feed.py listens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from conveyor.domain.notifications import NOTIFY_EVENTS
from conveyor.domain.states import StepStatus

if TYPE_CHECKING:  # changes.py reads the keys of step kinds (kinds.py), which are made here
    from conveyor.domain.changes import Changes

Key = tuple[str, ...]

HTTP_KEY: Key = ("http",)
NOTIFY_KEY: Key = ("notify",)


def run_key(run_id: str) -> Key:
    return ("run", run_id)


def project_key(project: str) -> Key:
    return ("project", project)


def queue_key(project: str, queue: str) -> Key:
    return ("queue", project, queue)


def worker_key(project: str, worker: str) -> Key:
    return ("worker", project, worker)


def api_key_key(key_id: str) -> Key:
    return ("api_key", key_id)


def keys_of(units: Iterable[Changes]) -> set[Key]:
    """The keys these committed units fire."""
    keys: set[Key] = set()
    for c in units:
        if c.events:
            keys.add(run_key(c.run.id))
            if any(not e.step_ref for e in c.events):  # a run-level event: its status moved
                keys.add(project_key(c.run.project_id))
            if c.run.notifications and any(e.type in NOTIFY_EVENTS for e in c.events):
                keys.add(NOTIFY_KEY)  # the outbox may have grown (a wake-up too many is harmless)
        for step, key in c.announced.values():
            if step.status == StepStatus.QUEUED:
                keys.add(key)
        for step, _attempt, holder, _reason in c.revoked:
            keys.add(worker_key(step.project_id, holder))
    return keys


def encode(keys: Iterable[Key]) -> list[str]:
    """Keys as NOTIFY payload lines (key parts never hold a tab: ids, names, projects)."""
    return ["\t".join(k) for k in keys]


def decode(lines: Iterable[str]) -> list[Key]:
    return [tuple(line.split("\t")) for line in lines if line]


@dataclass(frozen=True)
class RunChange:
    """One status change of a run, and its position in its project's feed (an opaque cursor)."""

    cursor: str
    run_id: str
    workflow_id: str
    status: str
    at: datetime


@dataclass(frozen=True)
class ChangesPage:
    changes: list[RunChange]
    # PostgreSQL: changes past the cursor exist that transactions still running hold back.
    held: bool
