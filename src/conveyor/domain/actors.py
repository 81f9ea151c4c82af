"""The engine's own actors: the names runs, events and audit entries record when no API key
acted, and why a trigger's `run_as` may not claim one of them (SPEC §6, issue 16).

`run_as` lets an operator record another initiator; a run that says `triggered_by: "schedule"`
must have been fired by the schedule, one that says `webhook` by a delivery, and `engine…` is
the engine itself (its planner, notifier and http executor, whose lease holders are
`engine:http:<host>:<pid>`). The comparison is made on the name as a person reads it: Unicode
compatibility forms folded (NFKC: fullwidth letters), case folded, invisible format characters
(zero-width spaces) dropped and surrounding whitespace stripped.
"""

from __future__ import annotations

import unicodedata

from conveyor.domain.errors import FieldViolation, invalid

# The planner, the runner, child runs and reports nobody made.
ENGINE = "engine"
# Runs fired by a cron schedule (triggered_by and created_by).
SCHEDULE = "schedule"
# Runs started by a webhook delivery.
WEBHOOK = "webhook"
# Runs started by a published event (a workflow's `on_events`, SPEC §9).
EVENT = "event"
# Every caller when authentication is disabled (CONVEYOR_AUTH=disabled).
ANONYMOUS = "anonymous"
# The notifier's delivery events.
NOTIFIER = "engine:notify"
# The `conveyor keys` commands run on the server's host, in the audit log.
LOCAL_CLI = "conveyor-cli"

# Reserved names, compared folded; and every name under the engine's own prefix.
_RESERVED = frozenset({ENGINE, SCHEDULE, WEBHOOK, EVENT, ANONYMOUS, LOCAL_CLI})
_ENGINE_PREFIX = ENGINE + ":"

RUN_AS_RESERVED = "RUN_AS_RESERVED"


def folded(name: str) -> str:
    """`name` as compared with the reserved ones."""
    text = unicodedata.normalize("NFKC", name)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return text.strip().casefold()


def is_reserved(name: str) -> bool:
    """True when `name` reads as one of the engine's own actors."""
    key = folded(name)
    return key in _RESERVED or key.startswith(_ENGINE_PREFIX)


def check_run_as(run_as: str) -> None:
    """INVALID_ARGUMENT (RUN_AS_RESERVED) when a trigger's `run_as` claims an engine actor."""
    if run_as and is_reserved(run_as):
        shown = run_as if len(run_as) <= 40 else run_as[:40] + "…"
        reserved = ", ".join(sorted(_RESERVED))
        raise invalid(f"run_as {shown!r} names one of the engine's own actors ({reserved}, engine:…)",
                      [FieldViolation("run_as", "must not name an engine actor")], reason=RUN_AS_RESERVED)
