"""The worker's side of two dispatcher features: the node's anomaly verdict and the team reward.

Theory of operation
-------------------
**Anomaly verdict.** The telemetry daemon on this node scores every closed
window and publishes the node's verdict on its Prometheus endpoint:
``shoal_telemetry_node_anomalous`` (1 or 0; ``[detector] confirm`` windows in
a row flip it, so one odd window does not take a healthy node out) next to
``shoal_telemetry_model_features`` (0 while no model is installed, when
nothing is scored). The worker reads that endpoint on loopback (the control
socket is private to the telemetry daemon's user; ``/metrics`` is not, and it
is telemetry's existing interface) every ``heartbeat_interval`` and sends the
verdict with its heartbeats: ``anomalous``, ``normal``, or ``unknown`` when
the endpoint cannot be read or no model is installed. The dispatcher
(``exclude_anomalous``) stops dispatching to a node reported anomalous;
``unknown`` does not exclude, so a telemetry daemon that is down cannot keep a
healthy node out. :func:`verdict_from_metrics` is the pure part;
:func:`read_verdict` does the HTTP GET in a thread, bounded in time and size.

**Team reward.** Seed 004's scheduling agents share one reward. A worker
running the ``marl`` queue policy observes its own units as they finish and
asks the dispatcher (``rewards: true`` on pull and heartbeat) for the units
recorded done on every other worker; :func:`feed_team_rewards` hands those
response times to the policy's ``observe``, as the simulator does for every
task of every server.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from shoal.core.dispatch.policy import QueuePolicy, TaskInfo

__all__ = ["verdict_from_metrics", "read_verdict", "feed_team_rewards", "MAX_METRICS_BYTES"]

ANOMALOUS = "shoal_telemetry_node_anomalous"
FEATURES = "shoal_telemetry_model_features"
MAX_METRICS_BYTES = 4 << 20  # a telemetry /metrics page is a few KiB


def verdict_from_metrics(text: str) -> str:
    """``anomalous``, ``normal`` or ``unknown`` from the telemetry daemon's /metrics page.

    Raises ``ValueError`` if the page is not the Prometheus text format.
    """
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (ANOMALOUS, FEATURES) and not sample.labels:
                values[sample.name] = sample.value
    if ANOMALOUS not in values or not values.get(FEATURES, 0) > 0:
        return "unknown"  # not a telemetry daemon, or no model installed: nothing scored
    return "anomalous" if values[ANOMALOUS] >= 1 else "normal"


def _get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - config checks http(s)
        body = resp.read(MAX_METRICS_BYTES + 1)
    if len(body) > MAX_METRICS_BYTES:
        raise ValueError(f"more than {MAX_METRICS_BYTES} bytes")
    return body.decode("utf-8", "replace")


async def read_verdict(url: str, timeout: float) -> str:
    """GET ``url`` and return its verdict; ``OSError``/``ValueError`` with the reason on failure."""
    try:
        text = await trio.to_thread.run_sync(_get, url, timeout, abandon_on_cancel=True)
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code}") from None
    return verdict_from_metrics(text)


def feed_team_rewards(policy: QueuePolicy, rows: Any, now: float) -> int:
    """Give ``policy`` the response times of units that finished on other workers.

    ``rows`` is the dispatcher's ``[[unit key, worker, response seconds], ...]``;
    malformed rows are skipped. Returns how many were observed.
    """
    if not isinstance(rows, list):
        return 0
    n = 0
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and isinstance(row[1], str)
                and isinstance(row[2], (int, float)) and not isinstance(row[2], bool) and math.isfinite(row[2])):
            continue
        key, worker, response = row[0], row[1], max(float(row[2]), 0.0)
        # Only the response time matters to the reward; the rest is what the key tells.
        info = TaskInfo(id=key, job=key.partition("/")[0], work=0.0, data_size=0.0, mem=0.0, cpus=0.0,
                        deadline=None, submitted=now - response)
        policy.observe(info, worker, response, now)
        n += 1
    return n
