"""HTTP tracker protocol (BEP 3, compact peers BEP 23, IPv6 peers BEP 7, scrape BEP 48).

Theory of operation
-------------------

An HTTP tracker exchange is one request and one response, so there is no
connection state to track here: the HTTP framing is h11's job, and this module
only turns the two payloads into values and back.

* **Announce request** — ``GET /announce?<query>``. :func:`split_target` cuts a
  request-target into ``(path, query)`` (the path matters to a tracker that
  puts a passkey in it, ``/abc/announce``); :func:`parse_announce_query`
  turns the raw query into an :class:`Announce`; :func:`encode_announce_query`
  is the client's inverse.
* **Announce response** — a bencoded dictionary (see :mod:`.bencode`).
  :func:`encode_announce_response` writes it (this is the tracker's hot path,
  so it writes the canonical bytes directly, keys already in sorted order:
  ``complete < incomplete < interval < min interval < peers < peers6 <
  tracker id < warning message``); :func:`decode_announce_response` is the
  client's inverse and returns either an :class:`AnnounceResponse` or a
  :class:`Failure` (``{"failure reason": ...}``).
* **Scrape** (BEP 48) — ``GET /scrape?info_hash=...&info_hash=...`` answered
  by ``{"files": {info_hash: {"complete", "downloaded", "incomplete"}}}``.

Query strings
~~~~~~~~~~~~~

``info_hash`` and ``peer_id`` are 20 raw bytes, percent-encoded. The query is
decoded exactly as RFC 3986 says, not as HTML forms do: ``%XX`` (either hex
case) is one byte and ``+`` is a literal plus sign, *not* a space. (Clients
percent-encode every byte of a hash that is not unreserved, so a ``+`` can
only mean the byte 0x2B; treating it as a space would corrupt hashes.)

Strictness choices, all raising :class:`RemoteProtocolError`:

* the whole query is at most ``max_length`` bytes, every byte must be visible
  ASCII (anything else should have been escaped) and every ``%`` must start a
  well-formed escape, even in parameters we then ignore;
* a *known* parameter may appear once (``duplicate_key``); unknown parameters
  are ignored, duplicated or not, because real clients send many
  (``supportcrypto``, ``corrupt``, ``redundant``, ``requirecrypto``,
  ``ipv4``, ``ipv6``, ...); empty segments (``a=1&&b=2``) are skipped;
* numbers are canonical decimal (``0`` or no leading zero, no sign) and
  bounded: counters by int64, ``numwant`` by int32 (so the same
  :class:`Announce` fits the UDP wire format too), ``port`` by 65535 (0 is
  accepted: some clients send it);
* ``event`` is ``started``, ``completed``, ``stopped``, empty, or ``paused``
  (BEP 21 partial seeds; libtorrent sends it). ``paused`` is read as
  :attr:`Event.NONE`, i.e. a regular announce, which is what BEP 21 expects of
  a tracker that does not implement partial seeds;
* ``ip`` must be an IPv4 or IPv6 literal (BEP 3 also allows a DNS name; we do
  not, a tracker must never resolve names on a peer's behalf).

Responses are decoded strictly as bencode (canonical, sorted keys) with these
tolerances: unknown keys are ignored; ``complete``/``incomplete`` default to 0
when absent (BEP 3 does not require them); ``peers`` may be absent if
``peers6`` is present; the human-readable texts (``failure reason``,
``warning message``) are decoded as UTF-8 with replacement characters, since
they are only ever displayed.

IP addresses are stored as normalised text: the output of :mod:`ipaddress`,
with IPv4-mapped IPv6 addresses (``::ffff:1.2.3.4``, what a dual-stack socket
reports for an IPv4 peer) turned into plain IPv4, so the same peer always has
the same text and goes into ``peers`` rather than ``peers6``.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from shoal.protocol import bencode
from shoal.protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "REASONS",
    "MAX_QUERY_LENGTH",
    "MAX_SCRAPE_HASHES",
    "Event",
    "Announce",
    "Peer",
    "AnnounceResponse",
    "Failure",
    "Scrape",
    "ScrapeStats",
    "split_target",
    "parse_announce_query",
    "encode_announce_query",
    "parse_scrape_query",
    "encode_scrape_query",
    "encode_announce_response",
    "decode_announce_response",
    "encode_failure",
    "encode_scrape_response",
    "decode_scrape_response",
]

#: Every ``reason`` a decoder in this module can raise (includes the bencode ones,
#: which the response decoders pass through unchanged).
REASONS = bencode.REASONS + (
    "bad_escape",  # malformed %XX, or a byte that must have been escaped
    "duplicate_key",  # a known query parameter given twice
    "missing_field",  # a required parameter / response key is absent
    "bad_info_hash",  # info_hash not exactly 20 bytes
    "bad_peer_id",  # peer_id not exactly 20 bytes
    "bad_port",  # port not an integer in 0..65535
    "bad_number",  # a number not canonical, or out of its range
    "bad_event",  # event not one of the known names
    "bad_flag",  # compact / no_peer_id not 0 or 1
    "bad_ip",  # ip not an IPv4/IPv6 literal
    "too_many_hashes",  # scrape asks for more than max_hashes torrents
    "bad_type",  # response value of the wrong bencode type
    "bad_peers",  # compact peer string of bad length, or malformed peer dict
)
REASONS = tuple(dict.fromkeys(REASONS))  # drop duplicates, keep order

# 4096: a real announce query is 250-600 bytes (two 60-byte escaped hashes plus
# a dozen short parameters); 4 KiB leaves room for clients that add many
# unknown parameters, and matches the order of h11's header size limits.
MAX_QUERY_LENGTH = 4096

# 64: BEP 48 leaves the number to the tracker; 64 hashes cost ~4.5 KB of query
# (71 bytes each, fully escaped) and a ~4 KB response, and bound the work one
# GET can demand. Clients scrape one torrent at a time in practice.
MAX_SCRAPE_HASHES = 64

# 8192: room for MAX_SCRAPE_HASHES fully escaped hashes (64 * 71 = 4544
# bytes) plus unknown parameters.
MAX_SCRAPE_QUERY_LENGTH = 8192

# 64 bytes: UDP keys are 4 bytes and HTTP clients send 8 hex digits; 64 is
# generous and bounds what a tracker stores per peer.
MAX_KEY_LENGTH = 64

# 255 bytes: a tracker id is a short opaque token chosen by a tracker; the
# client echoes it in every announce, so it must stay small.
MAX_TRACKER_ID_LENGTH = 255

_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


class Event(enum.Enum):
    """The ``event`` of an announce; the value is the HTTP spelling."""

    NONE = ""
    STARTED = "started"
    COMPLETED = "completed"
    STOPPED = "stopped"

    @property
    def udp(self) -> int:
        """The BEP 15 integer: none=0, completed=1, started=2, stopped=3."""
        return _EVENT_TO_UDP[self]

    @property
    def http(self) -> bytes:
        return _EVENT_TO_HTTP[self]

    @classmethod
    def from_udp(cls, n: int) -> Event:
        """Map a BEP 15 event integer; raises RemoteProtocolError("bad_event")."""
        try:
            return _UDP_TO_EVENT[n]
        except (IndexError, TypeError):
            raise RemoteProtocolError(f"unknown UDP event {n!r}", reason="bad_event") from None

    @classmethod
    def from_http(cls, value: bytes) -> Event:
        """Map an HTTP ``event=`` value; raises RemoteProtocolError("bad_event")."""
        try:
            return _HTTP_TO_EVENT[value]
        except (KeyError, TypeError):
            raise RemoteProtocolError("unknown event", reason="bad_event") from None


_UDP_TO_EVENT = (Event.NONE, Event.COMPLETED, Event.STARTED, Event.STOPPED)
_EVENT_TO_UDP = {e: i for i, e in enumerate(_UDP_TO_EVENT)}
_EVENT_TO_HTTP = {e: e.value.encode("ascii") for e in Event}
_HTTP_TO_EVENT = {v: e for e, v in _EVENT_TO_HTTP.items()}
_HTTP_TO_EVENT[b"paused"] = Event.NONE  # BEP 21, see the module docstring


# A dotted quad already in normal form (no leading zeros, each part <= 255);
# matched first because ipaddress.ip_address costs several microseconds.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(r"%s\.%s\.%s\.%s" % ((_OCTET,) * 4), re.ASCII)


def _normalise_ip(text: object) -> tuple[str, bytes]:
    """Return (normalised text, packed bytes) or raise LocalProtocolError("bad_ip")."""
    if type(text) is not str:
        raise LocalProtocolError("ip must be a str", reason="bad_ip")
    if _CANONICAL_IPV4.fullmatch(text):
        return text, bytes(map(int, text.split(".")))
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise LocalProtocolError(f"not an IP address: {text!r}", reason="bad_ip") from None
    if addr.version == 6:
        if addr.scope_id is not None:  # "fe80::1%eth0" is local to one host
            raise LocalProtocolError("IPv6 scope id not allowed", reason="bad_ip")
        mapped = addr.ipv4_mapped
        if mapped is not None:
            addr = mapped
    return str(addr), addr.packed


def _check_uint(name: str, value: object, maximum: int, reason: str = "bad_number") -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name} must be an int in 0..{maximum}", reason=reason)


def _check_hash(name: str, value: object, reason: str) -> None:
    if type(value) is not bytes or len(value) != 20:
        raise LocalProtocolError(f"{name} must be 20 bytes", reason=reason)


@dataclass(frozen=True, slots=True)
class Announce:
    """One announce, as sent over HTTP (BEP 3) or UDP (BEP 15)."""

    info_hash: bytes
    peer_id: bytes
    port: int
    uploaded: int
    downloaded: int
    left: int
    event: Event = Event.NONE
    numwant: int | None = None  # None: let the tracker choose
    compact: bool = True
    no_peer_id: bool = False
    key: bytes | None = None
    ip: str | None = None
    trackerid: bytes | None = None

    def __post_init__(self) -> None:
        _check_hash("info_hash", self.info_hash, "bad_info_hash")
        _check_hash("peer_id", self.peer_id, "bad_peer_id")
        _check_uint("port", self.port, 65535, "bad_port")
        _check_uint("uploaded", self.uploaded, _INT64_MAX)
        _check_uint("downloaded", self.downloaded, _INT64_MAX)
        _check_uint("left", self.left, _INT64_MAX)
        if type(self.event) is not Event:
            raise LocalProtocolError("event must be an Event", reason="bad_event")
        if self.numwant is not None:
            _check_uint("numwant", self.numwant, _INT32_MAX)
        if type(self.compact) is not bool or type(self.no_peer_id) is not bool:
            raise LocalProtocolError("compact/no_peer_id must be bool", reason="bad_flag")
        if self.key is not None and (
            type(self.key) is not bytes or len(self.key) > MAX_KEY_LENGTH
        ):
            raise LocalProtocolError(
                f"key must be bytes of at most {MAX_KEY_LENGTH}", reason="too_long"
            )
        if self.ip is not None:
            object.__setattr__(self, "ip", _normalise_ip(self.ip)[0])
        if self.trackerid is not None and (
            type(self.trackerid) is not bytes
            or len(self.trackerid) > MAX_TRACKER_ID_LENGTH
        ):
            raise LocalProtocolError(
                f"trackerid must be bytes of at most {MAX_TRACKER_ID_LENGTH}",
                reason="too_long",
            )


@dataclass(frozen=True, slots=True)
class Peer:
    """A peer in a response. ``ip`` is normalised on construction.

    ``compact`` (not part of equality) is the BEP 23 / BEP 7 compact form:
    4-byte IPv4 or 16-byte IPv6 address + 2-byte port, computed once so the
    tracker can reuse a Peer across thousands of responses at no cost.
    """

    ip: str
    port: int
    peer_id: bytes | None = None
    compact: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text, packed = _normalise_ip(self.ip)
        _check_uint("port", self.port, 65535, "bad_port")
        if self.peer_id is not None:
            _check_hash("peer_id", self.peer_id, "bad_peer_id")
        object.__setattr__(self, "ip", text)
        object.__setattr__(self, "compact", packed + self.port.to_bytes(2, "big"))

    @property
    def is_ipv6(self) -> bool:
        return len(self.compact) == 18

    @classmethod
    def from_compact(cls, entry: bytes) -> Peer:
        """Build from a 6-byte (IPv4) or 18-byte (IPv6) compact entry."""
        if len(entry) == 6:
            ip = f"{entry[0]}.{entry[1]}.{entry[2]}.{entry[3]}"
        elif len(entry) == 18:
            ip = str(ipaddress.IPv6Address(entry[:16]))
        else:
            raise LocalProtocolError("compact peer must be 6 or 18 bytes", reason="bad_peers")
        return cls(ip, int.from_bytes(entry[-2:], "big"))


@dataclass(frozen=True, slots=True)
class AnnounceResponse:
    """A successful HTTP announce response."""

    interval: int
    min_interval: int | None
    complete: int
    incomplete: int
    peers: tuple[Peer, ...]
    tracker_id: bytes | None = None
    warning: str | None = None

    def __post_init__(self) -> None:
        # Intervals are seconds: int32 is 68 years and what BEP 15 can carry.
        _check_uint("interval", self.interval, _INT32_MAX)
        if self.min_interval is not None:
            _check_uint("min_interval", self.min_interval, _INT32_MAX)
        _check_uint("complete", self.complete, _INT64_MAX)
        _check_uint("incomplete", self.incomplete, _INT64_MAX)
        if type(self.peers) is not tuple:
            raise LocalProtocolError("peers must be a tuple", reason="bad_peers")
        for p in self.peers:
            if type(p) is not Peer:
                raise LocalProtocolError("peers must hold Peer values", reason="bad_peers")
        if self.tracker_id is not None and (
            type(self.tracker_id) is not bytes
            or len(self.tracker_id) > MAX_TRACKER_ID_LENGTH
        ):
            raise LocalProtocolError("bad tracker_id", reason="too_long")
        if self.warning is not None and type(self.warning) is not str:
            raise LocalProtocolError("warning must be str", reason="bad_type")


@dataclass(frozen=True, slots=True)
class Failure:
    """``{"failure reason": ...}``: the tracker refused the request."""

    reason: str

    def __post_init__(self) -> None:
        if type(self.reason) is not str:
            raise LocalProtocolError("reason must be str", reason="bad_type")


@dataclass(frozen=True, slots=True)
class Scrape:
    """A scrape request; an empty tuple means "every torrent" (may be refused)."""

    info_hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if type(self.info_hashes) is not tuple:
            raise LocalProtocolError("info_hashes must be a tuple", reason="bad_info_hash")
        for h in self.info_hashes:
            _check_hash("info_hash", h, "bad_info_hash")


@dataclass(frozen=True, slots=True)
class ScrapeStats:
    """Per-torrent scrape counters (seeders, completed downloads, leechers)."""

    complete: int
    downloaded: int
    incomplete: int

    def __post_init__(self) -> None:
        _check_uint("complete", self.complete, _INT64_MAX)
        _check_uint("downloaded", self.downloaded, _INT64_MAX)
        _check_uint("incomplete", self.incomplete, _INT64_MAX)


# ---------------------------------------------------------------------------
# Query strings
# ---------------------------------------------------------------------------

# Bytes that may appear unescaped in our queries: visible ASCII. Space,
# controls and bytes >= 0x80 must have been percent-encoded.
_RAW_BAD = re.compile(rb"[^\x21-\x7e]")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_HEX = b"0123456789abcdefABCDEF"
_HEXPAIR = {bytes((a, b)): bytes((int(bytes((a, b)), 16),)) for a in _HEX for b in _HEX}
_CANONICAL_UINT = re.compile(rb"0|[1-9][0-9]{0,18}")

# RFC 3986 unreserved characters are sent as they are; everything else escaped.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_QUOTE = [bytes((c,)) if c in _UNRESERVED else b"%%%02X" % c for c in range(256)]

_ANNOUNCE_KEYS = frozenset(
    (
        b"info_hash",
        b"peer_id",
        b"port",
        b"uploaded",
        b"downloaded",
        b"left",
        b"event",
        b"numwant",
        b"compact",
        b"no_peer_id",
        b"key",
        b"ip",
        b"trackerid",
    )
)
_REQUIRED = (b"info_hash", b"peer_id", b"port", b"uploaded", b"downloaded", b"left")


def _unquote(s: bytes) -> bytes:
    # Escapes were validated for the whole query already.
    if b"%" not in s:
        return s
    parts = s.split(b"%")
    h = _HEXPAIR
    # Most parts are exactly two hex digits (fully escaped binary hashes).
    parts[1:] = [h[p] if len(p) == 2 else h[p[:2]] + p[2:] for p in parts[1:]]
    return b"".join(parts)


def _quote(data: bytes) -> bytes:
    q = _QUOTE
    return b"".join([q[c] for c in data])


def _check_query(query: object, max_length: int) -> bytes:
    if isinstance(query, (bytearray, memoryview)):
        query = bytes(query)
    if type(query) is not bytes:
        raise LocalProtocolError("query must be bytes", reason="bad_type")
    if len(query) > max_length:
        raise RemoteProtocolError(
            f"query of {len(query)} bytes exceeds {max_length}", reason="too_long"
        )
    if _RAW_BAD.search(query):
        raise RemoteProtocolError("query contains a byte that must be escaped", reason="bad_escape")
    if _BAD_ESCAPE.search(query):
        raise RemoteProtocolError("malformed percent escape", reason="bad_escape")
    return query


def _parse_uint(raw: bytes, name: str, maximum: int, reason: str = "bad_number") -> int:
    if not _CANONICAL_UINT.fullmatch(raw):
        raise RemoteProtocolError(f"{name} is not a canonical decimal", reason=reason)
    n = int(raw)
    if n > maximum:
        raise RemoteProtocolError(f"{name} exceeds {maximum}", reason=reason)
    return n


def _parse_flag(raw: bytes, name: str) -> bool:
    if raw == b"1":
        return True
    if raw == b"0":
        return False
    raise RemoteProtocolError(f"{name} must be 0 or 1", reason="bad_flag")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split an HTTP request-target into ``(path, query)`` at the first ``?``."""
    path, _, query = bytes(target).partition(b"?")
    return path, query


