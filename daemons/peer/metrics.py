"""The peer daemon's Prometheus metrics. No per-peer or per-torrent labels."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.daemons.peer.announce import TRACKER_ERROR_REASONS
from shoal.protocol import metainfo, peer_wire

# Why a peer was disconnected and banned; bounded set of tokens.
BAN_REASONS = ("bad_metadata", "bad_hash", "protocol", "wrong_info_hash", "unrequested_piece", "self_connection")

# Why a connection was refused or closed by us, other than for an offence.
DISCONNECT_REASONS = ("per_address", "handshakes", "handshake_timeout", "full", "banned", "evicted",
                      "seed_to_seed", "silent", "idle", "control_overflow", "unused_slots")

# A 16 KiB block on loopback takes well under a millisecond; on a busy WAN
# link several seconds. Requests time out at 30 s by default.
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)



#: ``shoal_peer_protocol_errors_total{reason}``: the wire's reasons, the metadata
#: dictionary's (BEP 9, parsed by metainfo), and the session's own handshake checks.
PROTOCOL_ERROR_REASONS = tuple(dict.fromkeys((*peer_wire.REASONS, *metainfo.REASONS, "wrong_info_hash",
                                              "bad_handshake", "bad_metadata")))

class PeerMetrics:
    def __init__(self, registry: CollectorRegistry, gauges: Callable[[], dict[str, int]]):
        self.bytes = Counter("shoal_peer_bytes_total", "Payload bytes moved, by direction.",
                             ["direction"], registry=registry)
        self.up = self.bytes.labels("up")
        self.down = self.bytes.labels("down")
        self.pieces = Counter("shoal_peer_pieces_total", "Pieces checked against their SHA-1, by result.",
                              ["result"], registry=registry)
        self.verified = self.pieces.labels("verified")
        self.failed = self.pieces.labels("failed")
        self.webseed_bytes = Counter("shoal_peer_webseed_bytes_total",
                                     "Payload bytes downloaded from web seeds (BEP 19); also in bytes_total.",
                                     registry=registry)
        self.webseed_errors = Counter("shoal_peer_webseed_errors_total",
                                      "Failed web seed requests (HTTP status, size, connection).", registry=registry)
        self.disk_errors = Counter("shoal_peer_disk_errors_total",
                                   "Piece writes or read-backs that failed with a disk error "
                                   "(the piece is fetched again).",
                                   registry=registry)
        self.choke_rounds = Counter("shoal_peer_choke_rounds_total", "Choke rounds run.", registry=registry)
        self.bans = Counter("shoal_peer_bans_total", "Peers banned for a time (repeated offences), by reason.",
                            ["reason"], registry=registry)
        self.offences = Counter("shoal_peer_offences_total",
                                "Offences counted against a peer (its connection is closed), by reason.",
                                ["reason"], registry=registry)
        self.disconnects = Counter("shoal_peer_disconnects_total",
                                   "Connections refused or closed by us for a reason other than an offence.",
                                   ["reason"], registry=registry)
        self.protocol_errors = Counter("shoal_peer_protocol_errors_total",
                                       "Connections closed for breaking the wire protocol, by reason.",
                                       ["reason"], registry=registry)
        self.request_latency = Histogram("shoal_peer_request_duration_seconds",
                                         "Time from a block request to its piece message.",
                                         buckets=REQUEST_BUCKETS, registry=registry)
        self.announces = Counter("shoal_peer_announces_total", "Tracker announces, by result.",
                                 ["result"], registry=registry)
        self.tracker_errors = Counter("shoal_peer_tracker_errors_total",
                                      "Tracker announces and scrapes that failed, by reason (each is retried).",
                                      ["reason"], registry=registry)
        for reason in BAN_REASONS:
            self.bans.labels(reason)
            self.offences.labels(reason)
        for reason in DISCONNECT_REASONS:
            self.disconnects.labels(reason)
        for reason in PROTOCOL_ERROR_REASONS:  # a panel sees zeros, not "No data", on a healthy peer
            self.protocol_errors.labels(reason)
        for reason in TRACKER_ERROR_REASONS:
            self.tracker_errors.labels(reason)
        registry.register(_Gauges(gauges))


class _Gauges(Collector):
    HELP = {
        "torrents": "Torrents being downloaded or seeded.",
        "peers": "Peers connected.",
        "peers_unchoked": "Peers we are uploading to (unchoked by us).",
        "peers_interested": "Peers interested in our pieces.",
        # (was peers_unchoking_us, which promtool reads as an abbreviated unit: microseconds)
        "peers_unchoking_this_peer": "Peers that unchoke this peer (it may download from them).",
    }

    def __init__(self, read: Callable[[], dict[str, int]]):
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._read()
        for name, text in self.HELP.items():
            yield GaugeMetricFamily(f"shoal_peer_{name}", text, value=values.get(name, 0))
