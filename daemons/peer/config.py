"""The peer daemon's config schema; every key is documented in configs/peer.toml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shoal.daemons.runtime.config import DaemonSection, ListenAddr, setting
from shoal.daemons.runtime.registry import METRICS_PORTS

METRICS_PORT = METRICS_PORTS["peer"]


@dataclass(frozen=True, slots=True)
class PeerSection:
    # Incoming BitTorrent connections; "" disables them (outgoing only).
    listen: ListenAddr | None = setting(ListenAddr("127.0.0.1", 6881))
    # Where downloads go; empty means <state directory>/downloads.
    download_dir: str = setting("")
    # The control socket for `shoal peer ...`; empty means <state directory>/control.sock.
    control_socket: str = setting("")
    # Azureus-style client id, the first 8 bytes of every peer_id.
    peer_id_prefix: str = setting("-SH0100-")
    # The seeds (Spotify): stop dialling at the soft limit, refuse at the hard one.
    max_connections_soft: int = setting(50, min=1, max=10_000)
    max_connections_hard: int = setting(60, min=1, max=10_000)
    # Admission (docs/peer.md): incoming connections from one IP; the handshake's
    # deadline; the deadline for a peer's first message after it.
    max_per_address: int = setting(8, min=1, max=10_000)
    handshake_timeout: float = setting(10.0, min=0.1, max=600.0)
    first_message_timeout: float = setting(10.0, min=0.1, max=600.0)
    # The seeds (BitTorrent): ask the tracker again when fewer peers than this are connected.
    reannounce_below: int = setting(20, min=0, max=1000)
    numwant: int = setting(50, min=0, max=1000)
    max_torrents: int = setting(100, min=1, max=100_000)
    # BEP 16: a torrent that starts complete is seeded by announcing pieces one by one.
    super_seed: bool = False
    # BEP 19: fetch from the torrent's url-list (HTTP fallback) while downloading.
    web_seeds: bool = True
    # BEP 11: how often connected peers are told of our other peers (0: never).
    pex_interval: float = setting(60.0, min=0.0, max=3600.0)

    def __post_init__(self) -> None:
        if self.max_connections_soft > self.max_connections_hard:
            raise ValueError("max_connections_soft: must not exceed max_connections_hard")
        if len(self.peer_id_prefix.encode()) != 8:
            raise ValueError("peer_id_prefix: must be 8 bytes, like -SH0100-")
        for key in ("download_dir", "control_socket"):
            value = getattr(self, key)
            if value and not value.startswith("/"):
                raise ValueError(f"{key}: must be an absolute path (or empty for the default)")


@dataclass(frozen=True, slots=True)
class ChokerSection:
    # The seeds: 4 regular unchoke slots recomputed every 10 s, an optimistic
    # unchoke every 30 s.
    slots: int = setting(4, min=0, max=100)
    optimistic_slots: int = setting(1, min=0, max=10)
    interval: float = setting(10.0, min=0.1, max=3600.0)
    optimistic_interval: float = setting(30.0, min=0.1, max=3600.0)
    # A peer that sends nothing for this long while unchoked loses its regular slot.
    snub_after: float = setting(60.0, min=1.0, max=3600.0)
    seeding_policy: Literal["upload_rate", "round_robin"] = "upload_rate"
    # Rates used for ranking are averaged over this many seconds.
    rate_window: float = setting(20.0, min=1.0, max=600.0)
    # An unchoked peer that neither requests nor is sent a block for this long loses its slot.
    request_grace: float = setting(5.0, min=0.1, max=600.0)


@dataclass(frozen=True, slots=True)
class PickerSection:
    # The seeds: the first pieces are picked at random, then local rarest first.
    random_first: int = setting(4, min=0, max=1000)
    mode: Literal["rarest", "sequential"] = "rarest"
    # A request unanswered for this long is sent to another peer.
    request_timeout: float = setting(30.0, min=1.0, max=600.0)


@dataclass(frozen=True, slots=True)
class LimitsSection:
    # Bytes per second for all torrents together; 0 means unlimited. These also
    # let an experiment give each node its own upload capacity.
    upload_rate: int = setting(0, min=0)
    download_rate: int = setting(0, min=0)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    daemon: DaemonSection = setting(DaemonSection(metrics_listen=ListenAddr("127.0.0.1", METRICS_PORT)))
    peer: PeerSection = setting(PeerSection())
    choker: ChokerSection = setting(ChokerSection())
    picker: PickerSection = setting(PickerSection())
    limits: LimitsSection = setting(LimitsSection())
