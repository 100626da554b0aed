"""One connection to one peer: the trio shell around ``protocol.peer_wire``.

A :class:`PeerLink` runs three tasks in one nursery:

* the reader turns bytes into events and acts on them (choke state, piece
  availability, incoming blocks, requests to serve);
* the writer sends queued frames from two lanes. The *control lane* (every
  message but Piece: Choke, Have, Request, PEX, metadata, ...) always goes
  first and is never dropped; the *upload lane* carries Piece messages and
  holds at most ``UPLOAD_WATERMARK`` bytes, so a peer that stops reading
  blocks our uploader instead of growing memory, and still learns, as soon
  as it reads again, that we choked it or have a new piece. A peer that lets
  ``CONTROL_LIMIT`` bytes of control messages pile up is not reading at all
  and is disconnected (a message is never silently lost);
* the uploader serves the peer's requests one block at a time, through the
  session's upload throttle, and only while we unchoke it. Choking drops the
  blocks still waiting in the upload lane (rejected, with BEP 6).

The four BEP 3 choke/interest flags live in one place, the protocol's
:class:`~shoal.protocol.peer_wire.PeerConnection` (set as messages are
parsed and queued); the link only reads them.

Domain decisions (which blocks to ask for, whom to unchoke, what a received
block means) are the torrent's; the link reports facts to it through methods
(a Have, a block, a reject, bytes moved) and asks it through methods (what to
request, what it may serve), never reaching into its picker or choker. A
``RemoteProtocolError`` ends the link at its boundary: the torrent counts
it by reason and bans the address. The link knows its torrent only as a
:class:`~shoal.daemons.peer.interfaces.TorrentHost`, and does not own its
stream: the session opened it and closes it when the link has ended.
"""

from __future__ import annotations

import collections
import logging

import trio

from shoal.core.swarm.picker import queue_depth
from shoal.daemons.peer.interfaces import Banned, TorrentHost
from shoal.protocol import peer_wire as pw

log = logging.getLogger("shoal.peer")

# Piece bytes that may wait for the writer (libtorrent's send buffer
# watermark is 500 KiB): our uploader waits below this.
UPLOAD_WATERMARK = 512 * 1024
# Control bytes that may wait: Haves for every piece of a large torrent, PEX
# and metadata replies fit many times over. Beyond this the peer is not
# reading at all and is disconnected.
CONTROL_LIMIT = 1 << 20
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
# Buffers given to one sendmsg (Linux's IOV_MAX is 1024).
IOV_MAX = 512
# Recently cancelled blocks remembered per link, so a late one is no offence.
MAX_CANCELLED = 2048


