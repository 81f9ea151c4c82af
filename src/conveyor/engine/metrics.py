"""The server's Prometheus metrics: one `CollectorRegistry` per engine and every metric in it.

Everything is counted at a few central places, per unit of work or per batch, never per row
read: `observe_units` sees every committed unit (the runner's `publish`, which every commit of
the engine goes through) and derives from each unit's fences what happened in it (a run created
or finished, an attempt ended, a lease expired); the runner reports its passes, the trigger queue
its batches, the lease paths the queue wait of the attempts they start, watches open and close
themselves, and the database pool is read only when /metrics is scraped. A registry per Engine
(not prometheus-client's global one) keeps several engines in one process, as tests make them,
from counting into each other. README "Metrics and health" lists every metric and its labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conveyor.domain.changes import Changes
from conveyor.domain.records import StepRecord
from conveyor.domain.states import FINAL_RUN, StepStatus

# Seconds: steps run from milliseconds (noop) to hours (approvals, long tasks).
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                 900.0, 3600.0, 4 * 3600.0)
# Seconds: a runner pass is milliseconds; anything near a second is trouble.
_PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Requests per trigger transaction: powers of two up to the largest batch the settings allow.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# An attempt is under way in these statuses (started_at is its start).
_UNDER_WAY = frozenset({StepStatus.RUNNING, StepStatus.WAITING})
# Pool name -> (connections checked out, the pool's capacity), read at scrape time.
PoolUsage = Callable[[], Mapping[str, tuple[int, int]]]


class Metrics:
    """Every metric of one engine, in its own registry (`registry`, what /metrics serves)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.runs_triggered = Counter(
            "conveyor_runs_triggered", "Runs created, by origin: trigger (the API, a schedule, a "
            "webhook), child (a workflow step), retry (a retry of a finished run as a new run)",
            ["origin"], registry=r)
        self.runs_finished = Counter(
            "conveyor_runs_finished", "Runs that reached a final status, by that status", ["status"],
            registry=r)
        self.step_duration = Histogram(
            "conveyor_step_duration_seconds", "Attempts from started to ended (running or "
            "waiting until then), by kind, queue and the status they ended in (queued: failed, retrying)",
            ["kind", "queue", "status"], buckets=_STEP_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "conveyor_step_queue_wait_seconds", "Leased attempts (task, http) from ready (given "
            "a slot, or their retry backoff over) to started by a lease holder, by kind and queue",
            ["kind", "queue"], buckets=_STEP_BUCKETS, registry=r)
        self.lease_expiries = Counter(
            "conveyor_lease_expiries", "Leases that expired (their holder stopped heartbeating) "
            "and were revoked by the engine, by kind and queue", ["kind", "queue"], registry=r)
        self.losses = Counter(
            "conveyor_step_losses", "Attempts that ended with no verdict (lease expired with no "
            "report, released by their holder): offered again, no retry spent; by kind and queue",
            ["kind", "queue"], registry=r)
        self.pass_seconds = Histogram(
            "conveyor_runner_pass_seconds", "Runner passes (claim due runs, plan, save, commit) "
            "that committed, by wall time", buckets=_PASS_BUCKETS, registry=r)
        self.lag = Gauge(
            "conveyor_runner_lag_seconds", "Age of the oldest due wake_at the last runner pass "
            "claimed (0 when nothing was overdue): how far the engine is behind", registry=r)
        self.trigger_batch = Histogram(
            "conveyor_trigger_batch_size", "Trigger requests written per transaction (group commit)",
            buckets=_BATCH_BUCKETS, registry=r)
        self.watches_open = Gauge(
            "conveyor_watches_open", "Watch streams open now, by kind (run, project)", ["kind"],
            registry=r)
        self.watchers_dropped = Counter(
            "conveyor_watchers_dropped", "Run watches ended with WATCHER_TOO_SLOW: their client fell "
            "a whole buffer of events behind", registry=r)
        self.retention_deleted = Counter(
            "conveyor_retention_deleted_rows", "Rows deleted by retention (engine/retention.py), by "
            "table: runs, steps, events, tags, notifications, wakeups, idempotency, changes, audit",
            ["table"], registry=r)
        self.ready = Gauge(
            "conveyor_ready", "1 while the readiness probe reaches the database, else 0", registry=r)
        self.envoy_restarts = Counter(
            "conveyor_envoy_restarts", "Times this server restarted its Envoy after it exited "
            "(gateway/supervisor.py)", registry=r)
        self.refused_requests = Counter(
            "conveyor_refused_requests", "Calls refused with no valid key or webhook behind them, "
            "by reason (MISSING_TOKEN, MALFORMED_TOKEN, INVALID_TOKEN, WEBHOOK_NOT_FOUND, "
            "RATE_LIMITED...): counted here instead of one audit entry each (api/access.py)",
            ["reason"], registry=r)
        self._pool = _PoolCollector()
        r.register(self._pool)
        # Labelled children by metric and label values: labels() takes a lock and builds a key
        # each call (~2 us, where a dict lookup and the increment cost ~1 us).
        self._children: dict[tuple[object, ...], Any] = {}

    # -- what the wiring hands in ----------------------------------------------------------------

    def watch_pool(self, usage: PoolUsage) -> None:
        """Report the database pool's use from `usage`, called at each scrape."""
        self._pool.usage = usage

    # -- the engine's hooks ----------------------------------------------------------------------

    def observe_units(self, units: Sequence[Changes]) -> None:
        """After commit: what these units did, read from their fences (the state as loaded)."""
        for c in units:
            run = c.run
            before = c.run_loaded_status
            if run.fence is None:  # built in this unit, not loaded: a new run
                origin = ("child" if run.parent_workflow_run_id
                          else "retry" if run.retry_of_run_id else "trigger")
                self._child(self.runs_triggered, origin).inc()
                if run.status in FINAL_RUN:  # created final (its condition was false)
                    self._child(self.runs_finished, run.status.value).inc()
            elif before is not None and before != run.status and run.status in FINAL_RUN:
                self._child(self.runs_finished, run.status.value).inc()
            if c.steps:
                self._steps(c)
            for step in c.lost:
                self._child(self.losses, step.kind, step.queue).inc()

    def _steps(self, c: Changes) -> None:
        now = c.now
        for step_id, step in c.steps.items():
            fence = c.step_fences[step_id]
            # An attempt ended in this unit: it was under way when loaded (running, or waiting:
            # a delay, an approval, an input) or started in this very unit (a new attempt,
            # stamped started_at = now), and is under way no longer.
            if (step.status not in _UNDER_WAY and step.started_at is not None
                    and (fence.status in _UNDER_WAY
                         or (step.attempt != fence.attempt and step.started_at == now))):
                ended = step.finished_at or now
                self._duration(step, step.status.value).observe((ended - step.started_at).total_seconds())
            # The engine revoked a lease that had expired as loaded: its holder went silent.
            expiry = fence.lease_expires_at
            if (expiry is not None and expiry <= now and fence.status == StepStatus.RUNNING
                    and step.lease_expires_at is None):
                self._child(self.lease_expiries, step.kind, step.queue).inc()

    def leased(self, step: StepRecord, now: datetime) -> None:
        """A lease holder is about to start an attempt of this ready queued step (its ready_at,
        which starting clears, is still set)."""
        if step.ready_at is not None:
            wait = max(0.0, (now - step.ready_at).total_seconds())
            self._child(self.queue_wait, step.kind, step.queue).observe(wait)

    def runner_pass(self, seconds: float, oldest_due: datetime | None, now: datetime) -> None:
        """A runner pass committed in `seconds`; `oldest_due` is the earliest wake_at it claimed."""
        self.pass_seconds.observe(seconds)
        self.lag.set(max(0.0, (now - oldest_due).total_seconds()) if oldest_due is not None else 0.0)

    def retention_swept(self, deleted: Mapping[str, int]) -> None:
        """Retention deleted these rows, by table."""
        for table, n in deleted.items():
            if n:
                self._child(self.retention_deleted, table).inc(n)

    def trigger_batch_written(self, size: int) -> None:
        self.trigger_batch.observe(size)

    @contextmanager
    def watching(self, kind: str) -> Iterator[None]:
        """Counts one open watch of `kind` while the block runs."""
        gauge = self.watches_open.labels(kind)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def refused(self, reason: str) -> None:
        """A call refused with no valid key or webhook behind it (the API's gate)."""
        self._child(self.refused_requests, reason).inc()

    def _duration(self, step: StepRecord, status: str) -> Histogram:
        return self._child(self.step_duration, step.kind, step.queue, status)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child


class _PoolCollector(Collector):
    """The database pool's use, read when scraped (nothing on the hot path)."""

    def __init__(self) -> None:
        self.usage: PoolUsage | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily("conveyor_db_pool_checked_out", "", labels=["pool"]),
                GaugeMetricFamily("conveyor_db_pool_size", "", labels=["pool"])]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("conveyor_db_pool_checked_out",
                                 "Database connections checked out of the pool now, by pool", labels=["pool"])
        size = GaugeMetricFamily("conveyor_db_pool_size",
                                 "Connections the pool may hand out at most, by pool", labels=["pool"])
        for name, (checked_out, capacity) in (self.usage() if self.usage is not None else {}).items():
            used.add_metric([name], checked_out)
            size.add_metric([name], capacity)
        yield used
        yield size
