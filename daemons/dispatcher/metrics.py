"""The dispatcher's Prometheus metrics (shoal_dispatcher_<thing>_<unit>).

Labels come from fixed sets: ``policy`` is a dispatch policy name, ``reason``
a :data:`~.jobs.REASONS` token, ``state`` done, failed or cancelled. Queue depth and the
worker count are read from the core at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.core.dispatch.jobs import REASONS
from shoal.core.dispatch.policy import DISPATCH_POLICIES

REFUSALS = ("no_credential", "not_allowed")
RESPONSE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)
DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.02)


class DispatcherMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"shoal_dispatcher_{name}", doc, list(labels), registry=registry)

        self.tasks_submitted = counter("tasks_submitted_total", "Tasks accepted in submitted jobs.")
        self.tasks_started = counter("tasks_started_total", "Tasks handed to workers (leased), retries included.")
        self.tasks_finished = counter("tasks_finished_total", "Tasks recorded done (each exactly once).")
        self.tasks_failed = counter("tasks_failed_total", "Tasks that failed for good (retries exhausted).")
        self.units_retried = counter("units_retried_total", "Failed units queued again for another attempt.")
        self.units_requeued = counter("units_requeued_total", "Units returned to the queue by a lost lease.")
        self.duplicates = counter("duplicate_reports_total", "Reports for units already recorded (ignored).")
        self.deadline_misses = counter("deadline_misses_total", "Tasks that finished after their deadline.")
        self.specs_rejected = counter("specs_rejected_total", "Job specs refused, by reason.", ("reason",))
        self.submit_refused = counter(
            "submit_refused_total", "Submissions (and other operator calls) refused for want of a credential, "
            "by reason: no_credential (the TCP RPC without a token), not_allowed (a socket peer not in "
            "submit_users or submit_groups).", ("reason",))
        self.jobs_finished = counter("jobs_finished_total", "Jobs finished, by final state.", ("state",))
        self.pruned_rows = counter("pruned_rows_total",
                                   "Rows of finished jobs deleted from the store after job_retention.")
        self.stalled_seconds = counter(
            "stalled_seconds_total", "Time the dispatcher's loop could not listen (a tick came late), excused "
            "to the workers: their silence in it does not make them dead.")
        self.units_cancelled = counter("units_cancelled_total",
                                       "Units cancelled because their job failed or was cancelled.")
        self.units_killed = counter("units_killed_total",
                                    "Cancelled units that were leased to a worker, which is told to kill them.")
        self.anomaly_exclusions = counter(
            "anomaly_exclusions_total", "Times a worker was excluded because telemetry flagged its node anomalous.")
        self.response = Histogram(
            "shoal_dispatcher_response_time_seconds",
            "Unit response time: from release (dependencies done) to its result recorded.",
            buckets=RESPONSE_BUCKETS, registry=registry)
        self.decision_latency = Histogram(
            "shoal_dispatcher_dispatch_decision_seconds", "Time the dispatch policy took to place one unit.",
            ["policy"], buckets=DECISION_BUCKETS, registry=registry)
        self._decision_by = {p: self.decision_latency.labels(p) for p in DISPATCH_POLICIES}
        for r in REASONS:
            self.specs_rejected.labels(r)
        for r in REFUSALS:
            self.submit_refused.labels(r)
        for s in ("done", "failed", "cancelled"):
            self.jobs_finished.labels(s)

    # -- the core's hooks -------------------------------------------------------

    def submitted(self, n: int) -> None:
        self.tasks_submitted.inc(n)

    def started(self, n: int) -> None:
        self.tasks_started.inc(n)

    def finished(self, n: int, response: float, misses: int) -> None:
        self.tasks_finished.inc(n)
        self.response.observe(response)
        if misses:
            self.deadline_misses.inc(misses)

    def failed(self, n: int) -> None:
        self.tasks_failed.inc(n)

    def retried(self) -> None:
        self.units_retried.inc()

    def requeued(self, n: int) -> None:
        self.units_requeued.inc(n)

    def cancelled(self, n: int, leased: int) -> None:
        self.units_cancelled.inc(n)
        self.units_killed.inc(leased)

    def duplicate(self) -> None:
        self.duplicates.inc()

    def anomaly_excluded(self) -> None:
        self.anomaly_exclusions.inc()

    def decision(self, policy: str, seconds: float) -> None:
        self._decision_by[policy].observe(seconds)

    def watch(self, registry: CollectorRegistry, core: Any) -> None:
        registry.register(_CoreCollector(core))


class _CoreCollector(Collector):
    def __init__(self, core: Any) -> None:
        self.core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        c = self.core
        yield GaugeMetricFamily("shoal_dispatcher_queue_depth", "Ready units not yet pulled by a worker.",
                                value=c.queue_depth())
        yield GaugeMetricFamily("shoal_dispatcher_running_units", "Units leased to workers.", value=c.running_units())
        yield GaugeMetricFamily("shoal_dispatcher_unfinished_units", "Units of running jobs not done yet.",
                                value=c.unfinished_units)
        yield GaugeMetricFamily("shoal_dispatcher_jobs_running", "Jobs not finished.", value=len(c.jobs))
        yield GaugeMetricFamily("shoal_dispatcher_workers", "Registered live workers.", value=len(c.workers))
        yield GaugeMetricFamily("shoal_dispatcher_workers_excluded",
                                "Workers not dispatched to: excluded by the operator or flagged anomalous.",
                                value=sum(1 for w in c.workers.values() if not c.dispatchable(w)))
        yield GaugeMetricFamily("shoal_dispatcher_workers_anomalous",
                                "Workers whose node telemetry reports anomalous (excluded or not).",
                                value=sum(1 for w in c.workers.values() if w.verdict == "anomalous"))
