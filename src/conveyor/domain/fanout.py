"""Map steps' items (SPEC §2.1): spreading a map's items into item steps, what an item's
expressions see, how many of a map's items may run at once, and gathering their ends into the
map's.

An item is an ordinary step row — `ref[i]`, `parent_step_id` its map's id, `map_index` i — of its
map's inner kind: it takes slots, leases, retries, times out and records events like any other
step (the planner treats it as one). Its map step stays RUNNING while items run and holds no slot
of its own. The items of a map that leaves RUNNING (failed, timed out, skipped, completed by an
operator) are canceled; a map that starts again resets and reuses its item rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from conveyor.domain.changes import Changes
from conveyor.domain.kinds import Done, Failed, Start, kind_of, map_parallel
from conveyor.domain.records import StepRecord
from conveyor.domain.spec import StepSpec
from conveyor.domain.states import UNFINISHED_STEP, StepStatus

S = StepStatus
# Item ids are derived from the map's id and the index, so the domain names them without I/O
# and a map that spreads again finds the same rows.
_ITEMS = uuid.UUID("6d6170c0-0000-4000-8000-000000000017")
ITEM_FAILED = frozenset({S.FAILED, S.TIMED_OUT, S.CANCELED})


def item_ref(map_ref: str, index: int) -> str:
    return f"{map_ref}[{index}]"


def items_of(map_step: StepRecord) -> list[Any]:
    """The items the map's current attempt spread (its rendered `items`)."""
    return list((map_step.input or {}).get("items") or [])


def item_of(steps: Iterable[StepRecord], step: StepRecord) -> tuple[Any, int | None]:
    """A map item's (element, index) among `steps` (its run's); (None, None) for other steps."""
    if not step.parent_step_id:
        return None, None
    parent = next(s for s in steps if s.id == step.parent_step_id)
    index = step.map_index or 0
    items = items_of(parent)
    return (items[index] if index < len(items) else None), index


def item_context(base: Mapping[str, Any], map_step: StepRecord, item: StepRecord) -> dict[str, Any]:
    """The expression context of an item: its run's, plus `item` and `index`."""
    index = item.map_index or 0
    items = items_of(map_step)
    return {**base, "item": items[index] if index < len(items) else None, "index": index}


def spread(c: Changes, steps: list[StepRecord], map_step: StepRecord, item_spec: StepSpec,
           items: list[Any]) -> list[StepRecord]:
    """Give the map one pending item step per element of `items`; returns the rows it added.
    Rows of an earlier attempt are reset and reused; those beyond the new count are canceled
    (and ignored: the map's items are its first `len(items)`)."""
    mine = {s.map_index: s for s in steps if s.parent_step_id == map_step.id}
    base = max(s.position for s in steps) + 1
    added = []
    for index in range(len(items)):
        old = mine.get(index)
        if old is not None:
            _reset(c, old, f"reset by attempt {map_step.attempt} of {map_step.step_ref}")
            continue
        item = StepRecord(
            id=str(uuid.uuid5(_ITEMS, f"{map_step.id}/{index}")), workflow_run_id=c.run.id,
            project_id=c.run.project_id, position=base + index,
            step_ref=item_ref(map_step.step_ref, index),
            workflow_step_id=f"{c.run.workflow_version_id}/{map_step.step_ref}[]", kind=str(item_spec.kind),
            status=S.PENDING, created_at=c.now, updated_at=c.now, queue=item_spec.queue,
            priority=map_step.priority, parent_step_id=map_step.id, map_index=index)
        c.add_step(item)
        added.append(item)
    for position, old in mine.items():
        if position is not None and position >= len(items) and old.status in UNFINISHED_STEP:
            c.step_to(old, S.CANCELED, f"not an item of attempt {map_step.attempt} of {map_step.step_ref}")
    return added


def _reset(c: Changes, item: StepRecord, why: str) -> None:
    item.output = None
    item.input = None
    item.error = ""
    item.skip_reason = ""
    item.ready_at = item.due_at = None
    item.loss_streak = 0
    if item.status == S.PENDING:
        c.touch_step(item)
    else:
        c.step_to(item, S.PENDING, why)
        c.pin(item)


def gather(map_step: StepRecord, config: Mapping[str, Any],
           items: Iterable[StepRecord]) -> Done | Failed | None:
    """What the map's items' ends make of the map: failed when more than `tolerate_failures` of
    them failed, done with their outputs in order when all ended, else None (still running)."""
    total = len(items_of(map_step))
    ordered: list[StepRecord | None] = [None] * total
    for s in items:
        if s.map_index is not None and s.map_index < total:
            ordered[s.map_index] = s
    failed = [i for i, s in enumerate(ordered) if s is not None and s.status in ITEM_FAILED]
    tolerate = int(config.get("tolerate_failures", 0))
    if len(failed) > tolerate:
        first = ordered[failed[0]]
        assert first is not None
        return Failed(f"{len(failed)} of {total} items failed (tolerate_failures {tolerate}); "
                      f"{first.step_ref} {first.status}: {first.error}")
    if any(s is None or s.status in UNFINISHED_STEP for s in ordered):
        return None
    return Done({"items": [s.output if s is not None and s.status == S.COMPLETED else None for s in ordered],
                 "failed": failed})


def room(map_step: StepRecord, config: Mapping[str, Any], busy: int) -> bool:
    """Whether another of the map's items may take a slot while `busy` of them hold one."""
    return busy < map_parallel(config)


def progress_of(steps: Iterable[StepRecord]) -> dict[str, dict[str, int]]:
    """The progress of each map step among `steps` (a run's steps, its items among them), by
    the map's id."""
    steps = list(steps)
    maps = {s.id: s for s in steps if kind_of(s.kind).start is Start.FAN_OUT}
    items: dict[str, list[tuple[int | None, str]]] = {i: [] for i in maps}
    for s in steps:
        if s.parent_step_id in items:
            items[s.parent_step_id].append((s.map_index, s.status))
    return {i: progress(maps[i], items[i]) for i in maps}


def progress(map_step: StepRecord, items: Iterable[tuple[int | None, str]]) -> dict[str, int]:
    """`{total, completed, failed, running}` of the map's current items (SPEC §2.1), from each
    item's (map_index, status)."""
    total = len(items_of(map_step))
    counts = {"total": total, "completed": 0, "failed": 0, "running": 0}
    for index, status in items:
        if index is None or index >= total:
            continue  # an item of an earlier attempt that had more
        if status == S.COMPLETED:
            counts["completed"] += 1
        elif status in ITEM_FAILED:
            counts["failed"] += 1
        elif status in (S.RUNNING, S.WAITING):
            counts["running"] += 1
    return counts
