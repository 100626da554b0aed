"""The tracker's config schema; every key is documented in configs/tracker.toml."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS, PORTS

DEFAULT_PORT = PORTS["tracker", "http"]
METRICS_PORT = METRICS_PORTS["tracker"]


@dataclass(frozen=True, slots=True)
class TrackerSection:
    # Either listener may be disabled with "". Both default to loopback only.
    http_listen: ListenAddr | None = setting(ListenAddr("127.0.0.1", DEFAULT_PORT))
    udp_listen: ListenAddr | None = setting(ListenAddr("127.0.0.1", DEFAULT_PORT))
    # The seeds: peers report every 30 minutes. Lab configs use seconds.
    announce_interval: int = setting(1800, min=1, max=86400)
    min_interval: int = setting(900, min=1, max=86400)
    # A peer not heard from for this long is dropped from its swarm.
    peer_timeout: int = setting(3600, min=2, max=7 * 86400)
    # The seeds: "New clients receive ... 50 randomly chosen active peers".
    numwant_default: int = setting(50, min=0, max=1000)
    numwant_max: int = setting(200, min=1, max=1000)
    # Memory bounds: about 420 bytes per peer (bench/tracker/memory.py), so the
    # defaults cap the table near 420 MB even if every swarm is full.
    max_torrents: int = setting(100_000, min=1, max=10_000_000)
    max_peers_per_torrent: int = setting(10_000, min=1, max=1_000_000)
    max_peers: int = setting(1_000_000, min=1, max=50_000_000)
    # Scrape requests may name this many info-hashes (BEP 48 multi-scrape).
    max_scrape_hashes: int = setting(64, min=1, max=74)
    # An announce request line with headers is well under 2 KiB.
    max_request_bytes: int = setting(4096, min=512, max=65536)
    # Seconds a connection has to deliver a complete request (and to take its
    # reply); a client that sends nothing, or junk without a blank line, is
    # closed then and counted as rejected{reason="timeout"}. Also how long a
    # quiet keep-alive connection is kept.
    header_timeout: float = setting(5.0, min=0.5, max=300.0)
    # HTTP connections served at once, in all and from one client IP (IPv6:
    # one /64); one more is closed unread (too_many_connections,
    # ip_connection_limit).
    max_http_connections: int = setting(1024, min=1, max=1_000_000)
    max_http_connections_per_ip: int = setting(32, min=1, max=1_000_000)
    # Honour the client's ip= parameter (UDP: ip field). Only behind a proxy you trust.
    trust_client_ip: bool = setting(False)
    # The swarm view is saved on a graceful stop and every save_interval seconds.
    save_interval: float = setting(300.0, min=1.0, max=86400.0)

    def __post_init__(self) -> None:
        if self.min_interval > self.announce_interval:
            raise ValueError("min_interval: must not exceed announce_interval")
        if self.peer_timeout <= self.announce_interval:
            raise ValueError("peer_timeout: must exceed announce_interval, or live peers expire")
        if self.numwant_default > self.numwant_max:
            raise ValueError("numwant_default: must not exceed numwant_max")
        if self.max_http_connections_per_ip > self.max_http_connections:
            raise ValueError("max_http_connections_per_ip: must not exceed max_http_connections")


@dataclass(frozen=True, slots=True)
class AccessSection:
    # "open" tracks any torrent; "whitelist" only those in whitelist_file.
    mode: Literal["open", "whitelist"] = "open"
    # One hex info-hash per line; '#' starts a comment. Re-read on SIGHUP.
    whitelist_file: Path | None = setting(None)
    # One passkey per line. When set, announces must use /<passkey>/announce.
    passkeys_file: Path | None = setting(None)
    # Token bucket per client IP, requests per second and burst. 0 disables.
    rate_limit: float = setting(20.0, min=0.0, max=1e6)
    rate_burst: int = setting(100, min=1, max=1_000_000)
    # Networks that the rate limit leaves alone (a lab's own hosts, say).
    rate_limit_exempt: tuple[str, ...] = setting(("127.0.0.0/8", "::1/128"))
    # The per-IP bucket table is bounded; the least recently seen IP is evicted.
    max_tracked_ips: int = setting(100_000, min=1, max=10_000_000)

    def __post_init__(self) -> None:
        if self.mode == "whitelist" and self.whitelist_file is None:
            raise ValueError("whitelist_file: required when mode = \"whitelist\"")
        for net in self.rate_limit_exempt:
            try:
                ipaddress.ip_network(net)
            except ValueError:
                raise ValueError(f"rate_limit_exempt: {net!r} is not a network") from None


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    tracker: TrackerSection = setting(TrackerSection())
    access: AccessSection = setting(AccessSection())
