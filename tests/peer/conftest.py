"""A loopback lab for peer tests: a shoal tracker and shoal sessions in this process.

Each shoal peer listens on its own 127.0.0.x address and sends all its
traffic from it, so bans and the tracker's view are per peer, as on a LAN.
"""

import hashlib
import itertools
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from shoal.daemons.peer.config import ChokerSection, LimitsSection, PeerConfig, PeerSection
from shoal.daemons.peer.session import Session
from shoal.daemons.runtime.config import DaemonSection, ListenAddr
from shoal.daemons.runtime.daemon import serve
from shoal.daemons.tracker.config import AccessSection, TrackerConfig, TrackerSection
from shoal.daemons.tracker.daemon import TrackerApp

# 127.0.2.x for shoal peers, 127.0.3.x for trackers, 127.0.4.x for other clients.
_peer_ips = (f"127.0.2.{n}" for n in itertools.count(1))
_tracker_ips = (f"127.0.3.{n}" for n in itertools.count(1))
_client_ips = (f"127.0.4.{n}" for n in itertools.count(1))


def next_client_ip() -> str:
    return next(_client_ips)


def next_tracker_ip() -> str:
    return next(_tracker_ips)


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class Lab:
    def __init__(self, nursery: trio.Nursery, tmp: Path) -> None:
        self.nursery = nursery
        self.tmp = tmp
        self.sessions: list[Session] = []

    async def tracker(self) -> dict[str, ListenAddr]:
        host = next_tracker_ip()
        cfg = TrackerConfig(
            daemon=DaemonSection(metrics_listen=None, state_directory=str(self.tmp / f"tracker-{host}")),
            tracker=replace(TrackerSection(), http_listen=ListenAddr(host, 0), udp_listen=ListenAddr(host, 0),
                            announce_interval=5, min_interval=1, peer_timeout=60),
            access=AccessSection(rate_limit=0),
        )
        ctx = await self.nursery.start(partial(serve, "tracker", cfg, None, TrackerApp, handle_signals=False))
        return ctx.addresses

    async def peer(self, *, upload_rate: int = 0, choker: ChokerSection | None = None,
                   **peer_kw) -> Session:
        ip = next(_peer_ips)
        cfg = PeerConfig(peer=replace(PeerSection(), listen=ListenAddr(ip, 0), **peer_kw),
                         limits=LimitsSection(upload_rate=upload_rate), choker=choker or ChokerSection())
        session = Session(cfg, CollectorRegistry(), self.tmp / ip / "downloads", self.tmp / ip / "resume")
        await self.nursery.start(session.run)
        self.sessions.append(session)
        return session


@pytest.fixture
async def lab(tmp_path, nursery):
    return Lab(nursery, tmp_path)
