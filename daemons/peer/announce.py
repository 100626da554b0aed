"""Announce and scrape against a tracker over HTTP or UDP, on trio.

The peer daemon's announce client: it uses this to find peers. Tests, the
demo and the benchmark use it too, to talk to the shoal tracker through its
real sockets. URLs are ``http://host:port/path`` (BEP 3) or
``udp://host:port/path`` (BEP 15, the path travels as BEP 41 URL data, which
is how a passkey reaches a UDP tracker).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from shoal.protocol import udp_tracker as udp
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.tracker import (
    Announce,
    AnnounceResponse,
    Failure,
    Scrape,
    ScrapeStats,
    decode_announce_response,
    decode_scrape_response,
    encode_announce_query,
    encode_scrape_query,
)

# A tracker reply with 200 compact peers is ~1.3 KiB; dict-form replies and
# scrapes of many torrents are larger. Anything past this is not a tracker.
MAX_RESPONSE_BYTES = 1 << 20


# Why a tracker exchange failed: the ``reason`` of every TrackerError, and the
# label set of the peer daemon's tracker error counter (bounded, all exported at 0).
TRACKER_ERROR_REASONS = (
    "connection_refused",  # nothing listens there (TCP RST to our SYN, or ICMP port unreachable for UDP)
    "reset",  # the connection was reset or broken after it was made
    "eof",  # the tracker closed the connection before a whole response
    "timeout",  # no whole answer in time (HTTP), no answer after the retries (UDP)
    "bad_response",  # not HTTP, not bencode, not a tracker reply, too large
    "http_status",  # HTTP status other than 200
    "error_reply",  # a BEP 15 error reply to connect
    "network",  # any other socket error: name resolution, no route, ...
)


class TrackerError(Exception):
    """The tracker could not be reached or answered with something unusable.

    The one exception the announce client raises for a failed exchange,
    whatever went wrong on the network; ``reason`` is one of
    :data:`TRACKER_ERROR_REASONS`.
    """

    def __init__(self, message: str, reason: str = "bad_response") -> None:
        super().__init__(message)
        assert reason in TRACKER_ERROR_REASONS, reason
        self.reason = reason


def _transport_reason(exc: BaseException) -> str:
    """The TrackerError reason for a transport exception."""
    cause = exc.__cause__
    if type(exc) is OSError and isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        # trio.open_tcp_stream: "all attempts to connect failed", one error per address tried.
        if all(isinstance(e, ConnectionRefusedError) for e in cause.exceptions):
            return "connection_refused"
        return _transport_reason(cause.exceptions[0])
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)):
        return "reset"
    if isinstance(exc, h11.ProtocolError):
        return "bad_response"
    return "network"


# Every way a TCP exchange with a tracker can fail below the tracker protocol.
# (ConnectionError and socket.gaierror are OSErrors; trio raises BrokenResourceError
# for a reset once the stream exists and OSError while connecting.)
TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                    h11.ProtocolError)


@dataclass(frozen=True)
class TrackerUrl:
    scheme: str  # "http" | "udp"
    host: str
    port: int
    path: str  # "/announce", "/<passkey>/announce", ...

    @classmethod
    def parse(cls, url: str) -> TrackerUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "udp") or not parts.hostname or not parts.port:
            raise ValueError(f"expected http://host:port/path or udp://host:port/path, got {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port, parts.path or "/announce")

    def scrape_path(self) -> str:
        """BEP 48: replace "announce" in the last path segment with "scrape"."""
        head, _, last = self.path.rpartition("/")
        if not last.startswith("announce"):
            raise ValueError(f"{self.path!r} has no scrape URL (BEP 48)")
        return f"{head}/scrape{last[len('announce'):]}"


async def http_get(host: str, port: int, target: bytes, *, timeout: float = 10.0,
                   local_address: str | None = None) -> tuple[int, bytes]:
    """One HTTP/1.1 GET on a fresh connection; returns (status, body).

    ``local_address`` picks the source address, so a tracker records the
    address a peer listens on when a host has several. Every failure, on
    the network or in the HTTP framing, is a :class:`TrackerError`.
    """
    where = f"{host}:{port}"
    eof = False
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port, local_address=local_address)
            async with stream:
                conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_BYTES)
                request = h11.Request(method="GET", target=target,
                                      headers=[("Host", where), ("Connection", "close")])
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                status, body = 0, bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        eof = not data
                        conn.receive_data(data)
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_RESPONSE_BYTES:
                            raise TrackerError(f"{where}: tracker response too large")
                    elif isinstance(event, h11.ConnectionClosed):
                        raise TrackerError(f"{where}: closed before a response", "eof")
                    elif isinstance(event, h11.EndOfMessage):
                        return status, bytes(body)
    except TRANSPORT_ERRORS as exc:
        reason = "eof" if eof and isinstance(exc, h11.ProtocolError) else _transport_reason(exc)
        raise TrackerError(f"{where}: {exc or type(exc).__name__}", reason) from None


class HttpTracker:
    def __init__(self, url: TrackerUrl, *, timeout: float = 10.0, local_address: str | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.local_address = local_address

    def close(self) -> None:
        """Nothing to release: each request uses its own connection."""

    async def _get(self, path: str, query: bytes) -> bytes:
        status, body = await http_get(self.url.host, self.url.port, path.encode() + b"?" + query,
                                      timeout=self.timeout, local_address=self.local_address)
        if status != 200:
            raise TrackerError(f"tracker answered HTTP {status}", "http_status")
        return body

    async def announce(self, a: Announce) -> AnnounceResponse | Failure:
        body = await self._get(self.url.path, encode_announce_query(a))
        try:
            return decode_announce_response(body)
        except RemoteProtocolError as exc:
            raise TrackerError(f"bad announce response: {exc}") from None

    async def scrape(self, info_hashes: tuple[bytes, ...]) -> dict[bytes, ScrapeStats] | Failure:
        body = await self._get(self.url.scrape_path(), encode_scrape_query(Scrape(info_hashes)))
        try:
            return decode_scrape_response(body)
        except RemoteProtocolError as exc:
            raise TrackerError(f"bad scrape response: {exc}") from None


class UdpTracker:
    """A BEP 15 client: connect, then announce or scrape, retrying on silence.

    BEP 15 waits 15·2^n seconds for the n-th retry; ``base_timeout`` scales
    that down for a LAN or a test. The connection id is reused for a minute.
    """

    CONNECTION_ID_LIFETIME = 60.0

    def __init__(self, url: TrackerUrl, *, base_timeout: float = 15.0, retries: int = 3,
                 local_address: str | None = None) -> None:
        self.url = url
        self.base_timeout = base_timeout
        self.retries = retries
        self.local_address = local_address
        self._cid: tuple[int, float] | None = None
        self._sock: trio.socket.SocketType | None = None

    async def _socket(self) -> trio.socket.SocketType:
        if self._sock is None:
            infos = await trio.socket.getaddrinfo(self.url.host, self.url.port, type=socket.SOCK_DGRAM)
            family, _type, _proto, _name, addr = infos[0]
            self._sock = trio.socket.socket(family, socket.SOCK_DGRAM)
            if self.local_address:
                await self._sock.bind((self.local_address, 0))
            await self._sock.connect(addr)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _exchange(self, make: Callable[[int], udp.Request]) -> udp.Response:
        """One request answered, retried on silence; every socket error is a TrackerError."""
        try:
            return await self._exchange_once(make)
        except TRANSPORT_ERRORS as exc:
            self.close()  # a fresh socket next time
            raise TrackerError(f"{self.url.host}:{self.url.port}: {exc or type(exc).__name__}",
                               _transport_reason(exc)) from None

    async def _exchange_once(self, make: Callable[[int], udp.Request]) -> udp.Response:
        sock = await self._socket()
        ipv6 = sock.family == socket.AF_INET6
        for attempt in range(self.retries + 1):
            tid = struct.unpack(">I", os.urandom(4))[0]
            await sock.send(udp.encode_request(make(tid)))
            with trio.move_on_after(self.base_timeout * 2**attempt):
                while True:
                    try:
                        data = await sock.recv(65536)
                    except ConnectionRefusedError:
                        raise TrackerError(f"{self.url.host}:{self.url.port}: connection refused",
                                           "connection_refused") from None
                    try:
                        resp = udp.parse_response(data, ipv6=ipv6)
                    except RemoteProtocolError:
                        continue  # not for us, or garbage: keep waiting
                    if resp.transaction_id == tid:
                        return resp
        raise TrackerError(f"{self.url.host}:{self.url.port}: no answer after {self.retries + 1} tries", "timeout")

    async def _connection_id(self) -> int:
        now = trio.current_time()
        if self._cid is None or now - self._cid[1] > self.CONNECTION_ID_LIFETIME:
            resp = await self._exchange(udp.ConnectRequest)
            if isinstance(resp, udp.ErrorResponse):
                raise TrackerError(f"tracker error: {resp.message}", "error_reply")
            if not isinstance(resp, udp.ConnectResponse):
                raise TrackerError("unexpected reply to connect")
            self._cid = (resp.connection_id, now)
        return self._cid[0]

    async def announce(self, a: Announce) -> udp.AnnounceResponse | Failure:
        cid = await self._connection_id()
        url_data = self.url.path.encode()
        resp = await self._exchange(lambda tid: udp.AnnounceRequest(cid, tid, a, url_data=url_data))
        if isinstance(resp, udp.ErrorResponse):
            self._cid = None
            return Failure(resp.message)
        if not isinstance(resp, udp.AnnounceResponse):
            raise TrackerError("unexpected reply to announce")
        return resp

    async def scrape(self, info_hashes: tuple[bytes, ...]) -> dict[bytes, ScrapeStats] | Failure:
        cid = await self._connection_id()
        resp = await self._exchange(lambda tid: udp.ScrapeRequest(cid, tid, info_hashes))
        if isinstance(resp, udp.ErrorResponse):
            self._cid = None
            return Failure(resp.message)
        if not isinstance(resp, udp.ScrapeResponse):
            raise TrackerError("unexpected reply to scrape")
        # A tracker may answer for fewer hashes than asked (it caps a scrape's size): those it left out are absent.
        return dict(zip(info_hashes, resp.stats, strict=False))


def open_tracker(url: str, *, local_address: str | None = None, timeout: float = 10.0) -> HttpTracker | UdpTracker:
    """A client for ``url``; ``timeout`` bounds an HTTP request, or one UDP try (BEP 15 retries twice)."""
    parsed = TrackerUrl.parse(url)
    if parsed.scheme == "http":
        return HttpTracker(parsed, timeout=timeout, local_address=local_address)
    return UdpTracker(parsed, base_timeout=timeout, retries=2, local_address=local_address)
