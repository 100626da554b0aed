"""The fedserver's Prometheus metrics (shoal_fedserver_<thing>_<unit>); labels from fixed sets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shoal.daemons.fedserver.proxy import FLEET_PATHS

RESULTS = ("ok", "error")
TRIGGERS = ("schedule", "rpc")


class FedserverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Counter("shoal_fedserver_runs_total", "FedAvg runs, by trigger and result.",
                            ["trigger", "result"], registry=registry)
        self.run_seconds = Histogram("shoal_fedserver_run_duration_seconds", "Wall time of one FedAvg run.",
                                     buckets=(5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600), registry=registry)
        self.last_success = Gauge("shoal_fedserver_last_success_timestamp_seconds",
                                  "When the last run completed (Unix time; 0 = never).", registry=registry)
        self.running = Gauge("shoal_fedserver_run_in_progress", "1 while a run is in progress.", registry=registry)
        self.features = Gauge("shoal_fedserver_model_features", "Features of the latest global model.",
                              registry=registry)
        self.superlink_restarts = Counter("shoal_fedserver_superlink_restarts_total",
                                          "Times the Flower SuperLink was restarted.", registry=registry)
        self.catch_ups = Counter("shoal_fedserver_catch_ups_total", "Latest-model downloads served to nodes.",
                                 registry=registry)
        self.authorized_nodes = Gauge("shoal_fedserver_authorized_nodes",
                                      "SuperNode public keys from authorized_keys registered at start.",
                                      registry=registry)
        self.key_errors = Counter("shoal_fedserver_key_errors_total",
                                  "authorized_keys entries (or files) that could not be registered.",
                                  registry=registry)
        self.proxy_refused = Counter("shoal_fedserver_proxy_refused_total",
                                     "Requests the SuperLink proxy refused with 403 (not a Fleet API path).",
                                     registry=registry)
        self.proxy_forwarded = Counter("shoal_fedserver_proxy_forwarded_total",
                                       "Fleet API requests the proxy forwarded to the SuperLink, by path.",
                                       ["path"], registry=registry)
        self.proxy_upstream_errors = Counter("shoal_fedserver_proxy_upstream_errors_total",
                                             "Forwarded requests the SuperLink did not answer (502).",
                                             registry=registry)
        for path in FLEET_PATHS:
            self.proxy_forwarded.labels(path.decode())
        for t in TRIGGERS:
            for r in RESULTS:
                self.runs.labels(t, r)