def parse_announce_query(query: bytes, *, max_length: int = MAX_QUERY_LENGTH) -> Announce:
    """Parse the raw query string of an announce (tracker side)."""
    query = _check_query(query, max_length)
    fields: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        k = _unquote(k)
        if k in _ANNOUNCE_KEYS:
            if k in fields:
                raise RemoteProtocolError(
                    f"parameter {k.decode()} given twice", reason="duplicate_key"
                )
            fields[k] = _unquote(v)
    for k in _REQUIRED:
        if k not in fields:
            raise RemoteProtocolError(f"missing parameter {k.decode()}", reason="missing_field")

    info_hash = fields[b"info_hash"]
    if len(info_hash) != 20:
        raise RemoteProtocolError("info_hash must be 20 bytes", reason="bad_info_hash")
    peer_id = fields[b"peer_id"]
    if len(peer_id) != 20:
        raise RemoteProtocolError("peer_id must be 20 bytes", reason="bad_peer_id")
    port = _parse_uint(fields[b"port"], "port", 65535, "bad_port")
    uploaded = _parse_uint(fields[b"uploaded"], "uploaded", _INT64_MAX)
    downloaded = _parse_uint(fields[b"downloaded"], "downloaded", _INT64_MAX)
    left = _parse_uint(fields[b"left"], "left", _INT64_MAX)

    get = fields.get
    raw = get(b"event")
    event = Event.NONE if raw is None else Event.from_http(raw)
    raw = get(b"numwant")
    numwant = None if raw is None else _parse_uint(raw, "numwant", _INT32_MAX)
    raw = get(b"compact")
    compact = True if raw is None else _parse_flag(raw, "compact")
    raw = get(b"no_peer_id")
    no_peer_id = False if raw is None else _parse_flag(raw, "no_peer_id")
    key = get(b"key")
    if key is not None and len(key) > MAX_KEY_LENGTH:
        raise RemoteProtocolError("key too long", reason="too_long")
    ip = get(b"ip")
    ip_text = None
    if ip is not None:
        try:
            ip_text = _normalise_ip(ip.decode("ascii"))[0]
        except (UnicodeDecodeError, LocalProtocolError):
            raise RemoteProtocolError("ip is not an IP literal", reason="bad_ip") from None
    trackerid = get(b"trackerid")
    if trackerid is not None and len(trackerid) > MAX_TRACKER_ID_LENGTH:
        raise RemoteProtocolError("trackerid too long", reason="too_long")
    try:
        return Announce(
            info_hash, peer_id, port, uploaded, downloaded, left, event,
            numwant, compact, no_peer_id, key, ip_text, trackerid,
        )
    except LocalProtocolError as exc:  # pragma: no cover - checked above
        raise RemoteProtocolError(str(exc), reason=exc.reason) from None


