"""UDP tracker protocol (BEP 15, with BEP 41 URL data): datagram codecs.

Theory of operation
-------------------

Every message is one UDP datagram, so there is no stream to reassemble: the
datagram's length *is* the framing, and a parser either accepts a whole
datagram or rejects it. All integers are big-endian. A client first trades a
connect request for a 64-bit ``connection_id`` and then sends announces and
scrapes carrying it; choosing, remembering and expiring connection ids is the
tracker's business (it needs a clock), not this module's.

Requests (client to tracker; :func:`parse_request` / :func:`encode_request`)::

    connect   u64 protocol_id=0x41727101980  u32 action=0  u32 transaction_id  (16 bytes)
    announce  u64 connection_id  u32 action=1  u32 transaction_id
              20s info_hash  20s peer_id  i64 downloaded  i64 left  i64 uploaded
              u32 event  u32 ip  u32 key  i32 num_want  u16 port          (98 bytes)
              then BEP 41 options (see below)
    scrape    u64 connection_id  u32 action=2  u32 transaction_id  20s info_hash * n

Responses (tracker to client; :func:`encode_response` / :func:`parse_response`)::

    connect   u32 action=0  u32 transaction_id  u64 connection_id          (16 bytes)
    announce  u32 action=1  u32 transaction_id  i32 interval  i32 leechers  i32 seeders
              then n peers: 4-byte IPv4 + u16 port, or 16-byte IPv6 + u16 port
    scrape    u32 action=2  u32 transaction_id  then per hash, in request order:
              i32 seeders  i32 completed  i32 leechers
    error     u32 action=3  u32 transaction_id  UTF-8 message (rest of datagram)

The peer entry size depends on the address family of the *socket*: BEP 15
says a tracker answering over IPv6 sends 18-byte entries. So both
:func:`encode_response` and :func:`parse_response` take ``ipv6``; peers of the
other family are simply left out when encoding.

The announce body maps onto :class:`shoal.protocol.tracker.Announce`, shared
with HTTP: ``num_want`` -1 is ``numwant=None``; ``ip`` 0 is ``ip=None``
(the field is IPv4-only, BEP 15); ``key`` is stored as its 4 raw bytes.
Because the UDP format is binary, ``compact``/``no_peer_id`` do not exist on the
wire (decoded announces have the defaults) and a ``trackerid`` cannot be sent.

BEP 41 options follow byte 98 of an announce: ``0`` EndOfOptions (stop), ``1``
NOP (one byte), ``2`` URLData (length byte, then that many bytes of the URL's
path and query, concatenated over all URLData options: this is how a passkey
path such as ``/abc/announce`` reaches a UDP tracker). Any other type is
skipped using its length byte, as BEP 41 lays out every option after NOP as
type + length + data. An option whose length byte or data runs past the end
of the datagram is ``bad_option``.

Strictness choices: a datagram must have exactly the length its type implies
(connect 16; scrape 16 + 20n with 1 <= n <= :data:`MAX_SCRAPE_HASHES`;
announce response 20 + 6n or 20 + 18n; scrape response 8 + 12n); short is
``truncated``, otherwise ``bad_length``. Counters are signed on the wire and a
negative one is ``bad_number``; the only negative ``num_want`` accepted is -1.
Because datagrams are self-delimiting, a *prefix* of a valid datagram can be a
valid, different datagram (a scrape with fewer hashes, an announce with fewer
options, an error with a shorter message); UDP never delivers such a prefix.

For any ``bytes`` input the parsers return a value or raise
:class:`RemoteProtocolError` with a ``reason`` in :data:`REASONS`. The hot
path (``parse_request`` of an announce, ``encode_response`` of an announce
response) is one precompiled ``struct`` call plus dataclass validation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError
from shoal.protocol.tracker import Announce, Event, Peer, ScrapeStats

__all__ = [
    "REASONS",
    "PROTOCOL_ID",
    "CONNECT",
    "ANNOUNCE",
    "SCRAPE",
    "ERROR",
    "MAX_SCRAPE_HASHES",
    "MAX_REQUEST_SIZE",
    "MAX_URL_DATA",
    "ConnectRequest",
    "ConnectResponse",
    "AnnounceRequest",
    "AnnounceResponse",
    "ScrapeRequest",
    "ScrapeResponse",
    "ErrorResponse",
    "Request",
    "Response",
    "parse_request",
    "encode_request",
    "parse_response",
    "encode_response",
]

#: Every ``reason`` a parser in this module can raise.
REASONS = (
    "truncated",  # datagram shorter than its type's fixed part
    "too_long",  # request datagram or URL data over its bound
    "bad_length",  # datagram length does not fit its type's layout
    "bad_action",  # unknown action
    "bad_protocol_id",  # connect request without the magic constant
    "too_many_hashes",  # scrape of more than MAX_SCRAPE_HASHES
    "bad_number",  # negative counter, or num_want < -1
    "bad_event",  # event not 0..3
    "bad_option",  # BEP 41 option overruns the datagram
)

#: Magic constant of a connect request (BEP 15).
PROTOCOL_ID = 0x41727101980

CONNECT = 0
ANNOUNCE = 1
SCRAPE = 2
ERROR = 3

# 74: BEP 15 says "up to about 74 torrents can be scraped at once": 16 + 74*20
# = 1496 bytes, about the largest request that fits an Ethernet frame (1500 bytes
# MTU) and so never needs IP fragmentation.
MAX_SCRAPE_HASHES = 74

# 2048 bytes: the largest valid scrape is 1496 bytes and a real announce is 98
# bytes plus a URL path of at most a few hundred; anything bigger is not a
# tracker request, and refusing it early bounds the work per datagram.
MAX_REQUEST_SIZE = 2048

# 1024 bytes: URL path + query of a UDP tracker URL (a passkey path is ~40
# bytes); BEP 41 sends it in chunks of at most 255.
MAX_URL_DATA = 1024

# 1024 bytes of UTF-8: an error message must fit in one unfragmented datagram.
MAX_ERROR_MESSAGE = 1024

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I32_MAX = 2**31 - 1
_I64_MAX = 2**63 - 1

_HEADER_REQ = struct.Struct("!QII")  # connection_id / protocol_id, action, transaction_id
_ANNOUNCE_REQ = struct.Struct("!QII20s20sqqqIIIiH")
_HEADER_RESP = struct.Struct("!II")  # action, transaction_id
_CONNECT_RESP = struct.Struct("!IIQ")
_ANNOUNCE_RESP = struct.Struct("!IIiii")
_SCRAPE_ENTRY = struct.Struct("!iii")
_IPV4 = struct.Struct("!I")

assert _ANNOUNCE_REQ.size == 98 and _ANNOUNCE_RESP.size == 20


def _check(name: str, value: object, lo: int, hi: int, reason: str = "bad_number") -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise LocalProtocolError(f"{name} must be an int in {lo}..{hi}", reason=reason)


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    transaction_id: int

    def __post_init__(self) -> None:
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    transaction_id: int
    connection_id: int

    def __post_init__(self) -> None:
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        _check("connection_id", self.connection_id, 0, _U64_MAX)


@dataclass(frozen=True, slots=True)
class AnnounceRequest:
    connection_id: int
    transaction_id: int
    announce: Announce
    url_data: bytes = b""  # BEP 41 URLData, concatenated

    def __post_init__(self) -> None:
        _check("connection_id", self.connection_id, 0, _U64_MAX)
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        if type(self.announce) is not Announce:
            raise LocalProtocolError("announce must be an Announce", reason="bad_type")
        if type(self.url_data) is not bytes or len(self.url_data) > MAX_URL_DATA:
            raise LocalProtocolError(
                f"url_data must be bytes of at most {MAX_URL_DATA}", reason="too_long"
            )


@dataclass(frozen=True, slots=True)
class AnnounceResponse:
    transaction_id: int
    interval: int
    leechers: int
    seeders: int
    peers: tuple[Peer, ...]

    def __post_init__(self) -> None:
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        _check("interval", self.interval, 0, _I32_MAX)
        _check("leechers", self.leechers, 0, _I32_MAX)
        _check("seeders", self.seeders, 0, _I32_MAX)
        if type(self.peers) is not tuple:
            raise LocalProtocolError("peers must be a tuple", reason="bad_type")
        for p in self.peers:
            if type(p) is not Peer:
                raise LocalProtocolError("peers must hold Peer values", reason="bad_type")


@dataclass(frozen=True, slots=True)
class ScrapeRequest:
    connection_id: int
    transaction_id: int
    info_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check("connection_id", self.connection_id, 0, _U64_MAX)
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        if type(self.info_hashes) is not tuple or not (
            1 <= len(self.info_hashes) <= MAX_SCRAPE_HASHES
        ):
            raise LocalProtocolError(
                f"info_hashes must be a tuple of 1..{MAX_SCRAPE_HASHES}",
                reason="too_many_hashes",
            )
        for h in self.info_hashes:
            if type(h) is not bytes or len(h) != 20:
                raise LocalProtocolError("info hash must be 20 bytes", reason="bad_info_hash")


@dataclass(frozen=True, slots=True)
class ScrapeResponse:
    transaction_id: int
    stats: tuple[ScrapeStats, ...]  # in request order

    def __post_init__(self) -> None:
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        if type(self.stats) is not tuple:
            raise LocalProtocolError("stats must be a tuple", reason="bad_type")
        for s in self.stats:
            if type(s) is not ScrapeStats:
                raise LocalProtocolError("stats must hold ScrapeStats", reason="bad_type")


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    transaction_id: int
    message: str

    def __post_init__(self) -> None:
        _check("transaction_id", self.transaction_id, 0, _U32_MAX)
        if type(self.message) is not str:
            raise LocalProtocolError("message must be str", reason="bad_type")


Request = ConnectRequest | AnnounceRequest | ScrapeRequest
Response = ConnectResponse | AnnounceResponse | ScrapeResponse | ErrorResponse


# ---------------------------------------------------------------------------
# Tracker side
# ---------------------------------------------------------------------------


def parse_request(datagram: bytes) -> Request:
    """Parse one request datagram received by the tracker."""
    n = len(datagram)
    if n < 16:
        raise RemoteProtocolError("datagram shorter than 16 bytes", reason="truncated")
    if n > MAX_REQUEST_SIZE:
        raise RemoteProtocolError(f"datagram of {n} bytes", reason="too_long")
    first, action, tid = _HEADER_REQ.unpack_from(datagram)
    if action == ANNOUNCE:
        return _parse_announce(datagram, n, first, tid)
    if action == CONNECT:
        if first != PROTOCOL_ID:
            raise RemoteProtocolError("wrong protocol id", reason="bad_protocol_id")
        if n != 16:
            raise RemoteProtocolError("connect request must be 16 bytes", reason="bad_length")
        return ConnectRequest(tid)
    if action == SCRAPE:
        count, rest = divmod(n - 16, 20)
        if rest or count == 0:
            raise RemoteProtocolError(
                "scrape request must be 16 + 20*n bytes, n >= 1", reason="bad_length"
            )
        if count > MAX_SCRAPE_HASHES:
            raise RemoteProtocolError(
                f"more than {MAX_SCRAPE_HASHES} info hashes", reason="too_many_hashes"
            )
        hashes = tuple([bytes(datagram[i : i + 20]) for i in range(16, n, 20)])
        return ScrapeRequest(first, tid, hashes)
    raise RemoteProtocolError(f"unknown action {action}", reason="bad_action")


def _parse_announce(datagram: bytes, n: int, cid: int, tid: int) -> AnnounceRequest:
    if n < 98:
        raise RemoteProtocolError("announce shorter than 98 bytes", reason="truncated")
    (
        _, _, _, info_hash, peer_id, downloaded, left, uploaded,
        event, ip, key, num_want, port,
    ) = _ANNOUNCE_REQ.unpack_from(datagram)
    if downloaded < 0 or left < 0 or uploaded < 0:
        raise RemoteProtocolError("negative byte counter", reason="bad_number")
    if event > 3:
        raise RemoteProtocolError(f"unknown event {event}", reason="bad_event")
    if num_want < 0:
        if num_want != -1:
            raise RemoteProtocolError("num_want below -1", reason="bad_number")
        num_want = None
    url_data = _parse_options(datagram, n) if n > 98 else b""
    # Every field was range-checked above or is fixed-width on the wire, so
    # constructing the values cannot raise LocalProtocolError.
    announce = Announce(
        info_hash, peer_id, port, uploaded, downloaded, left,
        _UDP_EVENTS[event], num_want, True, False, _KEYS(key),
        None if ip == 0 else _ipv4_text(ip), None,
    )
    return AnnounceRequest(cid, tid, announce, url_data)


_UDP_EVENTS = (Event.NONE, Event.COMPLETED, Event.STARTED, Event.STOPPED)


def _KEYS(key: int) -> bytes:
    return key.to_bytes(4, "big")


def _ipv4_text(ip: int) -> str:
    return f"{ip >> 24}.{(ip >> 16) & 255}.{(ip >> 8) & 255}.{ip & 255}"


def _parse_options(d: bytes, n: int) -> bytes:
    url = []
    i = 98
    while i < n:
        t = d[i]
        if t == 0:  # EndOfOptions: whatever follows is not options
            break
        if t == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            raise RemoteProtocolError("option without its length byte", reason="bad_option")
        j = i + 2 + d[i + 1]
        if j > n:
            raise RemoteProtocolError("option data overruns the datagram", reason="bad_option")
        if t == 2:  # URLData
            url.append(d[i + 2 : j])
        i = j
    data = b"".join(url)
    if len(data) > MAX_URL_DATA:
        raise RemoteProtocolError("URL data too long", reason="too_long")
    return bytes(data)


def encode_response(resp: Response, *, ipv6: bool = False) -> bytes:
    """Encode a response datagram; ``ipv6`` selects 18-byte peer entries."""
    t = type(resp)
    if isinstance(resp, AnnounceResponse):
        size = 18 if ipv6 else 6
        return _ANNOUNCE_RESP.pack(
            ANNOUNCE, resp.transaction_id, resp.interval, resp.leechers, resp.seeders
        ) + b"".join([p.compact for p in resp.peers if len(p.compact) == size])
    if isinstance(resp, ConnectResponse):
        return _CONNECT_RESP.pack(CONNECT, resp.transaction_id, resp.connection_id)
    if isinstance(resp, ScrapeResponse):
        out = [_HEADER_RESP.pack(SCRAPE, resp.transaction_id)]
        pack = _SCRAPE_ENTRY.pack
        for s in resp.stats:
            if s.complete > _I32_MAX or s.downloaded > _I32_MAX or s.incomplete > _I32_MAX:
                raise LocalProtocolError("scrape counter exceeds int32", reason="bad_number")
            out.append(pack(s.complete, s.downloaded, s.incomplete))
        return b"".join(out)
    if isinstance(resp, ErrorResponse):
        msg = _utf8(resp.message)
        if len(msg) > MAX_ERROR_MESSAGE:
            raise LocalProtocolError("error message too long", reason="too_long")
        return _HEADER_RESP.pack(ERROR, resp.transaction_id) + msg
    raise LocalProtocolError(f"not a UDP tracker response: {t.__name__}", reason="bad_type")


def _utf8(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("text is not valid Unicode", reason="bad_text") from None


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


def encode_request(req: Request) -> bytes:
    """Encode a request datagram (client side)."""
    t = type(req)
    if isinstance(req, ConnectRequest):
        return _HEADER_REQ.pack(PROTOCOL_ID, CONNECT, req.transaction_id)
    if isinstance(req, AnnounceRequest):
        a = req.announce
        if a.trackerid is not None:
            raise LocalProtocolError("UDP announces cannot carry a trackerid", reason="bad_type")
        if a.key is None:
            key = 0
        elif len(a.key) == 4:
            key = int.from_bytes(a.key, "big")
        else:
            raise LocalProtocolError("UDP key must be 4 bytes", reason="bad_key")
        if a.ip is None:
            ip = 0
        elif ":" in a.ip:
            raise LocalProtocolError("UDP ip field is IPv4 only", reason="bad_ip")
        else:
            ip = _IPV4.unpack(bytes(int(x) for x in a.ip.split(".")))[0]
        head = _ANNOUNCE_REQ.pack(
            req.connection_id, ANNOUNCE, req.transaction_id, a.info_hash, a.peer_id,
            a.downloaded, a.left, a.uploaded, a.event.udp, ip, key,
            -1 if a.numwant is None else a.numwant, a.port,
        )
        if not req.url_data:
            return head
        out = [head]
        u = req.url_data
        for i in range(0, len(u), 255):
            chunk = u[i : i + 255]
            out.append(bytes((2, len(chunk))))
            out.append(chunk)
        return b"".join(out)
    if isinstance(req, ScrapeRequest):
        return _HEADER_REQ.pack(req.connection_id, SCRAPE, req.transaction_id) + b"".join(
            req.info_hashes
        )
    raise LocalProtocolError(f"not a UDP tracker request: {t.__name__}", reason="bad_type")


def parse_response(datagram: bytes, *, ipv6: bool = False) -> Response:
    """Parse a response datagram (client side); ``ipv6`` as the socket's family."""
    n = len(datagram)
    if n < 8:
        raise RemoteProtocolError("datagram shorter than 8 bytes", reason="truncated")
    action, tid = _HEADER_RESP.unpack_from(datagram)
    if action == CONNECT:
        if n < 16:
            raise RemoteProtocolError("connect response shorter than 16", reason="truncated")
        if n != 16:
            raise RemoteProtocolError("connect response must be 16 bytes", reason="bad_length")
        return ConnectResponse(tid, _CONNECT_RESP.unpack_from(datagram)[2])
    if action == ANNOUNCE:
        if n < 20:
            raise RemoteProtocolError("announce response shorter than 20", reason="truncated")
        size = 18 if ipv6 else 6
        if (n - 20) % size:
            raise RemoteProtocolError(
                f"peer list not a multiple of {size} bytes", reason="bad_length"
            )
        _, _, interval, leechers, seeders = _ANNOUNCE_RESP.unpack_from(datagram)
        if interval < 0 or leechers < 0 or seeders < 0:
            raise RemoteProtocolError("negative interval or count", reason="bad_number")
        data = bytes(datagram)
        peers = tuple([Peer.from_compact(data[i : i + size]) for i in range(20, n, size)])
        return AnnounceResponse(tid, interval, leechers, seeders, peers)
    if action == SCRAPE:
        if (n - 8) % 12:
            raise RemoteProtocolError("scrape response must be 8 + 12*n", reason="bad_length")
        stats = []
        for i in range(8, n, 12):
            seeders, completed, leechers = _SCRAPE_ENTRY.unpack_from(datagram, i)
            if seeders < 0 or completed < 0 or leechers < 0:
                raise RemoteProtocolError("negative scrape counter", reason="bad_number")
            stats.append(ScrapeStats(seeders, completed, leechers))
        return ScrapeResponse(tid, tuple(stats))
    if action == ERROR:
        return ErrorResponse(tid, bytes(datagram[8:]).decode("utf-8", "replace"))
    raise RemoteProtocolError(f"unknown action {action}", reason="bad_action")
