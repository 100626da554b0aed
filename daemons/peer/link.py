"""One connection to one peer: the trio shell around ``protocol.peer_wire``.

A :class:`PeerLink` runs three tasks in one nursery:

* the reader turns bytes into events and acts on them (choke state, piece
  availability, incoming blocks, requests to serve);
* the writer sends queued frames, in order, from a bounded channel, so a peer
  that stops reading blocks our sends instead of growing memory;
* the uploader serves the peer's requests one block at a time, through the
  session's upload throttle, and only while we unchoke it.

Domain decisions (which blocks to ask for, whom to unchoke) are made by the
torrent's picker and choker; the link reports facts to them and carries out
what they decide. A ``RemoteProtocolError`` ends the link at its boundary:
the torrent counts it by reason and bans the address. The link knows its
torrent only as a :class:`~shoal.daemons.peer.interfaces.TorrentHost`.
"""

from __future__ import annotations

import collections
import logging

import trio

from shoal.core.swarm.picker import queue_depth
from shoal.daemons.peer.interfaces import Banned, TorrentHost
from shoal.protocol import peer_wire as pw

log = logging.getLogger("shoal.peer")

# Frames waiting for the writer. A 16 KiB block is the largest common frame,
# so this bounds a link's send buffer to about 2 MiB.
SEND_QUEUE = 128
# Requests a peer may have queued with us (libtorrent advertises reqq 500).
MAX_PEER_REQUESTS = 500
# How long a peer may stay silent before we give up (BEP 3 keep-alives come
# every 2 minutes), and how often we send our own keep-alive.
IDLE_TIMEOUT = 180.0
KEEPALIVE = 90.0
RECEIVE_SIZE = 256 * 1024
# Blocks never requested that a peer may send before it is banned.
MAX_UNREQUESTED = 8
# Queued frames are joined into writes of up to this many bytes.
WRITE_COALESCE = 256 * 1024
# Recently cancelled blocks remembered per link, so a late one is no offence.
MAX_CANCELLED = 2048