def encode_announce_query(a: Announce) -> bytes:
    """Build the query string for *a* (client side), without the leading ``?``."""
    if type(a) is not Announce:
        raise LocalProtocolError("expected an Announce", reason="bad_type")
    parts = [
        b"info_hash=" + _quote(a.info_hash),
        b"peer_id=" + _quote(a.peer_id),
        b"port=%d&uploaded=%d&downloaded=%d&left=%d"
        % (a.port, a.uploaded, a.downloaded, a.left),
    ]
    if a.event is not Event.NONE:
        parts.append(b"event=" + a.event.http)
    if a.numwant is not None:
        parts.append(b"numwant=%d" % a.numwant)
    parts.append(b"compact=1" if a.compact else b"compact=0")
    if a.no_peer_id:
        parts.append(b"no_peer_id=1")
    if a.key is not None:
        parts.append(b"key=" + _quote(a.key))
    if a.ip is not None:
        parts.append(b"ip=" + _quote(a.ip.encode("ascii")))
    if a.trackerid is not None:
        parts.append(b"trackerid=" + _quote(a.trackerid))
    return b"&".join(parts)


def parse_scrape_query(
    query: bytes,
    *,
    max_hashes: int = MAX_SCRAPE_HASHES,
    max_length: int = MAX_SCRAPE_QUERY_LENGTH,
) -> Scrape:
    """Parse a scrape query: zero or more ``info_hash`` parameters, in order."""
    query = _check_query(query, max_length)
    hashes = []
    for part in query.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        if _unquote(k) != b"info_hash":
            continue
        h = _unquote(v)
        if len(h) != 20:
            raise RemoteProtocolError("info_hash must be 20 bytes", reason="bad_info_hash")
        hashes.append(h)
        if len(hashes) > max_hashes:
            raise RemoteProtocolError(
                f"more than {max_hashes} info hashes", reason="too_many_hashes"
            )
    return Scrape(tuple(hashes))


