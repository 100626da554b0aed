"""The Fleet-only TLS reverse proxy in front of Flower's SuperLink.

Why
---
Flower 1.41's SuperLink (FastAPI on uvicorn, HTTP/1.1) serves three APIs on
one port: the Fleet API the SuperNodes use (``/v1/fleet/...``), the Control
API (``/v1/control/...``: submit runs, register nodes; *no* authentication in
the open-source edition) and the Runtime API (``/v1/runtime/...``, used by
the ServerApp processes the SuperLink spawns). Whoever reaches the Control API
can submit a run, i.e. code every SuperNode executes.

So when TLS is configured the fedserver runs the SuperLink on
``127.0.0.1:<free port>`` (still with TLS: Flower refuses
``--enable-supernode-auth`` without it, and its SuperExec dials that port) and
serves the configured ``[superlink] listen`` address itself with this proxy:

* it terminates TLS with the SuperLink's own certificate and key, so nodes
  see the same server and trust it through the same CA;
* it forwards a request only if it is ``POST`` to one of :data:`FLEET_PATHS`,
  the exact paths of Flower's SuperNode Fleet client
  (``flwr/supernode/fleet_http_client.py``). The match is on the raw request
  target, byte for byte: no query string, no ``..``, no percent-encoding gets
  anything else through. Everything else (``/v1/control``, ``/v1/runtime``,
  ``/docs``, ``/health``) is answered 403 and counted;
* it forwards the request headers unchanged except the hop-by-hop ones
  (RFC 9110 section 7.6.1), so Flower's SuperNode authentication headers
  (``flwr-public-key``, ``flwr-signature``, ``flwr-timestamp``) reach the
  SuperLink as the node signed them, and the SuperLink does the checking;
* each forwarded request gets its own upstream TLS connection (loopback, a
  millisecond; a SuperNode sends a request every few seconds), read whole
  with bounded sizes and a timeout, then relayed. An upstream failure is
  answered 502 and counted. Flower's Fleet client only makes unary requests
  (no streaming, no long-poll, no HTTP/2, no upgrades), so nothing else is
  needed; ``Upgrade`` is dropped with the other hop-by-hop headers.

Downstream HTTP handling (request bounds, slowloris deadline, connection cap,
400/413/431) is the runtime's :class:`~shoal.daemons.runtime.http.HttpConnectionHandler`,
on TLS streams.

The policy (:func:`allowed`, :func:`forward_headers`) is plain code; the
I/O is :class:`FleetProxy`.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

import h11
import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpConnectionHandler, HttpRequest, HttpResponse, bound_address, open_listeners
from shoal.daemons.runtime.ratelimit import TokenBucket

log = logging.getLogger("shoal.fedserver")

#: Every path Flower 1.41's SuperNode requests (its Fleet client); all ``POST``.
FLEET_PATHS = tuple(f"/v1/fleet/{name}".encode() for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received",
))

#: Hop-by-hop headers (RFC 9110 7.6.1) and the framing ones, which the proxy sets itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"content-length",
})

MAX_BODY_BYTES = 16 << 20  # a request or response body; Flower splits arrays into 5 MB chunks
MAX_HEAD_BYTES = 64 << 10  # an upstream response head
MAX_CONNECTIONS = 1024  # downstream connections at once (each node keeps about one open)
IDLE_TIMEOUT = 30.0  # seconds a node has to send each request (and to take its response)
UPSTREAM_TIMEOUT = 60.0  # seconds the SuperLink has to answer one forwarded request


def allowed(method: bytes, target: bytes) -> bool:
    """Whether a request may pass: ``POST`` to exactly one of :data:`FLEET_PATHS`."""
    return method == b"POST" and target in FLEET_PATHS


def forward_headers(headers: list[tuple[bytes, bytes]], body_length: int) -> list[tuple[bytes, bytes]]:
    """The headers to send on: the same, less hop-by-hop ones, with our own framing."""
    kept = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
    return kept + [(b"content-length", str(body_length).encode()), (b"connection", b"close")]


class UpstreamError(Exception):
    """The SuperLink did not give a usable answer (connection, TLS, HTTP, size or time)."""


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS for the public side: the SuperLink's certificate and key, HTTP/1.1 only."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(cafile: str) -> ssl.SSLContext:
    """TLS to the loopback SuperLink, verified against the configured CA."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class FleetProxy:
    """Serve the public address; forward Fleet requests to ``upstream`` (loopback).

    ``on_forwarded(path)``, ``on_refused()``, ``on_upstream_error()`` and
    ``on_http_error(reason)`` feed the daemon's metrics.
    """

    def __init__(self, upstream: ListenAddr, *, upstream_tls: ssl.SSLContext | None,
                 on_forwarded: Callable[[str], None] = lambda path: None,
                 on_refused: Callable[[], None] = lambda: None,
                 on_upstream_error: Callable[[], None] = lambda: None,
                 on_http_error: Callable[[str], None] | None = None,
                 upstream_timeout: float = UPSTREAM_TIMEOUT) -> None:
        self.upstream = upstream
        self.upstream_tls = upstream_tls
        self.on_forwarded = on_forwarded
        self.on_refused = on_refused
        self.on_upstream_error = on_upstream_error
        self.upstream_timeout = upstream_timeout
        self.connections = HttpConnectionHandler(
            self.handle, max_request_bytes=MAX_BODY_BYTES + MAX_HEAD_BYTES, idle_timeout=IDLE_TIMEOUT,
            max_connections=MAX_CONNECTIONS, on_error=on_http_error)
        self._log_budget = TokenBucket(rate=1.0, burst=10.0, now=time.monotonic())  # refusal log lines

    async def serve(self, listen: ListenAddr, tls: ssl.SSLContext | None, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``listen`` (TLS when ``tls`` is given) until cancelled; started with the bound address."""
        listeners = await open_listeners(listen)
        addr = bound_address(listeners[0])
        if tls is not None:
            listeners = [trio.SSLListener(lst, tls, https_compatible=True) for lst in listeners]
        task_status.started(addr)
        # A failed TLS handshake surfaces as BrokenResourceError at the first read, which
        # the connection handler treats as a vanished peer.
        await trio.serve_listeners(self.connections, listeners)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if not allowed(request.method, request.target):
            self.on_refused()
            if self._log_budget.take(time.monotonic()):
                log.warning("proxy: refused %s %s with 403 (only the Fleet API is served here)",
                            request.method.decode("latin-1")[:16], request.target[:200].decode("latin-1"))
            return HttpResponse(403, [(b"content-type", b"text/plain; charset=utf-8")],
                                b"403 forbidden: only Flower's Fleet API is served on this port\n")
        try:
            with trio.fail_after(self.upstream_timeout):
                response = await self.forward(request)
        except (UpstreamError, trio.TooSlowError, OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            self.on_upstream_error()
            log.error("proxy: %s to the SuperLink on %s failed: %s", request.target.decode("latin-1"),
                      self.upstream, exc or type(exc).__name__)
            return HttpResponse(502, [(b"content-type", b"text/plain; charset=utf-8")],
                                b"502 bad gateway: the SuperLink did not answer\n")
        self.on_forwarded(request.target.decode("ascii"))
        return response

    async def forward(self, request: HttpRequest) -> HttpResponse:
        """Send ``request`` to the SuperLink on a fresh connection and read its whole response."""
        stream: trio.abc.Stream = await trio.open_tcp_stream(self.upstream.host, self.upstream.port)
        try:
            if self.upstream_tls is not None:
                stream = trio.SSLStream(stream, self.upstream_tls, server_hostname=self.upstream.host,
                                        https_compatible=True)
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
            data = conn.send(h11.Request(method=request.method, target=request.target,
                                         headers=forward_headers(request.headers, len(request.body))))
            data += conn.send(h11.Data(data=request.body)) if request.body else b""
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            head: h11.Response | None = None
            chunks: list[bytes] = []
            size = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    received = await stream.receive_some(65536)
                    conn.receive_data(bytes(received))
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_BODY_BYTES:
                        raise UpstreamError(f"response larger than {MAX_BODY_BYTES} bytes")
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed before the end of the response
                    raise UpstreamError("connection closed mid-response")
        finally:
            await trio.aclose_forcefully(stream)
        assert head is not None
        headers = [(k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP]
        return HttpResponse(head.status_code, headers, b"".join(chunks))
