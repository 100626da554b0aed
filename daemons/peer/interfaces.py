"""What the peer daemon's parts need from one another, as leaf types.

The session owns torrents, a torrent owns its links and web seeds, and each
of those calls back into its owner. Naming the owner's concrete class would
make the modules import each other (link <-> torrent <-> session, webseed <->
torrent), so the callbacks are described here instead, as
:class:`typing.Protocol` classes that the owners satisfy structurally:

* :class:`SessionHost` -- what a torrent uses of its session (config, throttles,
  bans, dialling, handshakes); :class:`~shoal.daemons.peer.session.Session`
  implements it.
* :class:`TorrentHost` -- what a peer link or a web seed uses of its torrent:
  the facts a link reports (pieces a peer has, blocks, rejects, bytes moved)
  and what it asks (what to request, what it may serve, throttles), as
  methods; the web seed still uses the picker and storage directly;
  :class:`~shoal.daemons.peer.torrent.Torrent` implements it.
* :class:`Peer` -- what a torrent uses of any source of blocks (a link or a
  web seed) that it does not own the type of.

This module imports only leaves (core, protocol, runtime, and the peer's own
storage, metrics, config and throttle), so the dependency graph is
session -> torrent -> {link, webseed} -> interfaces, with no way back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    import trio

    from shoal.core.swarm.choker import Choker
    from shoal.core.swarm.picker import Block, PiecePicker
    from shoal.core.swarm.superseed import SuperSeeder
    from shoal.daemons.peer.config import PeerConfig
    from shoal.daemons.peer.metrics import PeerMetrics
    from shoal.daemons.peer.storage import Storage
    from shoal.daemons.peer.throttle import Throttle
    from shoal.daemons.runtime.config import ListenAddr
    from shoal.protocol import peer_wire as pw
    from shoal.protocol.metainfo import Metainfo


class Banned(Exception):
    """The peer misbehaved: close its connection and count an offence against it.

    ``reason`` is a metric label (see metrics.BAN_REASONS); ``points`` is the
    offence's weight (core.swarm.bans: 2 bans at once, 1 only on a repeat).
    """

    def __init__(self, reason: str, detail: str = "", points: int = 2) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.points = points


class Peer(Protocol):
    """Any source of blocks the picker hands work to: a peer link or a web seed."""

    addr: tuple[str, int]

    def cancel(self, index: int, begin: int, length: int) -> None: ...

    def abort(self) -> None: ...


class SessionHost(Protocol):
    """What a torrent needs from the session that runs it."""

    config: PeerConfig
    metrics: PeerMetrics
    peer_id: bytes
    version: str
    resume_dir: Path
    listen_addr: ListenAddr | None
    upload_throttle: Throttle
    download_throttle: Throttle
    tracker_timeout: float  # one tracker exchange
    announce_retry_first: float  # a failed announce is retried after this, doubling...
    announce_retry_max: float  # ... up to this

    @property
    def local_host(self) -> str | None: ...

    def offend(self, info_hash: bytes, keys: list[tuple[str, Any]], reason: str, points: int = 1) -> bool: ...

    def banned(self, info_hash: bytes, keys: list[tuple[str, Any]]) -> str | None: ...

    def ban_address(self, addr: tuple[str, int], reason: str) -> None: ...

    async def connect(self, addr: tuple[str, int]) -> trio.SocketStream: ...

    async def dial(self, torrent: Any, addr: tuple[str, int]) -> bool: ...

    async def handshake_out(self, stream: trio.SocketStream, info_hash: bytes,
                            num_pieces: int | None) -> pw.PeerConnection: ...


class TorrentHost(Protocol):
    """What a peer link or a web seed needs from the torrent it serves."""

    session: SessionHost
    meta: Metainfo
    metrics: PeerMetrics
    picker: PiecePicker
    choker: Choker
    storage: Storage
    super: SuperSeeder | None
    uploaded: int
    downloaded: int
    piece_verified: trio.Event
    wake_choker: trio.Event

    async def take_upload(self, nbytes: int) -> None: ...

    def uploaded_to(self, link: Any, nbytes: int, now: float) -> None: ...

    def downloaded_from(self, link: Any, nbytes: int, now: float, latency: float | None = None) -> None: ...

    async def requests_failed(self, link: Any, blocks: list[tuple[int, int]]) -> None: ...

    @property
    def download_limited(self) -> bool: ...

    async def take_download(self, nbytes: int) -> None: ...

    async def block_received(self, link: Any, index: int, begin: int, block: bytes) -> None: ...

    async def store_block(self, link: Any, index: int, begin: int, block: bytes) -> None: ...

    async def read_block(self, index: int, begin: int, length: int) -> memoryview: ...

    def may_serve(self, link: Any, index: int) -> bool: ...

    async def wake_requesters(self) -> None: ...

    def peer_have(self, link: Any, index: int) -> None: ...

    def peer_bitfield(self, link: Any, bits: bytes | None) -> None: ...

    def peer_has_none(self, link: Any) -> None: ...

    def peer_requested(self, link: Any, now: float) -> None: ...

    @property
    def complete(self) -> bool: ...

    def requested_from(self, link: Any, index: int, begin: int) -> bool: ...

    def block_length(self, index: int, begin: int) -> int: ...

    def download_rate(self, link: Any, now: float) -> float: ...

    def pick(self, link: Any, count: int, now: float) -> list[Block]: ...

    def peer_interested(self, link: Any, interested: bool) -> None: ...

    def we_interested(self, link: Any, interested: bool, now: float) -> None: ...

    async def on_extended(self, link: Any, ev: pw.Extended) -> None: ...
