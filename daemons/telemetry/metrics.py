"""The telemetry daemon's Prometheus metrics (shoal_telemetry_<thing>_<unit>).

Label values come from fixed sets: ``source`` is a source name from
sources.py, ``result`` a verdict, ``origin``/``outcome`` fixed tokens.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SOURCES = ("cpu", "cpufreq", "load", "memory", "disk", "net", "pressure", "vmstat", "resctrl", "hwmon", "rapl", "gpu",
           "node_exporter", "cgroup")
VERDICTS = ("normal", "anomalous", "unscored", "disturbed")
ORIGINS = ("startup", "local", "federated", "rpc")
OUTCOMES = ("ok", "refused")


class TelemetryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter("shoal_telemetry_samples_total", "Node samples taken.", registry=registry)
        self.sample_seconds = Histogram(
            "shoal_telemetry_sample_duration_seconds", "Time to read every source once.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0), registry=registry,
        )
        self.source_errors = Counter(
            "shoal_telemetry_source_errors_total", "Failed reads of a source (sensor vanished, bad data).",
            ["source"], registry=registry,
        )
        self.sources_absent = Gauge(
            "shoal_telemetry_sources_absent", "Sources skipped because this node lacks them.", registry=registry,
        )
        self.windows = Counter(
            "shoal_telemetry_windows_total",
            "Closed windows, by verdict (disturbed: the daemon was training or installing a model; not scored).",
            ["result"], registry=registry,
        )
        self.stored = Gauge("shoal_telemetry_windows_stored", "Windows in the local store.", registry=registry)
        self.score = Gauge("shoal_telemetry_window_score", "Reconstruction error of the last scored window.",
                           registry=registry)
        self.anomalous = Gauge("shoal_telemetry_window_anomalous",
                               "1 if the last scored window was anomalous, else 0.", registry=registry)
        self.node_anomalous = Gauge(
            "shoal_telemetry_node_anomalous",
            "1 while the node is anomalous: [detector] confirm anomalous windows in a row set it, as many "
            "normal ones clear it.", registry=registry)
        self.threshold = Gauge("shoal_telemetry_threshold", "Anomaly threshold of the installed model.",
                               registry=registry)
        self.model_features = Gauge("shoal_telemetry_model_features", "Features of the installed model (0: none).",
                                    registry=registry)
        self.model_installs = Counter(
            "shoal_telemetry_model_installs_total", "Model installs, by origin and outcome.",
            ["origin", "outcome"], registry=registry,
        )
        self.model_installed = Gauge("shoal_telemetry_model_installed_timestamp_seconds",
                                     "When the running model was installed (Unix time).", registry=registry)
        self.score_seconds = Histogram(
            "shoal_telemetry_score_duration_seconds", "Time to score one window with onnxruntime.",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.05), registry=registry,
        )
        self.supernode_restarts = Counter("shoal_telemetry_supernode_restarts_total",
                                          "Times the Flower SuperNode was restarted.", registry=registry)
        self.hook_failures = Counter("shoal_telemetry_hook_failures_total",
                                     "on_change_command runs that failed or timed out.", registry=registry)
        for v in VERDICTS:
            self.windows.labels(v)
        for o in ORIGINS:
            for r in OUTCOMES:
                self.model_installs.labels(o, r)
        for s in SOURCES:
            self.source_errors.labels(s)
