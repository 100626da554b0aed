"""The ``/metrics`` endpoint and the runtime metrics every daemon has.

Each daemon instance owns one :class:`~prometheus_client.CollectorRegistry`
(never the global one), passed in, so tests can read it. Names follow
``shoal_<daemon>_<thing>_<unit>`` with ``_total`` on counters; label values
come from fixed sets (results, reason tokens), never from peers.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import metadata

import prometheus_client
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Info, generate_latest

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import ERROR_REASONS, HttpRequest, HttpResponse, serve_http
from shoal.protocol.rpc import REASONS as RPC_FRAME_REASONS

# Counters would otherwise export a `_created` timestamp series each, doubling
# the series count for no use in Prometheus queries. (Counters are created only
# inside functions below, so calling this after the imports is early enough.)
prometheus_client.disable_created_metrics()

__all__ = [
    "RuntimeMetrics", "runtime_metrics", "serve_metrics", "metrics_handler", "CONFIG_RELOAD_RESULTS", "RPC_RESULTS",
]

CONFIG_RELOAD_RESULTS = ("ok", "error")
#: ``shoal_<name>_rpc_requests_total{result}``: how each request ended.
RPC_RESULTS = ("ok", "error", "no_such_method", "timeout", "busy", "internal")
#: ``shoal_<name>_rpc_errors_total{reason}``: the frame-level reasons of
#: :mod:`shoal.protocol.rpc` plus the server's own (see runtime/rpc.py). Every
#: one exists at 0 from the start, so a panel or ``increase()`` sees the first.
RPC_ERROR_REASONS = (*RPC_FRAME_REASONS, "handshake_timeout", "unauthorized", "internal", "bad_result", "send_timeout")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _version() -> str:
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class RuntimeMetrics:
    """Handles to the runtime metrics of one daemon instance."""

    name: str
    build_info: Info
    start_time: Gauge
    config_reloads: Counter  # {result}
    http_errors: Counter  # {reason}
    rpc_requests: Counter  # {result}
    rpc_errors: Counter  # {reason}
    rpc_in_flight: Gauge
    state_saves: Counter  # {what, result}: runtime.state.StateSaver

    def count_http_error(self, reason: str) -> None:
        """Shaped for ``serve_http(on_error=...)``."""
        self.http_errors.labels(reason=reason).inc()


def runtime_metrics(registry: CollectorRegistry, daemon_name: str) -> RuntimeMetrics:
    """Create the runtime metrics of daemon ``daemon_name`` in ``registry``."""
    if not _NAME.match(daemon_name):
        raise ValueError(f"daemon name {daemon_name!r} must match {_NAME.pattern} (it is part of metric names)")
    p = f"shoal_{daemon_name}"
    build_info = Info(f"{p}_build", "Shoal build running this daemon.", registry=registry)
    build_info.info({"version": _version()})
    start_time = Gauge(f"{p}_start_time_seconds", "Unix time the daemon started.", registry=registry)
    start_time.set(time.time())
    config_reloads = Counter(
        f"{p}_config_reloads_total", "Config reloads (SIGHUP) by result.", ["result"], registry=registry
    )
    http_errors = Counter(
        f"{p}_http_errors_total", "HTTP connections refused or closed on error, by reason.", ["reason"],
        registry=registry,
    )
    rpc_requests = Counter(f"{p}_rpc_requests_total", "RPC requests served, by result.", ["result"], registry=registry)
    rpc_errors = Counter(
        f"{p}_rpc_errors_total", "RPC connection-level errors, by reason.", ["reason"], registry=registry
    )
    rpc_in_flight = Gauge(f"{p}_rpc_in_flight", "RPC requests being processed now.", registry=registry)
    state_saves = Counter(
        f"{p}_state_saves_total", "Periodic and final state saves, by what was saved and result.",
        ["what", "result"], registry=registry,
    )
    # Create the known series up front so dashboards see zeros, not gaps.
    for result in CONFIG_RELOAD_RESULTS:
        config_reloads.labels(result=result)
    for reason in ERROR_REASONS:
        http_errors.labels(reason=reason)
    for result in RPC_RESULTS:
        rpc_requests.labels(result=result)
    for reason in RPC_ERROR_REASONS:
        rpc_errors.labels(reason=reason)
    return RuntimeMetrics(
        daemon_name, build_info, start_time, config_reloads, http_errors, rpc_requests, rpc_errors, rpc_in_flight,
        state_saves,
    )


def metrics_handler(registry: CollectorRegistry):
    """An HTTP handler serving ``GET /metrics`` from ``registry``."""

    async def handle(request: HttpRequest) -> HttpResponse:
        path = request.target.split(b"?", 1)[0]
        if path != b"/metrics":
            return HttpResponse(404, [(b"content-type", b"text/plain")], b"not found; try /metrics\n")
        if request.method not in (b"GET", b"HEAD"):
            return HttpResponse(405, [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")], b"GET only\n")
        # Collectors are read at scrape time; generate_latest is synchronous
        # and fast for registries of this size.
        return HttpResponse(200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(registry))

    return handle


async def serve_metrics(
    registry: CollectorRegistry,
    listen: ListenAddr,
    *,
    on_error=None,
    task_status: trio.TaskStatus[ListenAddr] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``registry`` at ``http://listen/metrics`` until cancelled.

    Started with the bound address. Scrapers are few, so the connection bound
    is small: the endpoint must not become a way to exhaust file descriptors.
    """
    await serve_http(
        metrics_handler(registry),
        listen,
        max_connections=64,
        idle_timeout=30.0,
        on_error=on_error,
        task_status=task_status,
    )
