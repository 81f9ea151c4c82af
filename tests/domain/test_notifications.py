"""Notification targets (domain/notifications.py): validation as field violations, merging,
which events become outbox entries, and the signature receivers verify."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from conveyor.domain.errors import ConveyorError
from conveyor.domain.limits import Limits
from conveyor.domain.notifications import (
    merge_targets,
    outbox_entries,
    signature,
    validated_notifications,
    verify_signature,
)
from conveyor.domain.records import EventRecord, RunRecord
from conveyor.domain.spec import WorkflowSpec, parse_workflow
from conveyor.domain.states import RunStatus

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
HOOK = {"url": "https://hooks.example.com/conveyor", "events": ["run.completed", "step.waiting"]}


def fields_of(error: ConveyorError) -> list[str]:
    return [v.field for v in error.violations]


def test_a_definition_keeps_its_notifications_through_storage() -> None:
    spec = parse_workflow({"name": "w", "steps": [{"ref": "a", "kind": "noop"}], "notifications": [HOOK]})
    assert spec.notifications == (HOOK,)
    assert WorkflowSpec.from_dict(spec.to_dict()) == spec
    # Absent when none: definitions stored before notifications existed read back the same.
    bare = parse_workflow({"name": "w", "steps": [{"ref": "a", "kind": "noop"}]})
    assert "notifications" not in bare.to_dict()


@pytest.mark.parametrize(("targets", "field"), [
    ([{"url": "ftp://x.example.com/", "events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "/relative", "events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "http://a\x00b.example.com/", "events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "http://user:pw@example.com/", "events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "http://example.com:99999/", "events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "http://example.com/" + "x" * 3000, "events": ["run.failed"]}], "notifications[0].url"),
    ([{"events": ["run.failed"]}], "notifications[0].url"),
    ([{"url": "http://example.com/", "events": ["run.exploded"]}], "notifications[0].events[0]"),
    ([{"url": "http://example.com/", "events": ["run.failed", "run.failed"]}], "notifications[0].events[1]"),
    ([{"url": "http://example.com/", "events": []}], "notifications[0].events"),
    ([{"url": "http://example.com/", "events": ["run.failed"], "secret": "x"}], "notifications[0].secret"),
    ([HOOK] * 11, "notifications"),
    ("http://example.com/", "notifications"),
])
def test_hostile_targets_are_field_violations(targets: object, field: str) -> None:
    with pytest.raises(ConveyorError) as caught:
        validated_notifications(targets, "notifications", Limits())
    assert caught.value.reason == "INVALID_NOTIFICATION"
    assert field in fields_of(caught.value)
    with pytest.raises(ConveyorError) as in_spec:
        parse_workflow({"name": "w", "steps": [{"ref": "a", "kind": "noop"}], "notifications": targets})
    assert field in fields_of(in_spec.value)


def test_targets_merge_in_order_each_once() -> None:
    other = {"url": "http://other.example.com/", "events": ["run.failed"]}
    assert merge_targets((HOOK,), [HOOK, other]) == [HOOK, other]
    assert merge_targets((), None) is None


def run_with(targets: list[dict[str, object]] | None) -> RunRecord:
    return RunRecord(id="r1", project_id="p", workflow_id="w1", workflow_name="w", workflow_version=1,
                     workflow_version_id="v1", status=RunStatus.COMPLETED, created_at=NOW, updated_at=NOW,
                     notifications=targets)  # type: ignore[arg-type]


def event(seq: int, type_: str, step_ref: str = "") -> EventRecord:
    return EventRecord(workflow_run_id="r1", seq=seq, project_id="p", type=type_, at=NOW, step_ref=step_ref)


def test_only_asked_for_events_become_entries_and_a_delay_waiting_is_no_persons_turn() -> None:
    other = {"url": "http://other.example.com/", "events": ["run.failed", "run.completed"]}
    events = [event(1, "run.running"), event(2, "step.waiting", "gate"), event(3, "step.waiting", "pause"),
              event(4, "run.completed")]
    entries = outbox_entries(run_with([HOOK, other]), events, {"gate": "approval", "pause": "delay"})
    assert [(e.id, e.url, e.event_type) for e in entries] == [
        ("r1/2/0", HOOK["url"], "step.waiting"),
        ("r1/4/0", HOOK["url"], "run.completed"),
        ("r1/4/1", other["url"], "run.completed"),
    ]
    body = entries[-1].body
    assert body["id"] == "r1/4/1" and body["workflow_run_id"] == "r1" and body["status"] == "completed"
    assert body["event"]["seq"] == 4 and body["at"] == "2026-03-01T12:00:00Z"
    assert outbox_entries(run_with(None), events, {}) == []


def test_signature_verifies_and_refuses_tampering_and_replay() -> None:
    header = signature("s3cret", 1_772_366_400, b'{"a":1}')
    assert header.startswith("t=1772366400,v1=")
    assert verify_signature("s3cret", header, b'{"a":1}', now=1_772_366_400)
    assert not verify_signature("s3cret", header, b'{"a":2}', now=1_772_366_400)
    assert not verify_signature("other", header, b'{"a":1}', now=1_772_366_400)
    assert not verify_signature("s3cret", header, b'{"a":1}', now=1_772_366_400 + 3600)
    assert not verify_signature("s3cret", "garbage", b'{"a":1}', now=1_772_366_400)
