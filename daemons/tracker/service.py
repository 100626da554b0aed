"""Turning one tracker request into one response, with no I/O.

:class:`TrackerService` takes a parsed HTTP request or a UDP datagram and the
current time, applies access control, updates the swarm table, counts the
outcome in the metrics, and returns the bytes to send back (or ``None`` to
drop a datagram). The trio shell in :mod:`.daemon` only moves bytes, so
nearly every tracker behaviour is tested here without sockets.

Where bad input goes
--------------------
* A malformed HTTP announce or scrape gets a bencoded ``failure reason`` with
  status 200 (BitTorrent clients read failures only from 200 bodies), and is
  counted in ``shoal_tracker_rejected_total{reason=...}`` with the parser's
  reason token.
* A path that is neither announce nor scrape is a 404; a method other than
  GET a 405.
* A malformed or forged UDP datagram is dropped and counted: answering
  unauthenticated UDP would let a spoofed source turn the tracker into a
  reflector. A well-formed request with a stale connection id gets a BEP 15
  error (smaller than the request, so nothing is amplified).
"""

from __future__ import annotations

from shoal.daemons.runtime.http import HttpRequest, HttpResponse
from shoal.daemons.tracker.access import AccessPolicy, ConnectionIds, Route
from shoal.daemons.tracker.config import TrackerSection
from shoal.daemons.tracker.metrics import TrackerMetrics
from shoal.daemons.tracker.swarm import SwarmTable, TableFull
from shoal.protocol import udp_tracker as udp
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.tracker import (
    AnnounceResponse,
    ScrapeStats,
    encode_announce_response,
    encode_failure,
    encode_scrape_response,
    parse_announce_query,
    parse_scrape_query,
    split_target,
)

_PLAIN = [(b"content-type", b"text/plain")]
_BENCODE = [(b"content-type", b"text/plain")]  # what opentracker and most trackers send
_NOT_FOUND = HttpResponse(404, _PLAIN, b"not found\n")
_BAD_METHOD = HttpResponse(405, _PLAIN + [(b"allow", b"GET")], b"method not allowed\n")

_FAILURE_TEXT = {
    "not_whitelisted": "torrent not on this tracker's whitelist",
    "bad_passkey": "unknown passkey",
    "rate_limited": "too many requests from your address; slow down",
    "torrent_limit": "tracker is full: too many torrents",
    "peer_limit": "swarm is full",
    "scrape_all_refused": "scrape needs at least one info_hash",
}