class PeerLink:
    def __init__(self, torrent: TorrentHost, stream: trio.SocketStream, conn: pw.PeerConnection,
                 addr: tuple[str, int], peer_id: bytes, outgoing: bool) -> None:
        self.torrent = torrent
        self.stream = stream
        self.conn = conn
        self.addr = addr
        self.peer_id = peer_id
        self.outgoing = outgoing
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        self.ext: pw.ExtHandshake | None = None
        self.pex_sent: set[tuple[str, int]] = set()  # addresses this peer has heard of from us
        self.requests: collections.deque[pw.Request] = collections.deque()
        self.requests_ready = trio.Event()
        self.sent_at: dict[tuple[int, int], float] = {}
        self.uploaded = 0
        self.downloaded = 0
        self.unrequested = 0
        # Blocks we cancelled or released: they may still arrive (a Cancel
        # crosses the Piece in flight), and are then dropped without blame.
        self.cancelled: dict[tuple[int, int], None] = {}
        self.closed = False
        self._send, self._outbox = trio.open_memory_channel[bytes](SEND_QUEUE)
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<peer {self.addr[0]}:{self.addr[1]}>"

    # -- sending ---------------------------------------------------------------

    async def send(self, event) -> None:
        await self._send.send(self.conn.send(event))

    def send_nowait(self, event) -> bool:
        """Queue a small control frame without blocking; False if the queue is full."""
        try:
            self._send.send_nowait(self.conn.send(event))
        except trio.WouldBlock:
            return False
        return True

    async def _writer(self) -> None:
        """Send queued frames, joining whatever is already waiting into one write.

        A burst of Requests, or several Piece messages, then costs one system
        call instead of one each.
        """
        async for frame in self._outbox:
            frames, size = [frame], len(frame)
            while size < WRITE_COALESCE:
                try:
                    frame = self._outbox.receive_nowait()
                except trio.WouldBlock:
                    break
                frames.append(frame)
                size += len(frame)
            await self.stream.send_all(frames[0] if len(frames) == 1 else b"".join(frames))

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(KEEPALIVE)
            self.send_nowait(pw.KeepAlive())

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._uploader)
                nursery.start_soon(self._keepalive)
                try:
                    await self._reader()
                finally:
                    nursery.cancel_scope.cancel()

    def abort(self) -> None:
        """End this link now (another task decided the peer is not to be trusted)."""
        self._scope.cancel()

    async def _reader(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is pw.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT) as idle:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if idle.cancelled_caught:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, pw.ConnectionClosed):
                return
            await self._handle(event)

    # -- events ----------------------------------------------------------------

    async def _handle(self, ev) -> None:  # noqa: C901 - one dispatch on the message type
        t = self.torrent
        kind = type(ev)
        if kind is pw.Piece:
            await self._on_piece(ev)
        elif kind is pw.Request:
            self._on_request(ev)
        elif kind is pw.Have:
            t.picker.peer_have(self, ev.index)
            t.on_peer_pieces(self, ev.index)
            if not t.picker.have(ev.index):
                await self._set_interested(True)
        elif kind is pw.Unchoke:
            self.peer_choking = False
            self.fill_requests()
        elif kind is pw.Choke:
            self.peer_choking = True
            self._release_requests()
            await t.wake_requesters()  # the released blocks can go to other peers now
        elif kind is pw.Interested:
            self.peer_interested = True
            t.choker.set_interested(self, True)
            t.wake_choker.set()  # a free slot is filled now, not at the next tick
        elif kind is pw.NotInterested:
            self.peer_interested = False
            t.choker.set_interested(self, False)
        elif kind is pw.Bitfield:
            t.picker.peer_bitfield(self, ev.bits)
            t.on_peer_pieces(self, None)
            await self._set_interested(not t.picker.complete)
        elif kind is pw.HaveAll:
            t.picker.peer_have_all(self)
            t.on_peer_pieces(self, None)
            await self._set_interested(not t.picker.complete)
        elif kind is pw.HaveNone:  # a later one replaces what the peer had (aria2 sends it twice)
            t.picker.peer_bitfield(self, ())
        elif kind is pw.Cancel:
            for r in list(self.requests):
                if (r.index, r.begin, r.length) == (ev.index, ev.begin, ev.length):
                    self.requests.remove(r)
        elif kind is pw.RejectRequest:
            t.picker.request_failed(self, ev.index, ev.begin)
            self.forget_request(ev.index, ev.begin)
            await t.wake_requesters()
        elif kind is pw.Extended:
            await t.on_extended(self, ev)
        # KeepAlive, Port, SuggestPiece, AllowedFast: nothing to do.

    async def _set_interested(self, interested: bool) -> None:
        if interested != self.am_interested:
            self.am_interested = interested
            await self.send(pw.Interested() if interested else pw.NotInterested())
            self.torrent.choker.set_we_interested(self, interested, trio.current_time())

    def forget_request(self, index: int, begin: int) -> None:
        """We no longer want (index, begin) from this peer; it may still arrive."""
        if self.sent_at.pop((index, begin), None) is not None:
            self.cancelled[(index, begin)] = None
            if len(self.cancelled) > MAX_CANCELLED:
                del self.cancelled[next(iter(self.cancelled))]

    def cancel(self, index: int, begin: int, length: int) -> None:
        self.forget_request(index, begin)
        self.send_nowait(pw.Cancel(index, begin, length))

    def _release_requests(self) -> None:
        for key in list(self.sent_at):
            self.torrent.picker.request_failed(self, *key)
            self.forget_request(*key)

    async def _on_piece(self, ev: pw.Piece) -> None:
        t = self.torrent
        key = (ev.index, ev.begin)
        sent = self.sent_at.pop(key, None)
        if sent is None and not t.picker.is_requested(self, ev.index, ev.begin):
            if self.cancelled.pop(key, 0) is None:
                return  # we cancelled it; it crossed our Cancel in flight
            # A block we never asked this peer for: a peer that keeps sending
            # them is wasting our bandwidth on purpose.
            self.unrequested += 1
            if self.unrequested > MAX_UNREQUESTED:
                raise Banned("unrequested_piece", f"{self} sent {self.unrequested} unrequested blocks")
            return
        if len(ev.block) != t.picker.block(ev.index, ev.begin).length:
            raise Banned("protocol", f"{self} sent a block of the wrong length")
        now = trio.current_time()
        if sent is not None:
            t.metrics.request_latency.observe(now - sent)
        n = len(ev.block)
        self.downloaded += n
        t.downloaded += n
        t.metrics.down.inc(n)
        t.choker.record_download(self, n, now)
        await t.take_download(n)
        for other in t.picker.block_received(self, ev.index, ev.begin):
            other.cancel(ev.index, ev.begin, n)
        await t.store_block(self, ev.index, ev.begin, ev.block)
        self.fill_requests()

    def _on_request(self, ev: pw.Request) -> None:
        t = self.torrent
        if self.am_choking or not t.storage.is_verified(ev.index) or (
                t.super is not None and not t.super.may_serve(self, ev.index)):
            if self.conn.fast:
                self.send_nowait(pw.RejectRequest(ev.index, ev.begin, ev.length))
            return
        if len(self.requests) >= MAX_PEER_REQUESTS:
            if self.conn.fast:
                self.send_nowait(pw.RejectRequest(ev.index, ev.begin, ev.length))
            return
        self.requests.append(ev)
        self.requests_ready.set()

    async def _uploader(self) -> None:
        t = self.torrent
        while True:
            if not self.requests:
                self.requests_ready = trio.Event()
                await self.requests_ready.wait()
                continue
            r = self.requests.popleft()
            await t.take_upload(r.length)
            if self.am_choking:
                # Choked while this one waited for tokens: set_choking rejected
                # the queue, but not the request already taken from it.
                if self.conn.fast:
                    self.send_nowait(pw.RejectRequest(r.index, r.begin, r.length))
                continue
            block = await t.read_block(r.index, r.begin, r.length)
            await self.send(pw.Piece(r.index, r.begin, block))
            self.uploaded += r.length
            t.uploaded += r.length
            t.metrics.up.inc(r.length)
            t.choker.record_upload(self, r.length, trio.current_time())

    # -- choking and requesting ---------------------------------------------------

    def set_choking(self, choking: bool) -> None:
        if choking == self.am_choking:
            return
        self.am_choking = choking
        if choking:
            if self.conn.fast:
                for r in self.requests:
                    self.send_nowait(pw.RejectRequest(r.index, r.begin, r.length))
            self.requests.clear()
            self.send_nowait(pw.Choke())
        else:
            self.send_nowait(pw.Unchoke())

    def fill_requests(self) -> None:
        """Keep enough requests in flight to this peer to keep its link busy."""
        t = self.torrent
        if self.closed or self.peer_choking or t.picker.complete:
            return
        now = trio.current_time()
        depth = queue_depth(t.choker.download_rate(self, now))
        want = depth - len(self.sent_at)
        if want <= 0:
            return
        self.send_requests(t.picker.pick(self, None, want, now), now)

    def send_requests(self, blocks, now: float) -> None:
        """Send Requests for blocks the picker just assigned to this peer."""
        for b in blocks:
            self.sent_at[(b.index, b.begin)] = now
            if not self.send_nowait(pw.Request(b.index, b.begin, b.length)):
                # Our own queue to this peer is full: hand the block back.
                del self.sent_at[(b.index, b.begin)]
                self.torrent.picker.request_failed(self, b.index, b.begin)

