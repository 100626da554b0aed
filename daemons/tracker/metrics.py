"""The tracker's Prometheus metrics (names follow shoal_<daemon>_<thing>_<unit>).

Label values are bounded: ``protocol`` is http or udp, ``event`` one of the
four BEP 3 events, ``reason`` a fixed token (the protocol modules' REASONS plus
the access-control tokens below). Swarm sizes are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from shoal.daemons.runtime.http import ERROR_REASONS as HTTP_ERROR_REASONS
from shoal.protocol import tracker as tracker_wire
from shoal.protocol import udp_tracker

PROTOCOLS = ("http", "udp")
EVENTS = ("none", "started", "completed", "stopped")
# Rejections that are not wire-format errors.
ACCESS_REASONS = (
    "not_whitelisted",
    "bad_passkey",
    "rate_limited",
    "torrent_limit",
    "peer_limit",
    "bad_connection_id",
    "not_found",
    "bad_method",
    "scrape_all_refused",
    "send_failed",
    "ip_connection_limit",
)

# Announce handling takes tens of microseconds; the tail is what matters.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0)



#: The reasons each protocol's requests are rejected for: access control, the
#: wire format's own reasons, and (HTTP) the server's connection-level refusals.
REJECT_REASONS = {
    "http": tuple(dict.fromkeys((*ACCESS_REASONS, *tracker_wire.REASONS, *HTTP_ERROR_REASONS))),
    "udp": tuple(dict.fromkeys((*ACCESS_REASONS, *udp_tracker.REASONS))),
}

class TrackerMetrics:
    def __init__(self, registry: CollectorRegistry, swarm_stats: Callable[[], tuple[int, int, int]]):
        self.announces = Counter(
            "shoal_tracker_announces_total", "Announces served, by event and protocol.",
            ["protocol", "event"], registry=registry,
        )
        self.scrapes = Counter(
            "shoal_tracker_scrapes_total", "Scrapes served, by protocol.", ["protocol"], registry=registry,
        )
        self.udp_connects = Counter(
            "shoal_tracker_udp_connects_total", "BEP 15 connect requests answered.", registry=registry,
        )
        self.rejected = Counter(
            "shoal_tracker_rejected_total",
            "Requests refused or dropped, by protocol and reason.",
            ["protocol", "reason"], registry=registry,
        )
        self.expired = Counter(
            "shoal_tracker_peers_expired_total", "Peers dropped for not announcing.", registry=registry,
        )
        self.latency = Histogram(
            "shoal_tracker_request_duration_seconds",
            "Time to handle one tracker request, by protocol.",
            ["protocol"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        # Children resolved once: .labels() costs a dict lookup and a lock per call.
        self.announce_by = {(p, e): self.announces.labels(p, e) for p in PROTOCOLS for e in EVENTS}
        self.scrape_by = {p: self.scrapes.labels(p) for p in PROTOCOLS}
        self.latency_by = {p: self.latency.labels(p) for p in PROTOCOLS}
        registry.register(_SwarmCollector(swarm_stats))
        # Every rejection series exists at 0 from the start, so a dashboard panel
        # or increase() sees the first one (and a healthy tracker shows zeros).
        for protocol, reasons in REJECT_REASONS.items():
            for reason in reasons:
                self.rejected.labels(protocol, reason)

    def reject(self, protocol: str, reason: str) -> None:
        self.rejected.labels(protocol, reason).inc()


class _SwarmCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int, int]]):
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        swarms, seeders, leechers = self._stats()
        yield GaugeMetricFamily("shoal_tracker_swarms", "Torrents with at least one peer.", value=swarms)
        yield GaugeMetricFamily("shoal_tracker_seeders", "Peers with the whole torrent.", value=seeders)
        yield GaugeMetricFamily("shoal_tracker_leechers", "Peers still downloading.", value=leechers)