def client_ip(host: str) -> str:
    """The textual address, with IPv4-mapped IPv6 turned back into IPv4."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


class TrackerService:
    def __init__(
        self,
        section: TrackerSection,
        access: AccessPolicy,
        table: SwarmTable,
        metrics: TrackerMetrics,
        connection_ids: ConnectionIds | None = None,
    ) -> None:
        self.section = section
        self.access = access
        self.table = table
        self.metrics = metrics
        self.ids = connection_ids or ConnectionIds()

    def _failure(self, protocol: str, reason: str, text: str | None = None) -> bytes:
        self.metrics.reject(protocol, reason)
        return encode_failure(text or _FAILURE_TEXT.get(reason, f"bad request ({reason})"))

    # -- HTTP (BEP 3, 23, 7, 48) -------------------------------------------

    def handle_http(self, req: HttpRequest, now: float) -> HttpResponse:
        if req.method != b"GET":
            self.metrics.reject("http", "bad_method")
            return _BAD_METHOD
        path, query = split_target(req.target)
        route = self.access.route(path)
        if route == "not_found":
            self.metrics.reject("http", "not_found")
            return _NOT_FOUND
        if isinstance(route, str):
            return HttpResponse(200, _BENCODE, self._failure("http", route))
        ip = client_ip(req.client[0])
        if not self.access.rate_ok(ip, now):
            return HttpResponse(200, _BENCODE, self._failure("http", "rate_limited"))
        body = self._http_announce(query, ip, now) if route.kind == "announce" else self._http_scrape(query)
        return HttpResponse(200, _BENCODE, body)

    def _http_announce(self, query: bytes, ip: str, now: float) -> bytes:
        try:
            req = parse_announce_query(query, max_length=self.section.max_request_bytes)
        except RemoteProtocolError as exc:
            return self._failure("http", exc.reason, f"invalid announce: {exc}")
        if not self.access.torrent_allowed(req.info_hash):
            return self._failure("http", "not_whitelisted")
        if self.section.trust_client_ip and req.ip:
            ip = req.ip
        numwant = self._numwant(req.numwant)
        try:
            result = self.table.announce(req, ip, numwant, now)
        except TableFull as exc:
            return self._failure("http", exc.reason)
        self.metrics.announce_by["http", req.event.name.lower()].inc()
        s = self.section
        resp = AnnounceResponse(
            interval=s.announce_interval,
            min_interval=s.min_interval,
            complete=result.complete,
            incomplete=result.incomplete,
            peers=tuple([p.peer for p in result.peers]),
        )
        return encode_announce_response(resp, compact=req.compact, no_peer_id=req.no_peer_id)

    def _http_scrape(self, query: bytes) -> bytes:
        try:
            req = parse_scrape_query(query, max_hashes=self.section.max_scrape_hashes)
        except RemoteProtocolError as exc:
            return self._failure("http", exc.reason, f"invalid scrape: {exc}")
        if not req.info_hashes:
            return self._failure("http", "scrape_all_refused")
        self.metrics.scrape_by["http"].inc()
        files = {
            ih: ScrapeStats(*self.table.scrape(ih))
            for ih in req.info_hashes
            if self.access.torrent_allowed(ih)
        }
        return encode_scrape_response(files)

    def _numwant(self, asked: int | None) -> int:
        if asked is None:
            return self.section.numwant_default
        return min(asked, self.section.numwant_max)

    # -- UDP (BEP 15, 41) --------------------------------------------------

    def handle_udp(self, data: bytes, addr: tuple[str, int], now: float) -> bytes | None:
        ip = client_ip(addr[0])
        try:
            req = udp.parse_request(data)
        except RemoteProtocolError as exc:
            self.metrics.reject("udp", exc.reason)
            return None
        if not self.access.rate_ok(ip, now):
            self.metrics.reject("udp", "rate_limited")
            return None
        if isinstance(req, udp.ConnectRequest):
            self.metrics.udp_connects.inc()
            cid = self.ids.issue(ip, now)
            return udp.encode_response(udp.ConnectResponse(req.transaction_id, cid))
        if not self.ids.valid(req.connection_id, ip, now):
            self.metrics.reject("udp", "bad_connection_id")
            return udp.encode_response(udp.ErrorResponse(req.transaction_id, "connection id expired"))
        ipv6 = ":" in ip
        if isinstance(req, udp.ScrapeRequest):
            if self.access.passkeys is not None:
                # BEP 15 scrape packets carry no URL data, so no passkey.
                return self._udp_error(req.transaction_id, "bad_passkey")
            self.metrics.scrape_by["udp"].inc()
            stats = tuple(
                ScrapeStats(*self.table.scrape(ih)) if self.access.torrent_allowed(ih) else ScrapeStats(0, 0, 0)
                for ih in req.info_hashes
            )
            return udp.encode_response(udp.ScrapeResponse(req.transaction_id, stats), ipv6=ipv6)
        return self._udp_announce(req, ip, now, ipv6)

    def _udp_announce(self, req: udp.AnnounceRequest, ip: str, now: float, ipv6: bool) -> bytes:
        if self.access.passkeys is not None:
            route = self.access.route(req.url_data.split(b"?", 1)[0])
            if not isinstance(route, Route) or route.kind != "announce":
                return self._udp_error(req.transaction_id, "bad_passkey")
        a = req.announce
        if not self.access.torrent_allowed(a.info_hash):
            return self._udp_error(req.transaction_id, "not_whitelisted")
        if self.section.trust_client_ip and a.ip:
            ip = a.ip
        try:
            result = self.table.announce(a, ip, self._numwant(a.numwant), now)
        except TableFull as exc:
            return self._udp_error(req.transaction_id, exc.reason)
        self.metrics.announce_by["udp", a.event.name.lower()].inc()
        resp = udp.AnnounceResponse(
            req.transaction_id,
            self.section.announce_interval,
            result.incomplete,
            result.complete,
            tuple([p.peer for p in result.peers]),
        )
        return udp.encode_response(resp, ipv6=ipv6)

    def _udp_error(self, transaction_id: int, reason: str) -> bytes:
        self.metrics.reject("udp", reason)
        return udp.encode_response(udp.ErrorResponse(transaction_id, _FAILURE_TEXT[reason]))
