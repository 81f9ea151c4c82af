"""Rows of every table as Conveyor's code wrote them, for the upgrade test (test_upgrades.py).

`rows()` gives the data a database at some revision holds: two workflows (one with three
versions, one with a paused schedule and a webhook), runs in every status with their steps,
events, tags and idempotency keys, API keys, audit entries, a pending notification, project
watch changes and a run wake-up. The test inserts, at each revision R, the columns of these rows
that exist at R (as R's code would have: a column added later is absent and gets its migration's
default), so the rows are written once, at head's full width.

Extending it when a revision is added:
- a new table: add its rows below (the test fails, naming the table, until you do);
- a new column: add it to the rows it belongs to (until then the migration's server default
  fills it; a NOT NULL column with no default fails the insert at head);
- data whose *content* changed meaning (not a column): use `since(revision)`, as the workflow
  specs do for their notifications.

Ids are fixed strings so the test can find its runs; autoincrement ids (audit entries, run
changes, wake-ups) are left to the database, as the code does (an explicit one would leave a
PostgreSQL sequence behind the rows and break the next insert).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Text, func
from sqlalchemy import cast as sql_cast
from sqlalchemy.sql.elements import ClauseElement

from conveyor.domain.access import token_hash

PROJECT = "default"
WORK, NIGHTLY = "00000000-0000-7000-8000-0000000000a1", "00000000-0000-7000-8000-0000000000a2"
# The versions of "work": v1 one task, v2 the task then an approval, v3 (current) as v2.
WORK_V1, WORK_V2, WORK_V3 = (f"00000000-0000-7000-8000-0000000000b{n}" for n in (1, 2, 3))
NIGHTLY_V1 = "00000000-0000-7000-8000-0000000000b9"
# Runs: finished ones, and three a current engine must still drive to completion.
COMPLETED, FAILED, CANCELED, TIMED_OUT, PAUSED = (
    f"00000000-0000-7000-8000-00000000010{n}" for n in range(1, 6))
QUEUED = "00000000-0000-7000-8000-000000000111"  # its task waits for a worker
LEASED = "00000000-0000-7000-8000-000000000112"  # its task is held by worker OLD_WORKER
WAITING = "00000000-0000-7000-8000-000000000113"  # its task done, its approval waiting
RUNS = (COMPLETED, FAILED, CANCELED, TIMED_OUT, PAUSED, QUEUED, LEASED, WAITING)
DRIVABLE = (QUEUED, LEASED, WAITING)
OLD_WORKER = "worker-before-upgrade"
# The token of the operator key (its hash is stored), to resolve it after the upgrade.
KEY_TOKEN = "cvk_upgrade-test-token-0123456789abcdefghijklmnopq"
TAGS = {"env": "prod", "team": "data"}

Rows = dict[str, list[dict[str, Any]]]


def _step(ref: str, kind: str, queue: str = "", depends_on: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"ref": ref, "kind": kind, "depends_on": list(depends_on), "queue": queue, "config": {},
            "retry": {"max_attempts": 1, "initial_interval_seconds": 1.0, "backoff_coefficient": 2.0,
                      "max_interval_seconds": 0.0},
            "timeout_seconds": 0, "when": "", "description": ""}


def _spec(name: str, steps: list[dict[str, Any]], notifications: list[dict[str, Any]] | None,
          schedule: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "description": f"the {name} workflow", "max_parallel_steps": 0,
                            "max_concurrent_runs": 0, "timeout_seconds": 0, "condition": "",
                            "variables": [], "steps": steps}
    if schedule:
        spec["schedule"] = schedule
    if notifications:  # absent when none, as the code writes it
        spec["notifications"] = notifications
    return spec


def _change(status: str, started: datetime | None, finished: datetime | None, **more: Any) -> dict[str, Any]:
    return {"change": {"status": status, "error": "", "message": "",
                       "started_at": started.isoformat() if started else None,
                       "finished_at": finished.isoformat() if finished else None, **more}}


def rows(now: datetime, dialect: str, since: Callable[[str], bool]) -> Rows:
    """The rows of every table; `now` is the moment of the upgrade (runs happened before it,
    the lease runs past it); `since(revision)` says whether the database is at `revision` or later."""
    t0 = now - timedelta(hours=2)
    done = t0 + timedelta(minutes=5)
    hook = [{"url": "http://127.0.0.1:9/hook", "events": ["run.completed", "run.failed"]}]
    notifications = hook if since("0005") else None
    one_task = [_step("t", "task", "q")]
    task_then_approval = [_step("t", "task", "q"), _step("ok", "approval", depends_on=("t",))]
    out: Rows = {
        "workflows": [
            {"id": WORK, "project_id": PROJECT, "name": "work", "description": "the work workflow",
             "current_version": 3, "current_version_id": WORK_V3, "max_concurrent_runs": 0,
             "retention_days": 0, "cron": None, "cron_timezone": None, "next_fire_at": None,
             "schedule_paused": False, "webhook_hash": None, "webhook_hint": "", "webhook_rotated_at": None,
             "archived_at": None,
             "created_by": "alice", "created_at": t0, "updated_at": t0 + timedelta(minutes=2)},
            {"id": NIGHTLY, "project_id": PROJECT, "name": "nightly", "description": "the nightly workflow",
             "current_version": 1, "current_version_id": NIGHTLY_V1, "max_concurrent_runs": 1,
             "retention_days": 7, "cron": "0 3 * * *", "cron_timezone": "Europe/Paris", "next_fire_at": None,
             "schedule_paused": True, "webhook_hash": token_hash("whk_upgrade-test-webhook"),
             "webhook_hint": "whk_upgr", "webhook_rotated_at": t0, "archived_at": None,
             "created_by": "alice", "created_at": t0, "updated_at": t0},
        ],
        "workflow_versions": [
            {"id": WORK_V1, "workflow_id": WORK, "project_id": PROJECT, "version": 1,
             "spec": _spec("work", one_task, notifications), "created_at": t0},
            {"id": WORK_V2, "workflow_id": WORK, "project_id": PROJECT, "version": 2,
             "spec": _spec("work", task_then_approval, notifications),
             "created_at": t0 + timedelta(minutes=1)},
            {"id": WORK_V3, "workflow_id": WORK, "project_id": PROJECT, "version": 3,
             "spec": _spec("work", task_then_approval, notifications),
             "created_at": t0 + timedelta(minutes=2)},
            {"id": NIGHTLY_V1, "workflow_id": NIGHTLY, "project_id": PROJECT, "version": 1,
             "spec": _spec("nightly", one_task, None, {"cron": "0 3 * * *", "timezone": "Europe/Paris"}),
             "created_at": t0},
        ],
        "workflow_runs": [], "step_runs": [], "run_events": [], "run_tags": [], "run_changes": [],
        "idempotency_keys": [
            {"project_id": PROJECT, "workflow_id": WORK, "key": "order-17", "request_hash": "ab" * 32,
             "run_id": COMPLETED, "expires_at": t0 + timedelta(hours=24)},
        ],
        "api_keys": [
            {"id": "00000000-0000-7000-8000-000000000c01", "name": "admin", "project_id": "*",
             "role": "admin", "token_hash": token_hash("cvk_upgrade-test-admin"), "token_prefix": "cvk_upgr",
             "rate_limit": 0, "created_by": "conveyor", "created_at": t0, "expires_at": None,
             "last_used_at": t0, "revoked_at": None},
            {"id": "00000000-0000-7000-8000-000000000c02", "name": "ci", "project_id": PROJECT,
             "role": "operator", "token_hash": token_hash(KEY_TOKEN), "token_prefix": KEY_TOKEN[:8],
             "rate_limit": 50, "created_by": "admin", "created_at": t0,
             "expires_at": now + timedelta(days=30), "last_used_at": None, "revoked_at": None},
            {"id": "00000000-0000-7000-8000-000000000c03", "name": "old", "project_id": PROJECT,
             "role": "viewer", "token_hash": token_hash("cvk_upgrade-test-old"), "token_prefix": "cvk_upgr",
             "rate_limit": 0, "created_by": "admin", "created_at": t0, "expires_at": None,
             "last_used_at": None, "revoked_at": done},
        ],
        "audit_entries": [
            {"at": t0, "actor": "alice", "project_id": PROJECT, "method": "CreateWorkflow",
             "resource_id": WORK, "code": "OK", "reason": "", "message": ""},
            {"at": done, "actor": "ci", "project_id": PROJECT, "method": "CancelWorkflowRun",
             "resource_id": CANCELED, "code": "OK", "reason": "", "message": ""},
            {"at": done, "actor": "ci", "project_id": PROJECT, "method": "TriggerWorkflowRun",
             "resource_id": "nope", "code": "NOT_FOUND", "reason": "WORKFLOW_NOT_FOUND",
             "message": "workflow 'nope' not found"},
        ],
        "notification_outbox": [
            {"id": f"{COMPLETED}/5/0", "run_id": COMPLETED, "project_id": PROJECT, "url": hook[0]["url"],
             "event_type": "run.completed", "event_seq": 5,
             "body": {"id": f"{COMPLETED}/5/0", "type": "run.completed", "workflow_run_id": COMPLETED,
                      "workflow_id": WORK, "workflow_name": "work", "project_id": PROJECT,
                      "status": "completed", "at": done.isoformat()},
             "attempt": 2, "next_attempt_at": done + timedelta(seconds=30),
             "last_error": "connection refused", "created_at": done},
        ],
        # A child run that ended left this for its parent (the runner had not moved it yet).
        "run_wakeups": [{"run_id": WAITING, "at": done}],
        # Project secrets (0009), sealed (engine/cipher.py: version byte, nonce, ciphertext and tag).
        "secrets": [
            {"project_id": PROJECT, "name": "API_TOKEN",
             "ciphertext": b"\x01" + bytes(range(12)) + b"\xfe" * 40, "created_at": t0, "updated_at": done},
            {"project_id": "other", "name": "API_TOKEN", "ciphertext": b"\x01" + bytes(12) + b"\x00\xff" * 20,
             "created_at": t0, "updated_at": t0},
        ],
        # Events (0011): one that started a run of "work" and skipped "nightly", one with a client id;
        # "work" listens to order.paid.
        "events": [
            {"project_id": PROJECT, "id": "00000000-0000-7000-8000-0000000000e1", "name": "order.paid",
             "key": "cust-1", "payload": {"total": 5}, "request_hash": "cd" * 32, "received_at": t0,
             "resumed": 0, "started": 1, "created_by": "ci",
             "skipped": [{"workflow_id": NIGHTLY, "workflow_name": "nightly",
                          "reason": "on_events when: failed"}]},
            {"project_id": PROJECT, "id": "client-id-17", "name": "user.signup", "key": "", "payload": {},
             "request_hash": "ef" * 32, "received_at": done, "resumed": 0, "started": 0, "skipped": None,
             "created_by": "ci"},
        ],
        "event_listeners": [{"project_id": PROJECT, "event_name": "order.paid", "workflow_id": WORK}],
        # A step's wait for an event (0013): ended, having consumed the first event.
        "event_waits": [
            {"step_id": f"00000000-0000-7000-8001-{COMPLETED[-9:]}000", "run_id": COMPLETED,
             "project_id": PROJECT, "name": "order.paid", "key": "cust-1", "active": False,
             "since": t0 - timedelta(minutes=1), "after_at": t0,
             "after_id": "00000000-0000-7000-8000-0000000000e1"},
        ],
    }
    # PostgreSQL: the writing transaction's id, as storage/run_changes.py writes it.
    txid: ClauseElement | None = (sql_cast(sql_cast(func.pg_current_xact_id(), Text), BigInteger)
                                  if dialect == "postgresql" else None)

    def run(run_id: str, version: tuple[str, int], status: str, steps: list[dict[str, Any]],
            events: list[tuple[str, str, str, str]], **more: Any) -> None:
        """A run of "work" with its steps and events ((type, step_ref, status, message), in order)."""
        final = status in ("completed", "failed", "canceled", "timed_out")
        out["workflow_runs"].append({
            "id": run_id, "project_id": PROJECT, "workflow_id": WORK, "workflow_name": "work",
            "workflow_version": version[1], "workflow_version_id": version[0], "status": status,
            "status_message": "", "triggered_by": "ci", "created_by": "ci", "max_parallel_steps": 0,
            "payload": {"order": run_id[-3:]}, "output": None, "error": "", "tags": {},
            "entity_id": "", "idempotency_key": "", "retry_of_run_id": "", "parent_workflow_run_id": "",
            "parent_step_run_id": "", "depth": 0, "root_run_id": "", "lineage": None,
            "last_seq": len(events), "wake_at": None, "started_at": t0,
            "finished_at": done if final else None, "expires_at": None, "notifications": notifications,
            "created_at": t0, "updated_at": done, **more})
        for position, step in enumerate(steps):
            out["step_runs"].append({
                "id": f"00000000-0000-7000-8001-{run_id[-9:]}{position:03d}", "workflow_run_id": run_id,
                "project_id": PROJECT, "position": position,
                "workflow_step_id": f"{version[0]}/{step['step_ref']}",
                "queue": "q" if step["kind"] == "task" else "", "attempt": 0,
                "deps_required": position, "deps_completed": 0, "input": None, "output": None,
                "error": "", "skip_reason": "", "approved_by": "", "worker_id": "", "job_run_id": "",
                "ready_at": None, "due_at": None, "lease_expires_at": None, "started_at": None,
                "finished_at": None, "created_at": t0, "updated_at": done, "losses": 0, "loss_streak": 0,
                **step})
        for seq, (kind, step_ref, event_status, message) in enumerate(events, 1):
            out["run_events"].append({
                "workflow_run_id": run_id, "seq": seq, "project_id": PROJECT, "type": kind,
                "step_ref": step_ref, "status": event_status, "message": message,
                "data": _change(event_status, t0, done if event_status in ("completed", "failed") else None),
                "actor": "engine", "at": t0 + timedelta(seconds=seq)})
        changes = ["running", status] if status != "running" else ["running"]
        for change in changes:
            out["run_changes"].append({"txid": txid, "project_id": PROJECT, "run_id": run_id,
                                       "workflow_id": WORK, "status": change, "at": done})

    task_done = {"step_ref": "t", "kind": "task", "status": "completed", "attempt": 1, "input": {},
                 "output": {"rows": 17}, "worker_id": "w1",
                 "job_run_id": "00000000-0000-7000-8000-0000000000f1",
                 "started_at": t0, "finished_at": done}
    started = [("run.running", "", "running", ""), ("step.queued", "t", "queued", ""),
               ("step.running", "t", "running", "")]
    run(COMPLETED, (WORK_V1, 1), "completed", [task_done],
        [*started, ("step.completed", "t", "completed", ""), ("run.completed", "", "completed", "")],
        output={"t": {"rows": 17}}, tags=TAGS, idempotency_key="order-17", entity_id="order-17")
    out["run_tags"] += [{"run_id": COMPLETED, "key": k, "value": v} for k, v in TAGS.items()]
    run(FAILED, (WORK_V1, 1), "failed",
        [{**task_done, "status": "failed", "output": None, "error": "boom", "losses": 1}],
        [*started, ("step.failed", "t", "failed", "boom"), ("run.failed", "", "failed", "step 't' failed")],
        status_message="step 't' failed", error="step 't' failed: boom")
    run(CANCELED, (WORK_V1, 1), "canceled",
        [{**task_done, "status": "canceled", "output": None}],
        [*started, ("step.canceled", "t", "canceled", "run canceled"),
         ("run.canceled", "", "canceled", "canceled by ci"), ("run.comment", "", "canceled", "wrong input")],
        status_message="canceled by ci")
    run(TIMED_OUT, (WORK_V1, 1), "timed_out",
        [{**task_done, "status": "timed_out", "output": None, "error": "step timed out"}],
        [*started, ("step.timed_out", "t", "timed_out", ""), ("run.timed_out", "", "timed_out", "")],
        status_message="run timed out")
    run(PAUSED, (WORK_V1, 1), "paused",
        [{"step_ref": "t", "kind": "task", "status": "queued", "input": {}, "ready_at": t0}],
        [*started[:2], ("run.paused", "", "paused", "")])
    run(QUEUED, (WORK_V1, 1), "running",
        [{"step_ref": "t", "kind": "task", "status": "queued", "input": {"n": 1}, "ready_at": t0}],
        started[:2])
    run(LEASED, (WORK_V1, 1), "running",
        [{**task_done, "status": "running", "output": None, "worker_id": OLD_WORKER, "finished_at": None,
          "lease_expires_at": now + timedelta(minutes=10)}],
        started)
    run(WAITING, (WORK_V2, 2), "running",
        [task_done, {"step_ref": "ok", "kind": "approval", "status": "waiting", "attempt": 1,
                     "deps_completed": 1, "input": {}, "started_at": done}],
        [*started, ("step.completed", "t", "completed", ""), ("step.waiting", "ok", "waiting", "")])
    return out
