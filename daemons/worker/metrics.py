"""The worker's Prometheus metrics (shoal_worker_<thing>_<unit>); labels from fixed sets."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RESULTS = ("ok", "failed", "timeout", "error")  # error: inputs, outputs or spawn failed
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 7200)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, gauges: Callable[[], tuple[int, int, int, int]]) -> None:
        self.started = Counter("shoal_worker_tasks_started_total", "Tasks started.", registry=registry)
        self.finished = Counter("shoal_worker_tasks_finished_total", "Tasks finished, by result.", ["result"],
                                registry=registry)
        self.finished_by = {r: self.finished.labels(r) for r in RESULTS}
        self.duration = Histogram("shoal_worker_task_duration_seconds", "Wall time of one task.",
                                  buckets=DURATION_BUCKETS, registry=registry)
        self.truncated = Counter("shoal_worker_output_truncated_bytes_total",
                                 "stdout/stderr bytes dropped beyond max_log_bytes.", registry=registry)
        self.memory_kills = Counter("shoal_worker_tasks_memory_killed_total",
                                    "Tasks killed by the kernel for passing their memory limit (in their cgroup).",
                                    registry=registry)
        self.input_errors = Counter("shoal_worker_input_errors_total", "Task inputs that could not be fetched.",
                                    registry=registry)
        self.killed = Counter("shoal_worker_units_killed_total",
                              "Running units killed (their process group) because the dispatcher ended their job.",
                              registry=registry)
        self.dropped = Counter("shoal_worker_units_dropped_total",
                               "Queued units dropped unstarted because the dispatcher ended their job.",
                               registry=registry)
        self.inputs_fetched = Counter("shoal_worker_task_inputs_fetched_total",
                                      "task:NAME/OUTPUT inputs fetched and verified, by how (local, swarm, http).",
                                      ["how"], registry=registry)
        for how in ("local", "swarm", "http"):
            self.inputs_fetched.labels(how)
        self.output_refused = Counter("shoal_worker_output_requests_refused_total",
                                      "Requests to the output server refused, by reason.", ["reason"],
                                      registry=registry)
        self.output_bytes_served = Counter("shoal_worker_output_served_bytes_total",
                                           "Bytes of task outputs served to other workers.", registry=registry)
        self.outputs_swept = Counter("shoal_worker_outputs_swept_total",
                                     "Jobs whose outputs were removed after their retention period.",
                                     registry=registry)
        self.dispatcher_errors = Counter("shoal_worker_dispatcher_errors_total",
                                         "Lost or refused connections to the dispatcher.", registry=registry)
        self.telemetry_errors = Counter(
            "shoal_worker_telemetry_errors_total",
            "Failed reads of the node's telemetry verdict (telemetry_metrics unreachable or not metrics).",
            registry=registry)
        self.team_rewards = Counter(
            "shoal_worker_team_rewards_total",
            "Results of units run on other workers fed to the marl scheduler (the shared reward).",
            registry=registry)
        self.node_verdict = Gauge(
            "shoal_worker_node_anomalous",
            "The node's telemetry verdict as last read: 1 anomalous, 0 normal, -1 unknown or not read.",
            registry=registry)
        registry.register(_Gauges(gauges))

    def set_verdict(self, verdict: str | None) -> None:
        self.node_verdict.set({"anomalous": 1, "normal": 0}.get(verdict or "", -1))


class _Gauges(Collector):
    def __init__(self, read: Callable[[], tuple[int, int, int, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, slots, queued, unreported = self.read()
        yield GaugeMetricFamily("shoal_worker_running_tasks", "Tasks running on this worker now.", value=running)
        yield GaugeMetricFamily("shoal_worker_slots", "Tasks this worker runs at once (K).", value=slots)
        yield GaugeMetricFamily("shoal_worker_queue_length", "Units pulled and waiting for a slot.", value=queued)
        yield GaugeMetricFamily("shoal_worker_unreported_units", "Finished units not yet reported.",
                                value=unreported)
