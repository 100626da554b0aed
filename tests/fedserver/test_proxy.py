"""The Fleet-only proxy: which requests pass, what reaches the SuperLink, and failures.

The upstream here is a small TLS HTTP server on loopback that echoes what it
received (standing in for the SuperLink, which is not under test: the
federation test runs the real one through the proxy). The proxy, its TLS and
its policy are the real ones.
"""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
import trio

from shoal.daemons.fedserver.certs import make_tls
from shoal.daemons.fedserver.daemon import check_names_loopback
from shoal.daemons.fedserver.proxy import (
    FLEET_PATHS,
    FleetProxy,
    allowed,
    client_context,
    forward_headers,
    server_context,
)
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpConnectionHandler, HttpRequest, HttpResponse, bound_address, open_listeners

SIGNED = [(b"flwr-public-key", b"AAAApublic=="), (b"flwr-signature", b"c2lnbmF0dXJl"),
          (b"flwr-timestamp", b"2026-11-21T17:00:00+00:00")]


@pytest.mark.parametrize("method, target", [(b"POST", p) for p in FLEET_PATHS])
def test_every_fleet_path_passes(method, target):
    assert allowed(method, target)


@pytest.mark.parametrize("method, target", [
    (b"POST", b"/v1/control/start-run"),
    (b"POST", b"/v1/control/register-node"),
    (b"POST", b"/v1/runtime/pull-task-input"),
    (b"GET", b"/v1/fleet/pull-messages"),  # right path, wrong method
    (b"POST", b"/v1/fleet/../control/start-run"),
    (b"POST", b"/v1/fleet/%2e%2e/control/start-run"),
    (b"POST", b"/v1/fleet/pull-messages?x=1"),
    (b"POST", b"/v1/fleet/pull-messages/"),
    (b"POST", b"//v1/fleet/pull-messages"),
    (b"POST", b"/V1/FLEET/PULL-MESSAGES"),
    (b"POST", b"http://127.0.0.1/v1/fleet/pull-messages"),  # absolute form
    (b"GET", b"/health"),
    (b"GET", b"/docs"),
])
def test_everything_else_is_refused(method, target):
    assert not allowed(method, target)


def test_forwarded_headers_keep_the_signature_and_drop_hop_by_hop_ones():
    headers = [(b"host", b"fed1:9093"), *SIGNED, (b"connection", b"keep-alive, upgrade"), (b"upgrade", b"h2c"),
               (b"transfer-encoding", b"chunked"), (b"keep-alive", b"timeout=5"), (b"content-length", b"99"),
               (b"content-type", b"application/protobuf")]
    out = forward_headers(headers, 12)
    assert out == [(b"host", b"fed1:9093"), *SIGNED, (b"content-type", b"application/protobuf"),
                   (b"content-length", b"12"), (b"connection", b"close")]


async def echo_upstream(nursery: trio.Nursery, tls: dict, received: list[HttpRequest]) -> ListenAddr:
    """A TLS HTTP server on loopback answering with JSON of what it received."""

    async def handler(req: HttpRequest) -> HttpResponse:
        received.append(req)
        body = json.dumps({"target": req.target.decode(), "body": req.body.decode(),
                           "headers": [[k.decode(), v.decode()] for k, v in req.headers]}).encode()
        return HttpResponse(200, [(b"content-type", b"application/json"), (b"x-upstream", b"yes"),
                                  (b"connection", b"keep-alive")], body)

    listeners = await open_listeners(ListenAddr("127.0.0.1", 0))
    addr = bound_address(listeners[0])
    ssl_listeners = [trio.SSLListener(lst, server_context(str(tls["cert"]), str(tls["key"])), https_compatible=True)
                     for lst in listeners]
    nursery.start_soon(trio.serve_listeners, HttpConnectionHandler(handler, max_request_bytes=1 << 20), ssl_listeners)
    return addr


class Counts:
    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self.refused = 0
        self.upstream_errors = 0

    def proxy(self, upstream: ListenAddr, tls: dict, timeout: float = 10.0) -> FleetProxy:
        def refused() -> None:
            self.refused += 1

        def upstream_error() -> None:
            self.upstream_errors += 1

        return FleetProxy(upstream, upstream_tls=client_context(str(tls["ca"])), on_forwarded=self.forwarded.append,
                          on_refused=refused, on_upstream_error=upstream_error, upstream_timeout=timeout)


