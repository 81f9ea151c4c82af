"""Plain records of runs, steps, events and workflows as the engine and API see them.

Storage turns rows into these and back; the API turns them into protos. They carry no
behaviour beyond small derived properties, so every layer can share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from conveyor.domain.families import Cause
from conveyor.domain.spec import WorkflowSpec
from conveyor.domain.states import RunStatus, StepStatus


@dataclass
class WorkflowRecord:
    """A workflow at its current version."""

    id: str
    project_id: str
    name: str
    version: int
    version_id: str
    spec: WorkflowSpec
    created_by: str
    created_at: datetime
    updated_at: datetime
    archived_at: datetime | None = None
    # The schedule's next tick (UTC); None without a schedule, while paused or once archived.
    next_fire_at: datetime | None = None
    schedule_paused: bool = False
    # The inbound webhook: enabled or not, its token's first characters, when it was issued.
    webhook_enabled: bool = False
    webhook_hint: str = ""
    webhook_rotated_at: datetime | None = None

    @property
    def archived(self) -> bool:
        return self.archived_at is not None


@dataclass(frozen=True)
class RunFence:
    """What a run's compare-and-set checks: the row still has the status and last_seq loaded."""

    status: RunStatus
    last_seq: int


@dataclass(frozen=True)
class StepFence:
    """What a step's compare-and-set checks: the same status, attempt and lease as loaded."""

    status: StepStatus
    attempt: int
    lease_expires_at: datetime | None


@dataclass
class RunRecord:
    """A workflow run. The engine mutates loaded records and saves what changed."""

    id: str
    project_id: str
    workflow_id: str
    workflow_name: str
    workflow_version: int
    workflow_version_id: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    status_message: str = ""
    triggered_by: str = ""
    created_by: str = ""
    max_parallel_steps: int = 0
    output: dict[str, Any] | None = None
    error: str = ""
    entity_id: str = ""
    idempotency_key: str = ""
    retry_of_run_id: str = ""
    parent_workflow_run_id: str = ""
    parent_step_run_id: str = ""
    depth: int = 0
    # The run that started this run's family of child runs ("" for a run nobody started; a
    # webhook run a notification caused is a family of its own for retention).
    root_run_id: str = ""
    # Workflow ids of the runs that caused this one (its ancestors, and the run whose
    # notification started it through a webhook), first cause first, its own last (None: a run
    # nobody caused, whose lineage is its own workflow): a loop check is one membership test.
    lineage: list[str] | None = None
    last_seq: int = 0
    wake_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    expires_at: datetime | None = None
    # Webhooks told about chosen events of this run, the workflow's then the trigger's
    # ([{url, events}], domain/notifications.py); None when there are none.
    notifications: list[dict[str, Any]] | None = None
    # -100..100 (SPEC §3): among slot waiters, and its tasks in their queues, higher goes first.
    priority: int = 0
    # A delayed run's start: it waits pending, and for no slot, until then (None: at once).
    start_at: datetime | None = None
    # Its workflow's `concurrency.key` rendered when it was created ("" without one).
    concurrency_key: str = ""
    # The row as loaded (storage sets it); changes are saved only if the row still matches it.
    fence: RunFence | None = field(default=None, compare=False, repr=False)


@dataclass
class StepRecord:
    """One step of a run."""

    id: str
    workflow_run_id: str
    project_id: str
    position: int
    step_ref: str
    workflow_step_id: str
    kind: str
    status: StepStatus
    created_at: datetime
    updated_at: datetime
    queue: str = ""
    attempt: int = 0
    deps_required: int = 0
    deps_completed: int = 0
    input: dict[str, Any] | None = None
    output: dict[str, Any] | None = None
    error: str = ""
    skip_reason: str = ""
    approved_by: str = ""
    worker_id: str = ""
    job_run_id: str = ""
    ready_at: datetime | None = None
    due_at: datetime | None = None
    lease_expires_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # Attempts that ended with no verdict (SPEC §4.3): all of them, which spend no retry budget,
    # and those since the last verdict, which end a poison task at the policy's max_losses.
    losses: int = 0
    loss_streak: int = 0
    # Its run's priority, copied: a queue hands out its highest-priority tasks first.
    priority: int = 0
    # A map item (SPEC §2.1): the id of its map step, and its index among the map's items.
    parent_step_id: str = ""
    map_index: int | None = None
    # The row as loaded (storage sets it); changes are saved only if the row still matches it.
    fence: StepFence | None = field(default=None, compare=False, repr=False)


@dataclass
class EventRecord:
    """One entry of a run's history."""

    workflow_run_id: str
    seq: int
    project_id: str
    type: str
    at: datetime
    step_ref: str = ""
    status: str = ""
    message: str = ""
    data: dict[str, Any] | None = None
    actor: str = ""


# The project of requests that name none (authentication and per-key projects come later).
DEFAULT_PROJECT = "default"

T = TypeVar("T")


@dataclass
class Page(Generic[T]):
    """One page of a list and the token of the next one ("" on the last page)."""

    items: list[T]
    next_token: str


@dataclass(frozen=True)
class Caller:
    """Who is calling: the API key's name, its project (None = every project) and role, and the
    key's id ("" for callers that hold no key: the engine's actors, a webhook delivery, anybody
    when authentication is disabled); open streams end when that key stops working."""

    name: str
    project: str | None = None
    role: str = "admin"
    key_id: str = ""


@dataclass
class TriggerRequest:
    """What a trigger asks for (SPEC §3), already decoded from the wire."""

    workflow_id: str
    project_id: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str = ""
    entity_id: str = ""
    run_as: str = ""
    max_parallel_steps: int = 0
    timeout_seconds: int = 0
    check_conditions: bool = False
    immediate: bool = False
    # Webhooks this run notifies besides its workflow's ([{url, events}], validated).
    notifications: list[dict[str, Any]] = field(default_factory=list)
    # -100..100, checked by the API (domain/concurrency.py check_priority).
    priority: int = 0
    # When the run should start (None: at once); a time past is now, more than a year ahead refused.
    start_at: datetime | None = None
    # The run whose notification, delivered to a webhook of this server, asks for this run
    # (domain/families.py); None for every other trigger.
    caused_by: Cause | None = None


@dataclass
class RunQuery:
    """Filters of ListWorkflowRuns, decoded and validated by the API."""

    project_id: str = ""
    statuses: list[RunStatus] = field(default_factory=list)
    workflow_ids: list[str] = field(default_factory=list)
    triggered_by: str = ""
    started_after: datetime | None = None
    started_before: datetime | None = None
    tags: list[tuple[str, str]] = field(default_factory=list)
    # Text the run's workflow name or description contains, case-insensitively; "" = any.
    search: str = ""

    def search_matches(self, name: str, description: str) -> bool:
        """Whether a workflow of this name and description passes the `search` filter: a
        substring match after Unicode case folding ("STRASSE" finds "Straße"), every character
        literal (no wildcards)."""
        needle = self.search.casefold()
        return needle in name.casefold() or needle in description.casefold()