class PeerLink:
    def __init__(self, torrent: TorrentHost, stream: trio.SocketStream, conn: pw.PeerConnection,
                 addr: tuple[str, int], peer_id: bytes, outgoing: bool, *,
                 first_message_timeout: float = IDLE_TIMEOUT) -> None:
        self.torrent = torrent
        self.first_message_timeout = first_message_timeout
        self.stream = stream
        self.conn = conn
        self.addr = addr
        self.peer_id = peer_id
        self.outgoing = outgoing
        self.ext: pw.ExtHandshake | None = None
        self.pex_sent: set[tuple[str, int]] = set()  # addresses this peer has heard of from us
        self.requests: collections.deque[pw.Request] = collections.deque()
        self.requests_ready = trio.Event()
        self.sent_at: dict[tuple[int, int], float] = {}
        self.uploaded = 0
        self.downloaded = 0
        self.unrequested = 0
        self._depth = 0  # requests to keep in flight, as last worked out by fill_requests
        # Blocks we cancelled or released: they may still arrive (a Cancel
        # crosses the Piece in flight), and are then dropped without blame.
        self.cancelled: dict[tuple[int, int], None] = {}
        self.closed = False
        now = trio.current_time()
        self.joined = now
        self.last_payload = now  # last Piece in either direction (eviction ranks by it)
        self.messages = 0  # messages received, keep-alives excepted
        self.close_reason = ""  # why we ended the link (an eviction, a full control lane)
        self._control: collections.deque[bytes] = collections.deque()
        self._control_bytes = 0
        self._upload: collections.deque[tuple[bytes, bytes | memoryview, pw.Request]] = collections.deque()
        self._upload_bytes = 0
        self._wake_writer = trio.Event()
        self._upload_room = trio.Event()
        self._scope = trio.CancelScope()

    def __repr__(self) -> str:
        return f"<peer {self.addr[0]}:{self.addr[1]}>"

    def ban_keys(self) -> list[tuple[str, object]]:
        """What names this peer for bans (core.swarm.bans): its peer_id, and its
        listening port when known (we dialled it, or its BEP 10 handshake said)."""
        keys: list[tuple[str, object]] = [(self.addr[0], self.peer_id)]
        if self.outgoing:
            keys.append(self.addr)
        elif self.ext is not None and self.ext.p:
            keys.append((self.addr[0], self.ext.p))
        return keys

    # -- the four flags, kept by the protocol's connection state --------------

    @property
    def am_choking(self) -> bool:
        return self.conn.am_choking

    @property
    def am_interested(self) -> bool:
        return self.conn.am_interested

    @property
    def peer_choking(self) -> bool:
        return self.conn.peer_choking

    @property
    def peer_interested(self) -> bool:
        return self.conn.peer_interested

    # -- sending ---------------------------------------------------------------

    def send_nowait(self, event) -> None:
        """Queue a control message (anything but Piece); it goes before any queued block.

        Never blocks and never drops: a peer whose control lane overflows is
        disconnected instead.
        """
        if self.closed:
            return
        frame = self.conn.send(event)
        self._control.append(frame)
        self._control_bytes += len(frame)
        self._wake_writer.set()
        if self._control_bytes > CONTROL_LIMIT:
            log.info("%s does not read (%d control bytes waiting): closing", self, self._control_bytes)
            self.close("control_overflow")

    async def send(self, event) -> None:
        """Queue a control message (kept for callers that await)."""
        self.send_nowait(event)

    async def _send_block(self, r: pw.Request, block: bytes | memoryview) -> None:
        """Queue a Piece in the upload lane, waiting while the lane is at its watermark."""
        while self._upload_bytes >= UPLOAD_WATERMARK:
            self._upload_room = trio.Event()
            await self._upload_room.wait()
        if self.am_choking:  # choked while it waited: set_choking rejected the queue, not this one
            if self.conn.fast:
                self.send_nowait(pw.RejectRequest(r.index, r.begin, r.length))
            return
        if len(block) != r.length:
            raise ValueError(f"block {r.index}:{r.begin} is {len(block)} bytes, not {r.length}")
        header = self.conn.piece_header(r.index, r.begin, r.length)
        self._upload.append((header, block, r))
        self._upload_bytes += len(header) + len(block)
        self._wake_writer.set()

    async def _writer(self) -> None:
        """Send the control lane, then blocks, joining what is waiting into one write.

        A burst of Requests, or several Piece messages, then costs one system
        call instead of one each. Piece bytes are counted as uploaded once
        they are written to the socket.
        """
        t = self.torrent
        while True:
            if not self._control and not self._upload:
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
                continue
            frames: list = list(self._control)
            size = self._control_bytes
            self._control.clear()
            self._control_bytes = 0
            sent = 0
            while self._upload and size < WRITE_COALESCE:
                header, block, r = self._upload.popleft()
                n = len(header) + len(block)
                self._upload_bytes -= n
                frames.append(header)
                frames.append(block)
                size += n
                sent += r.length
            if self._upload_bytes < UPLOAD_WATERMARK:
                self._upload_room.set()
            await self._send_frames(frames)
            if sent:
                now = trio.current_time()
                self.last_payload = now
                self.uploaded += sent
                t.uploaded_to(self, sent, now)

    async def _send_frames(self, frames: list) -> None:
        """Write ``frames`` (bytes and block views) in order, with as few system calls as may be.

        Blocks are views of cached pieces: a socket stream gets them by
        scatter-gather (``sendmsg``), uncopied; any other stream one joined write.
        """
        sock = getattr(self.stream, "socket", None)
        if sock is None or len(frames) == 1:
            await self.stream.send_all(frames[0] if len(frames) == 1 else b"".join(frames))
            return
        views = [memoryview(f) for f in frames]
        first = 0
        while first < len(views):
            n = await sock.sendmsg(views[first:first + IOV_MAX])
            while n:
                v = views[first]
                if n >= len(v):
                    n -= len(v)
                    first += 1
                else:
                    views[first] = v[n:]
                    n = 0

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

    def close(self, reason: str) -> None:
        """End this link now for ``reason`` (a metric label: see metrics.CLOSE_REASONS)."""
        if not self.close_reason:
            self.close_reason = reason
        self._scope.cancel()

    async def _reader(self) -> None:
        """Read and act on messages. The first one must come within the
        session's ``first_message_timeout`` (a peer that handshakes and then
        says nothing is holding a slot for nothing), later ones within
        ``IDLE_TIMEOUT``."""
        conn = self.conn
        first = self.first_message_timeout
        while True:
            event = conn.next_event()
            if event is pw.NEED_DATA:
                with trio.move_on_after(IDLE_TIMEOUT if self.messages else first) as idle:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                if idle.cancelled_caught:
                    self.close("idle" if self.messages else "silent")
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, pw.ConnectionClosed):
                return
            if type(event) is not pw.KeepAlive:
                self.messages += 1
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
            t.peer_have(self, ev.index)
        elif kind is pw.Unchoke:  # the connection state has the flag already
            self.fill_requests()
        elif kind is pw.Choke:
            await self._release_requests()  # the blocks can go to other peers now
        elif kind is pw.Interested:
            t.peer_interested(self, True)
        elif kind is pw.NotInterested:
            t.peer_interested(self, False)
        elif kind is pw.Bitfield:
            t.peer_bitfield(self, ev.bits)
        elif kind is pw.HaveAll:
            t.peer_bitfield(self, None)
        elif kind is pw.HaveNone:  # a later one replaces what the peer had (aria2 sends it twice)
            t.peer_has_none(self)
        elif kind is pw.Cancel:
            for r in list(self.requests):
                if (r.index, r.begin, r.length) == (ev.index, ev.begin, ev.length):
                    self.requests.remove(r)
        elif kind is pw.RejectRequest:
            self.forget_request(ev.index, ev.begin)
            await t.requests_failed(self, [(ev.index, ev.begin)])
        elif kind is pw.Extended:
            await t.on_extended(self, ev)
        # KeepAlive, Port, SuggestPiece, AllowedFast: nothing to do.

    def set_interested(self, interested: bool) -> None:
        if interested != self.am_interested:
            self.send_nowait(pw.Interested() if interested else pw.NotInterested())
            self.torrent.we_interested(self, interested, trio.current_time())

    def forget_request(self, index: int, begin: int) -> None:
        """We no longer want (index, begin) from this peer; it may still arrive."""
        if self.sent_at.pop((index, begin), None) is not None:
            self.cancelled[(index, begin)] = None
            if len(self.cancelled) > MAX_CANCELLED:
                del self.cancelled[next(iter(self.cancelled))]

    def cancel(self, index: int, begin: int, length: int) -> None:
        self.forget_request(index, begin)
        self.send_nowait(pw.Cancel(index, begin, length))

    async def _release_requests(self) -> None:
        keys = list(self.sent_at)
        for key in keys:
            self.forget_request(*key)
        await self.torrent.requests_failed(self, keys)

    async def _on_piece(self, ev: pw.Piece) -> None:
        t = self.torrent
        key = (ev.index, ev.begin)
        sent = self.sent_at.pop(key, None)
        if sent is None and not t.requested_from(self, ev.index, ev.begin):
            if self.cancelled.pop(key, 0) is None:
                return  # we cancelled it; it crossed our Cancel in flight
            # A block we never asked this peer for: a peer that keeps sending
            # them is wasting our bandwidth on purpose.
            self.unrequested += 1
            if self.unrequested > MAX_UNREQUESTED:
                raise Banned("unrequested_piece", f"{self} sent {self.unrequested} unrequested blocks")
            return
        if len(ev.block) != t.block_length(ev.index, ev.begin):
            raise Banned("protocol", f"{self} sent a block of the wrong length", points=1)
        now = trio.current_time()
        self.last_payload = now
        n = len(ev.block)
        self.downloaded += n
        t.downloaded_from(self, n, now, None if sent is None else now - sent)
        if t.download_limited:
            await t.take_download(n)
        await t.block_received(self, ev.index, ev.begin, ev.block)
        self.fill_requests()

    def _on_request(self, ev: pw.Request) -> None:
        t = self.torrent
        t.peer_requested(self, trio.current_time())
        if self.am_choking or not t.may_serve(self, ev.index):
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
            await self._send_block(r, block)

    # -- choking and requesting ---------------------------------------------------

    def set_choking(self, choking: bool) -> None:
        if choking == self.am_choking or self.closed:
            return
        if choking:
            # Blocks not yet written go no further: a choked peer is owed none.
            # (The uploader may also hold one waiting for room; it checks again.)
            dropped = [r for _header, _block, r in self._upload]
            self._upload.clear()
            self._upload_bytes = 0
            self._upload_room.set()
            self.send_nowait(pw.Choke())
            if self.conn.fast:
                for r in (*dropped, *self.requests):
                    self.send_nowait(pw.RejectRequest(r.index, r.begin, r.length))
            self.requests.clear()
        else:
            self.send_nowait(pw.Unchoke())

    def fill_requests(self) -> None:
        """Keep enough requests in flight to this peer to keep its link busy."""
        t = self.torrent
        if self.closed or self.peer_choking or t.complete:
            return
        # Top the queue up in steps of an eighth of its depth rather than one
        # block per block received: a pick costs about the same for one block
        # as for sixty, and the queue still never runs below 7/8 full. The
        # depth (from the measured rate) is worked out again only then.
        inflight = len(self.sent_at)
        if inflight and inflight > self._depth - (self._depth >> 3):
            return
        now = trio.current_time()
        self._depth = depth = queue_depth(t.download_rate(self, now))
        want = depth - inflight
        if want <= 0 or (want < depth >> 3 and inflight):
            return
        self.send_requests(t.pick(self, want, now), now)

    def send_requests(self, blocks, now: float) -> None:
        """Send Requests for blocks the picker just assigned to this peer."""
        for b in blocks:
            self.sent_at[(b.index, b.begin)] = now
            self.send_nowait(pw.Request(b.index, b.begin, b.length))

