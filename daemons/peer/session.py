"""What a peer daemon shares across its torrents.

The :class:`Session` holds the peer_id, the listening socket, the torrents by
info-hash, the bans, and the global upload and download throttles (token
buckets, which is also how an experiment gives each node its own upload
capacity). The session owns every stream's lifetime: incoming connections are
accepted and handshaken here, outgoing ones dialled (from the listen address,
so a peer on 127.0.0.7 is seen as 127.0.0.7 by everyone) and handshaken here
when a torrent asks (:meth:`Session.dial`); either way the stream is handed
to its torrent's :meth:`~shoal.daemons.peer.torrent.Torrent.attach` for as
long as the link runs, and closed here when that returns, however it ends.

Admission (docs/peer.md): one source address may hold at most
``max_per_address`` incoming connections; handshakes in progress are capped
at the hard connection limit per torrent, and each must finish within
``handshake_timeout``. Bans are graded and expire (core.swarm.bans): they
name a peer of one torrent (address and port, or address and peer_id),
never a whole address.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import trio

from shoal.core.swarm.bans import BanList
from shoal.daemons.peer.config import PeerConfig
from shoal.daemons.peer.metrics import PeerMetrics
from shoal.daemons.peer.throttle import Throttle
from shoal.daemons.peer.torrent import CONNECT_TIMEOUT, Torrent
from shoal.daemons.runtime.config import ListenAddr
from shoal.protocol import peer_wire as pw
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.metainfo import Metainfo

log = logging.getLogger("shoal.peer")

# Peers with offences remembered, at most this many (oldest dropped first).
MAX_BANS = 10_000
RECEIVE_SIZE = 65536
# One tracker exchange (HTTP request, or one UDP try) must finish in this time.
TRACKER_TIMEOUT = 5.0
# A failed announce is retried after 15 s, doubling up to 10 min (the usual
# announce interval is 30 min; a tracker that is back is found soon enough).
ANNOUNCE_RETRY_FIRST = 15.0
ANNOUNCE_RETRY_MAX = 600.0


def make_peer_id(prefix: str) -> bytes:
    return prefix.encode() + os.urandom(6).hex().encode()


class Session:
    def __init__(self, config: PeerConfig, metrics_registry, download_dir: Path, resume_dir: Path) -> None:
        self.config = config
        self.peer_id = make_peer_id(config.peer.peer_id_prefix)
        self.download_dir = download_dir
        self.resume_dir = resume_dir
        self.torrents: dict[bytes, Torrent] = {}
        self.bans = BanList(max_keys=MAX_BANS)
        self.listen_addr: ListenAddr | None = None
        self.upload_throttle = Throttle(config.limits.upload_rate)
        self.download_throttle = Throttle(config.limits.download_rate)
        self.metrics = PeerMetrics(metrics_registry, self.gauges)
        try:
            self.version = version("shoal")
        except PackageNotFoundError:
            self.version = "0"
        self._nursery: trio.Nursery | None = None
        self._handshaking = 0  # incoming connections not yet handshaken
        self._per_address: collections.Counter[str] = collections.Counter()  # incoming, by source IP
        # Not config keys (yet): tests and experiments set them on the session.
        self.tracker_timeout = TRACKER_TIMEOUT
        self.announce_retry_first = ANNOUNCE_RETRY_FIRST
        self.announce_retry_max = ANNOUNCE_RETRY_MAX

    # -- running -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            listen = self.config.peer.listen
            if listen is not None:
                self.listen_addr = await nursery.start(self._serve, listen)
            task_status.started(self.listen_addr)

    async def _serve(self, listen: ListenAddr, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        sockname = listeners[0].socket.getsockname()
        task_status.started(ListenAddr(sockname[0], sockname[1]))
        await trio.serve_listeners(self._accept, listeners)

    async def add(self, meta: Metainfo, save_dir: Path | None = None, *, upload_rate: int = 0,
                  download_rate: int = 0) -> Torrent:
        """Start a torrent; its own rate limits (bytes/s, 0 = none) apply within the global ones."""
        if meta.info_hash in self.torrents:
            return self.torrents[meta.info_hash]
        if len(self.torrents) >= self.config.peer.max_torrents:
            raise ValueError(f"already {len(self.torrents)} torrents (peer.max_torrents)")
        torrent = Torrent(self, meta, save_dir or self.download_dir)
        torrent.set_limits(upload_rate, download_rate)
        self.torrents[meta.info_hash] = torrent
        assert self._nursery is not None, "Session.add before Session.run started"
        try:
            await self._nursery.start(self._run_torrent, torrent)
        except BaseException:
            self.torrents.pop(meta.info_hash, None)
            raise
        return torrent

    async def _run_torrent(self, torrent: Torrent, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await torrent.run(task_status=task_status)
        finally:
            self.torrents.pop(torrent.info_hash, None)

    def remove(self, info_hash: bytes) -> bool:
        torrent = self.torrents.get(info_hash)
        if torrent is None:
            return False
        torrent.stop()
        return True

    def gauges(self) -> dict[str, int]:
        links = [link for t in self.torrents.values() for link in t.links]
        return {
            "torrents": len(self.torrents),
            "peers": len(links),
            "peers_unchoked": sum(not link.am_choking for link in links),
            "peers_interested": sum(link.peer_interested for link in links),
            "peers_unchoking_this_peer": sum(not link.peer_choking for link in links),
        }

    # -- bans --------------------------------------------------------------------

    def offend(self, info_hash: bytes, keys: list[tuple[str, object]], reason: str, points: int = 1) -> bool:
        """Count an offence against a peer of one torrent; True if it is now banned."""
        self.metrics.offences.labels(reason).inc()
        until = self.bans.offend([(info_hash, *k) for k in keys], reason, trio.current_time(), points)
        if until is None:
            return False
        self.metrics.bans.labels(reason).inc()
        log.info("banned %s for %.0fs (%s)", keys[0][0], until - trio.current_time(), reason)
        return True

    def banned(self, info_hash: bytes, keys: list[tuple[str, object]]) -> str | None:
        """Why a peer of this torrent is banned now, or None."""
        return self.bans.banned([(info_hash, *k) for k in keys], trio.current_time())

    def ban_address(self, addr: tuple[str, int], reason: str) -> None:
        """Forget an address without banning its IP (e.g. ourselves)."""
        self.metrics.bans.labels(reason).inc()
        for t in self.torrents.values():
            t.forget_address(addr)

    # -- connections ---------------------------------------------------------------

    @property
    def local_host(self) -> str | None:
        """The address we listen on, used as the source of outgoing traffic."""
        if self.listen_addr is None or self.listen_addr.host in ("0.0.0.0", "::"):
            return None
        return self.listen_addr.host

    async def connect(self, addr: tuple[str, int]) -> trio.SocketStream:
        local = self.local_host
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            if local and (":" in local) == (family == socket.AF_INET6):
                await sock.bind((local, 0))
            await sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        stream = trio.SocketStream(sock)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return stream

    def _new_conn(self, num_pieces: int | None) -> pw.PeerConnection:
        return pw.PeerConnection(num_pieces=num_pieces)

    async def handshake_out(self, stream: trio.SocketStream, info_hash: bytes,
                            num_pieces: int | None) -> pw.PeerConnection:
        """Our handshake out, theirs back; ``num_pieces`` None while metadata is unknown."""
        conn = self._new_conn(num_pieces)
        await stream.send_all(conn.send(pw.Handshake(info_hash, self.peer_id)))
        hs = await _receive_handshake(stream, conn)
        if hs.info_hash != info_hash:
            raise RemoteProtocolError("peer answered for another torrent", "wrong_info_hash")
        return conn

    async def dial(self, torrent: Torrent, addr: tuple[str, int]) -> bool:
        """Connect to ``addr`` for ``torrent``, handshake, and run the link until it ends.

        False when the connection or the handshake failed (the torrent tries
        again later). The stream is closed here, however the link ends.
        """
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await self.connect(addr)
        except (OSError, trio.TooSlowError) as exc:
            log.debug("dial %s:%d failed: %s", *addr, exc)
            return False
        try:
            try:
                with trio.fail_after(self.config.peer.handshake_timeout):
                    conn = await self.handshake_out(stream, torrent.info_hash, torrent.meta.num_pieces)
            except (RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                log.debug("handshake with %s:%d failed: %s", *addr, exc)
                return False
            await torrent.attach(stream, conn, addr, outgoing=True)
            return True
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _accept(self, stream: trio.SocketStream) -> None:
        """An incoming connection: admitted, handshaken, run by its torrent, then closed here."""
        try:
            await self._accepted(stream)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _accepted(self, stream: trio.SocketStream) -> None:
        addr = stream.socket.getpeername()[:2]
        cfg = self.config.peer
        refused = None
        if self._per_address[addr[0]] >= cfg.max_per_address:
            refused = "per_address"
        elif self._handshaking >= cfg.max_connections_hard * max(1, len(self.torrents)):
            refused = "handshakes"
        if refused:
            self.metrics.disconnects.labels(refused).inc()
            return
        self._per_address[addr[0]] += 1
        self._handshaking += 1
        handshaking = True
        try:
            conn = self._new_conn(None)
            try:
                with trio.fail_after(cfg.handshake_timeout):
                    hs = await _receive_handshake(stream, conn)
                    torrent = self.torrents.get(hs.info_hash)
                    if torrent is None:
                        raise RemoteProtocolError("no such torrent here", "wrong_info_hash")
                    conn.set_num_pieces(torrent.meta.num_pieces)
                    await stream.send_all(conn.send(pw.Handshake(hs.info_hash, self.peer_id)))
            except (RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
                reason = getattr(exc, "reason", "handshake")
                log.debug("incoming %s:%d: %s", *addr, exc)
                if isinstance(exc, RemoteProtocolError):
                    self.metrics.protocol_errors.labels(reason).inc()
                elif isinstance(exc, trio.TooSlowError):
                    self.metrics.disconnects.labels("handshake_timeout").inc()
                return
            self._handshaking -= 1
            handshaking = False
            # The incoming connection's source port is ephemeral; remember
            # nothing about it for dialling.
            await torrent.attach(stream, conn, addr, outgoing=False)
        finally:
            if handshaking:
                self._handshaking -= 1
            self._per_address[addr[0]] -= 1
            if not self._per_address[addr[0]]:
                del self._per_address[addr[0]]


async def _receive_handshake(stream: trio.SocketStream, conn: pw.PeerConnection) -> pw.Handshake:
    while True:
        event = conn.next_event()
        if event is pw.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data)
            continue
        if isinstance(event, pw.Handshake):
            return event
        raise RemoteProtocolError("connection closed during the handshake", "bad_handshake")


__all__ = ["Session", "Throttle", "make_peer_id", "partial"]
