"""What a runner pass must know of the events its runs' waiting steps wait for (SPEC §9): the
events that arrived for each waiting `wait_event` step, loaded under the runs' locks as
`children.links` loads child runs, and handed to the planner in `Links.events`."""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.domain.kinds import kind_of
from conveyor.domain.planner import Links
from conveyor.domain.records import RunRecord, StepRecord
from conveyor.domain.states import StepStatus
from conveyor.engine.ports import Repo


async def attach(repo: Repo, runs: Sequence[RunRecord], steps: dict[str, list[StepRecord]],
                 links: dict[str, Links]) -> None:
    """Add to `links` (by run id) the events that arrived for these runs' waiting steps."""
    waiting = [s.id for r in runs for s in steps[r.id]
               if s.status == StepStatus.WAITING and kind_of(s.kind).arrived is not None]
    if not waiting:
        return
    arrived = await repo.arrived_events(waiting)
    for run in runs:
        mine = {s.id: arrived[s.id] for s in steps[run.id] if s.id in arrived}
        if mine:
            links.setdefault(run.id, Links()).events = mine