def encode_scrape_query(s: Scrape) -> bytes:
    if type(s) is not Scrape:
        raise LocalProtocolError("expected a Scrape", reason="bad_type")
    return b"&".join([b"info_hash=" + _quote(h) for h in s.info_hashes])


# ---------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------


def _text(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError("text is not valid Unicode", reason="bad_text") from None


def encode_announce_response(
    resp: AnnounceResponse, *, compact: bool = True, no_peer_id: bool = False
) -> bytes:
    """Bencode *resp*; keys are written directly in canonical (sorted) order."""
    if type(resp) is not AnnounceResponse:
        raise LocalProtocolError("expected an AnnounceResponse", reason="bad_type")
    out = [
        b"d8:completei%de10:incompletei%de8:intervali%de"
        % (resp.complete, resp.incomplete, resp.interval)
    ]
    if resp.min_interval is not None:
        out.append(b"12:min intervali%de" % resp.min_interval)
    if compact:
        v4: list[bytes] = []
        v6: list[bytes] = []
        for p in resp.peers:
            c = p.compact
            (v4 if len(c) == 6 else v6).append(c)
        b4 = b"".join(v4)
        out.append(b"5:peers%d:" % len(b4))
        out.append(b4)
        if v6:
            b6 = b"".join(v6)
            out.append(b"6:peers6%d:" % len(b6))
            out.append(b6)
    else:
        out.append(b"5:peersl")
        for p in resp.peers:
            ip = p.ip.encode("ascii")
            if no_peer_id or p.peer_id is None:
                out.append(b"d2:ip%d:%s4:porti%dee" % (len(ip), ip, p.port))
            else:
                out.append(
                    b"d2:ip%d:%s7:peer id20:%s4:porti%dee" % (len(ip), ip, p.peer_id, p.port)
                )
        out.append(b"e")
    if resp.tracker_id is not None:
        out.append(b"10:tracker id%d:" % len(resp.tracker_id))
        out.append(resp.tracker_id)
    if resp.warning is not None:
        w = _text(resp.warning)
        out.append(b"15:warning message%d:" % len(w))
        out.append(w)
    out.append(b"e")
    return b"".join(out)


def encode_failure(reason: str) -> bytes:
    r = _text(reason) if type(reason) is str else None
    if r is None:
        raise LocalProtocolError("reason must be str", reason="bad_type")
    return b"d14:failure reason%d:%se" % (len(r), r)


def _get_int(d: dict, key: bytes, maximum: int, default: int | None = None) -> int:
    v = d.get(key)
    if v is None:
        if default is None:
            raise RemoteProtocolError(f"missing {key.decode()}", reason="missing_field")
        return default
    if type(v) is not int:
        raise RemoteProtocolError(f"{key.decode()} is not an integer", reason="bad_type")
    if not 0 <= v <= maximum:
        raise RemoteProtocolError(f"{key.decode()} out of range", reason="bad_number")
    return v


def _failure(d: dict) -> Failure | None:
    r = d.get(b"failure reason")
    if r is None:
        return None
    if type(r) is not bytes:
        raise RemoteProtocolError("failure reason is not a string", reason="bad_type")
    return Failure(r.decode("utf-8", "replace"))


def _top_dict(body: bytes, max_size: int) -> dict:
    d = bencode.decode(body, max_size=max_size)
    if type(d) is not dict:
        raise RemoteProtocolError("response is not a dictionary", reason="bad_type")
    return d


def _compact_peers(blob: object, size: int) -> list[Peer]:
    if type(blob) is not bytes:
        raise RemoteProtocolError("compact peers must be a string", reason="bad_type")
    if len(blob) % size:
        raise RemoteProtocolError(
            f"compact peers length {len(blob)} not a multiple of {size}", reason="bad_peers"
        )
    if size == 6:
        return [
            Peer(f"{blob[i]}.{blob[i + 1]}.{blob[i + 2]}.{blob[i + 3]}",
                 (blob[i + 4] << 8) | blob[i + 5])
            for i in range(0, len(blob), 6)
        ]
    return [Peer.from_compact(blob[i : i + 18]) for i in range(0, len(blob), 18)]


def _dict_peer(entry: object) -> Peer:
    if type(entry) is not dict:
        raise RemoteProtocolError("peer entry is not a dictionary", reason="bad_peers")
    ip = entry.get(b"ip")
    port = entry.get(b"port")
    pid = entry.get(b"peer id")
    if type(ip) is not bytes or type(port) is not int:
        raise RemoteProtocolError("peer entry needs ip and port", reason="bad_peers")
    if pid is not None and (type(pid) is not bytes or len(pid) != 20):
        raise RemoteProtocolError("peer id must be 20 bytes", reason="bad_peers")
    try:
        return Peer(ip.decode("ascii"), port, pid)
    except (UnicodeDecodeError, LocalProtocolError):
        raise RemoteProtocolError("bad peer address or port", reason="bad_peers") from None


def decode_announce_response(
    body: bytes, *, max_size: int = bencode.DEFAULT_MAX_SIZE
) -> AnnounceResponse | Failure:
    """Decode a tracker's announce response (client side)."""
    d = _top_dict(body, max_size)
    f = _failure(d)
    if f is not None:
        return f
    interval = _get_int(d, b"interval", _INT32_MAX)
    min_interval = None
    if b"min interval" in d:
        min_interval = _get_int(d, b"min interval", _INT32_MAX)
    complete = _get_int(d, b"complete", _INT64_MAX, 0)
    incomplete = _get_int(d, b"incomplete", _INT64_MAX, 0)
    raw4 = d.get(b"peers")
    raw6 = d.get(b"peers6")
    if raw4 is None and raw6 is None:
        raise RemoteProtocolError("missing peers", reason="missing_field")
    peers: list[Peer] = []
    if type(raw4) is list:
        peers.extend(_dict_peer(e) for e in raw4)
    elif raw4 is not None:
        peers.extend(_compact_peers(raw4, 6))
    if raw6 is not None:
        peers.extend(_compact_peers(raw6, 18))
    tracker_id = d.get(b"tracker id")
    if tracker_id is not None:
        if type(tracker_id) is not bytes:
            raise RemoteProtocolError("tracker id is not a string", reason="bad_type")
        if len(tracker_id) > MAX_TRACKER_ID_LENGTH:
            raise RemoteProtocolError("tracker id too long", reason="too_long")
    warning = d.get(b"warning message")
    if warning is not None:
        if type(warning) is not bytes:
            raise RemoteProtocolError("warning message is not a string", reason="bad_type")
        warning = warning.decode("utf-8", "replace")
    return AnnounceResponse(
        interval, min_interval, complete, incomplete, tuple(peers), tracker_id, warning
    )


def encode_scrape_response(files: Mapping[bytes, ScrapeStats]) -> bytes:
    """Bencode a BEP 48 scrape response."""
    out = [b"d5:filesd"]
    for h in sorted(files):
        s = files[h]
        if type(h) is not bytes or len(h) != 20:
            raise LocalProtocolError("info hash must be 20 bytes", reason="bad_info_hash")
        if type(s) is not ScrapeStats:
            raise LocalProtocolError("expected ScrapeStats", reason="bad_type")
        out.append(
            b"20:%sd8:completei%de10:downloadedi%de10:incompletei%dee"
            % (h, s.complete, s.downloaded, s.incomplete)
        )
    out.append(b"ee")
    return b"".join(out)


def decode_scrape_response(
    body: bytes, *, max_size: int = bencode.DEFAULT_MAX_SIZE
) -> dict[bytes, ScrapeStats] | Failure:
    """Decode a BEP 48 scrape response (client side)."""
    d = _top_dict(body, max_size)
    f = _failure(d)
    if f is not None:
        return f
    files = d.get(b"files")
    if files is None:
        raise RemoteProtocolError("missing files", reason="missing_field")
    if type(files) is not dict:
        raise RemoteProtocolError("files is not a dictionary", reason="bad_type")
    result = {}
    for h, stats in files.items():
        if len(h) != 20:
            raise RemoteProtocolError("info hash must be 20 bytes", reason="bad_info_hash")
        if type(stats) is not dict:
            raise RemoteProtocolError("file entry is not a dictionary", reason="bad_type")
        result[h] = ScrapeStats(
            _get_int(stats, b"complete", _INT64_MAX),
            _get_int(stats, b"downloaded", _INT64_MAX),
            _get_int(stats, b"incomplete", _INT64_MAX),
        )
    return result

