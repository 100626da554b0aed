"""/metrics endpoint and the runtime metrics."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.metrics import runtime_metrics, serve_metrics


async def get(addr: ListenAddr, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    await stream.send_all(request)
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def test_runtime_metric_names_and_labels():
    registry = CollectorRegistry()
    m = runtime_metrics(registry, "tracker")
    m.rpc_requests.labels(result="ok").inc()
    m.count_http_error("bad_http")
    m.rpc_in_flight.set(3)
    assert registry.get_sample_value("shoal_tracker_rpc_requests_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("shoal_tracker_http_errors_total", {"reason": "bad_http"}) == 1
    assert registry.get_sample_value("shoal_tracker_config_reloads_total", {"result": "error"}) == 0
    assert registry.get_sample_value("shoal_tracker_rpc_in_flight") == 3
    samples = m.build_info.collect()[0].samples
    assert any(s.name == "shoal_tracker_build_info" and "version" in s.labels for s in samples)
    with pytest.raises(ValueError):
        runtime_metrics(CollectorRegistry(), "Bad-Name")


async def test_metrics_endpoint_serves_parseable_text():
    registry = CollectorRegistry()
    m = runtime_metrics(registry, "peer")
    m.rpc_errors.labels(reason="bad_msgpack").inc(2)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(partial(serve_metrics, registry, ListenAddr("127.0.0.1", 0)))
            data = await get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"content-type: " + CONTENT_TYPE_LATEST.encode() in head.lower()
            families = {f.name: f for f in text_string_to_metric_families(body.decode())}
            assert "shoal_peer_rpc_errors" in families
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for s in families["shoal_peer_rpc_errors"].samples}
            assert samples[("shoal_peer_rpc_errors_total", (("reason", "bad_msgpack"),))] == 2
            assert "shoal_peer_build_info" in families

            data = await get(addr, b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 404")
            data = await get(
                addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            assert data.startswith(b"HTTP/1.1 405")
            nursery.cancel_scope.cancel()