async def post(addr: ListenAddr, path: str, ca, body: bytes = b"", headers=()) -> httpx.Response:
    def go() -> httpx.Response:
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(verify=ctx, timeout=30) as client:
            return client.post(f"https://{addr.host}:{addr.port}{path}", content=body,
                               headers=[(k.decode(), v.decode()) for k, v in headers])

    return await trio.to_thread.run_sync(go)


async def test_fleet_requests_reach_the_superlink_signed_and_control_requests_do_not(tmp_path):
    tls = make_tls(tmp_path / "pki")
    received: list[HttpRequest] = []
    counts = Counts()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery, tls, received)
            proxy = counts.proxy(upstream, tls)
            public = await nursery.start(proxy.serve, ListenAddr("127.0.0.1", 0),
                                         server_context(str(tls["cert"]), str(tls["key"])))

            r = await post(public, "/v1/fleet/pull-messages", tls["ca"], b"\x08\x01protobuf", SIGNED)
            assert r.status_code == 200 and r.headers["x-upstream"] == "yes"
            echo = r.json()
            assert echo["target"] == "/v1/fleet/pull-messages" and echo["body"] == "\x08\x01protobuf"
            for name, value in SIGNED:  # the SuperNode's signature arrives as it was signed
                assert [name.decode(), value.decode()] in echo["headers"]
            assert ["host", f"{public.host}:{public.port}"] in echo["headers"]
            assert counts.forwarded == ["/v1/fleet/pull-messages"]

            for path in ("/v1/control/start-run", "/v1/fleet/../control/start-run", "/v1/runtime/pull-task-input"):
                r = await post(public, path, tls["ca"], b"payload")
                assert r.status_code == 403 and b"Fleet API" in r.content
            assert counts.refused == 3
            assert len(received) == 1  # nothing refused reached the SuperLink
            nursery.cancel_scope.cancel()


async def test_a_superlink_that_is_down_gives_502_and_is_counted(tmp_path):
    tls = make_tls(tmp_path / "pki")
    counts = Counts()
    listeners = await open_listeners(ListenAddr("127.0.0.1", 0))
    dead = bound_address(listeners[0])
    await listeners[0].aclose()  # a port nothing listens on
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            public = await nursery.start(counts.proxy(dead, tls).serve, ListenAddr("127.0.0.1", 0),
                                         server_context(str(tls["cert"]), str(tls["key"])))
            r = await post(public, "/v1/fleet/pull-messages", tls["ca"])
            assert r.status_code == 502
            assert counts.upstream_errors == 1 and counts.forwarded == []
            # The proxy goes on serving.
            r = await post(public, "/v1/control/list-runs", tls["ca"])
            assert r.status_code == 403
            nursery.cancel_scope.cancel()


async def test_a_superlink_with_a_certificate_the_ca_did_not_sign_gives_502(tmp_path):
    tls, other = make_tls(tmp_path / "pki"), make_tls(tmp_path / "other")
    counts = Counts()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            upstream = await echo_upstream(nursery, other, [])  # signed by another CA
            public = await nursery.start(counts.proxy(upstream, tls).serve, ListenAddr("127.0.0.1", 0),
                                         server_context(str(tls["cert"]), str(tls["key"])))
            r = await post(public, "/v1/fleet/get-run", tls["ca"])
            assert r.status_code == 502 and counts.upstream_errors == 1
            nursery.cancel_scope.cancel()


def test_the_certificate_must_name_loopback(tmp_path):
    check_names_loopback(str(make_tls(tmp_path / "ok")["cert"]))
    with pytest.raises(RuntimeError, match="must name 127.0.0.1"):
        check_names_loopback(str(make_tls(tmp_path / "bad", ip="10.0.0.5")["cert"]))
    with pytest.raises(RuntimeError, match="cannot read"):
        check_names_loopback(str(tmp_path / "missing.pem"))
