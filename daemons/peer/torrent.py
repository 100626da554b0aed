"""One torrent's live state and the loops that drive it.

A :class:`Torrent` owns the picker, the choker, the storage and the links to
its peers. What happens to received data (a block kept or ignored, Cancels,
write batches, hash results and whom they blame, disk errors, peers gone,
requests rejected or timed out) is decided by the I/O-free
:class:`~shoal.core.swarm.torrent.TorrentCore`; the torrent feeds it events
and carries out the actions it returns (:meth:`Torrent._perform`). The
session owns the streams: it dials (:meth:`Torrent._dial` asks it), accepts,
handshakes, and closes each stream after :meth:`Torrent.attach` returns.
Its tasks:

* **announcer**: tells the trackers we are here (started, then every
  interval, completed once, stopped on the way out) and re-announces early,
  respecting the tracker's min interval, when fewer than ``reannounce_below``
  peers are connected (the seeds' rule);
* **connector**: dials known addresses up to the soft connection limit;
* **choker loop**: applies the choker's decisions every second (the choker
  itself recomputes every 10 s and rotates the optimistic unchoke every 30 s);
* **timeouts**: requests unanswered for ``request_timeout`` go to other peers;
* **pex**: every ``pex_interval`` each peer that speaks ut_pex (BEP 11) hears
  which listening addresses we connected to and lost since its last message
  (never for a ``private`` torrent, BEP 27: it learns peers from its trackers
  only, and neither offers nor acts on PEX).

Admission and eviction (docs/peer.md, the policy in core.swarm.admission): at
the soft connection limit a new connection replaces the least useful peer --
a seed when we are seeding too, then one not interested either way, then one
that has moved no block for 30 s, the longest idle first; with none of those
it is refused at the hard limit. Seeds disconnect from seeds. Offences close the
connection and count against that peer (core.swarm.bans).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar, cast

import trio

from shoal.core.swarm.admission import Candidate, admit, least_useful
from shoal.core.swarm.backoff import Backoff
from shoal.core.swarm.choker import Choker
from shoal.core.swarm.picker import BLOCK_SIZE, Block, PiecePicker
from shoal.core.swarm.superseed import SuperSeeder
from shoal.core.swarm.torrent import (
    Action,
    Cancel,
    HashFailed,
    PauseRequests,
    Refill,
    TorrentCore,
    Verified,
    Verify,
    Write,
)
from shoal.daemons.peer.announce import TrackerError, open_tracker
from shoal.daemons.peer.interfaces import Banned, Peer, SessionHost
from shoal.daemons.peer.link import PeerLink
from shoal.daemons.peer.storage import Storage
from shoal.daemons.peer.throttle import Throttle
from shoal.daemons.peer.webseed import WebSeed
from shoal.protocol import peer_wire as pw
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.metainfo import Metainfo
from shoal.protocol.tracker import Announce, Event, Failure

E = TypeVar("E", bound=BaseException)
log = logging.getLogger("shoal.peer")

# (How received blocks are buffered and batched for writing: core.swarm.torrent.)
# Batch writes (hash and write, in worker threads) running at once; a link
# that completes another piece waits for one of them.
WRITES_IN_FLIGHT = 8
# Resume data is saved this often while new pieces arrive.
RESUME_SAVE_INTERVAL = 10.0
# Whole pieces kept in memory for serving blocks.
READ_CACHE = 32 << 20
# Addresses we remember per torrent (from trackers, PEX, incoming peers).
MAX_KNOWN = 2000
CONNECT_TIMEOUT = 10.0
# A failed address is retried no sooner than this.
RETRY_AFTER = 30.0
# BEP 11: at most 50 added and 50 dropped peers in one message.
PEX_MAX = 50
# A peer unchoked this many times that never used its slot is disconnected.
MAX_STRIKES = 3
# Where an address was learned: BEP 27 allows only trackers (and the user)
# for a private torrent.
SOURCES = ("tracker", "manual", "pex", "magnet")


class Torrent:
    def __init__(self, session: SessionHost, meta: Metainfo, save_dir: Path) -> None:
        self.session = session
        self.meta = meta
        self.info_hash = meta.info_hash
        self.save_dir = save_dir
        cfg = session.config
        self.metrics = session.metrics
        rng = random.Random()
        self.storage = Storage(meta, save_dir, state_dir=session.resume_dir)
        self.picker = PiecePicker(meta.num_pieces, meta.piece_length, meta.total_length,
                                  random_first=cfg.picker.random_first, mode=cfg.picker.mode, rng=rng)
        c = cfg.choker
        self.choker = Choker(slots=c.slots, interval=c.interval, optimistic_interval=c.optimistic_interval,
                             snub_after=c.snub_after, seeding_policy=c.seeding_policy,
                             optimistic_slots=c.optimistic_slots, rate_window=c.rate_window,
                             request_grace=c.request_grace, rng=rng)
        self.links: set[PeerLink] = set()
        self.core = TorrentCore(self.picker)  # the decisions on received data (no I/O)
        self._write_slots = trio.Semaphore(WRITES_IN_FLIGHT)
        self.read_cache: collections.OrderedDict[int, memoryview] = collections.OrderedDict()
        self.read_cache_bytes = 0
        self.known: dict[tuple[str, int], float] = {}  # address -> earliest next dial time
        self.connecting: set[tuple[str, int]] = set()
        self.trackers = [url for tier in meta.announce_list for url in tier]
        self.uploaded = 0
        self.downloaded = 0
        self.state = "checking"
        self.completed = trio.Event()
        self.piece_verified = trio.Event()  # set and replaced at every verified piece
        self.peers_changed = trio.Event()  # set and replaced whenever a link joins or leaves
        self.wake_connector = trio.Event()
        self.wake_choker = trio.Event()
        self._reannounce = trio.Event()
        self._rounds_seen = 0
        self._cancel = trio.CancelScope()
        self.super: SuperSeeder | None = None  # set while super-seeding (BEP 16)
        self.upload_throttle = Throttle(0)  # this torrent's own limits, within the session's
        self.download_throttle = Throttle(0)

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel:
            await trio.to_thread.run_sync(self.storage.load_resume)
            for i in range(self.meta.num_pieces):
                if self.storage.is_verified(i):
                    self.picker.we_have(i)
            self._update_state()
            if self.session.config.peer.super_seed and self.picker.complete:
                self.super = SuperSeeder(self.meta.num_pieces, self.picker.peer_has, rng=random.Random())
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    nursery.start_soon(self._announcer)
                    nursery.start_soon(self._connector)
                    nursery.start_soon(self._choke_loop)
                    nursery.start_soon(self._timeouts)
                    nursery.start_soon(self._saver)
                    if self.session.config.peer.pex_interval > 0:
                        nursery.start_soon(self._pex)
                    if self.session.config.peer.web_seeds and not self.picker.complete:
                        for url in self.meta.url_list:
                            try:
                                nursery.start_soon(WebSeed(self, url).run)
                            except ValueError as exc:
                                log.warning("%s: %s", self.meta.name, exc)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.storage.close)

    def stop(self) -> None:
        self._cancel.cancel()

    def set_limits(self, upload_rate: int, download_rate: int) -> None:
        """This torrent's own rate limits, bytes/s (0: only the session's apply)."""
        if upload_rate < 0 or download_rate < 0:
            raise ValueError("rates must be >= 0")
        self.upload_throttle.set_rate(upload_rate)
        self.download_throttle.set_rate(download_rate)

    async def take_upload(self, nbytes: int) -> None:
        await self.upload_throttle.take(nbytes)
        await self.session.upload_throttle.take(nbytes)

    @property
    def download_limited(self) -> bool:
        """A download limit applies (else take_download returns at once: skip the await)."""
        return self.download_throttle.bucket is not None or self.session.download_throttle.bucket is not None

    async def take_download(self, nbytes: int) -> None:
        await self.download_throttle.take(nbytes)
        await self.session.download_throttle.take(nbytes)

    def _update_state(self) -> None:
        if self.picker.complete:
            if self.state != "seeding":
                self.state = "seeding"
                self.choker.set_seeding(True)
                self.completed.set()
        else:
            self.state = "downloading"

    def status(self) -> dict:
        now = trio.current_time()
        down = sum(self.choker.download_rate(link, now) for link in self.links)
        up = sum(self.choker.upload_rate(link, now) for link in self.links)
        left = self.left()
        return {
            "info_hash": self.info_hash.hex(), "name": self.meta.name, "state": self.state,
            "size": self.meta.total_length, "pieces": self.meta.num_pieces, "have": self.storage.num_verified,
            "peers": len(self.links), "uploaded": self.uploaded, "downloaded": self.downloaded,
            "down_rate": down, "up_rate": up, "left": left, "path": str(self.save_dir),
            "eta": left / down if down > 0 else None,
            "upload_limit": self.upload_throttle.rate, "download_limit": self.download_throttle.rate,
        }

    def left(self) -> int:
        """Bytes still to download (exact: the last piece may be short)."""
        have = sum(self.meta.piece_size(i) for i in range(self.meta.num_pieces) if self.storage.is_verified(i))
        return self.meta.total_length - have

    # -- pieces ------------------------------------------------------------------
    #
    # What to do with a received block, a written batch, a hash result or a
    # disk error is decided by the core (core.swarm.torrent); here its actions
    # are carried out: Cancels sent, batches written and hashed in worker
    # threads, Haves broadcast, offences counted.

    async def block_received(self, link: Peer, index: int, begin: int, block: bytes) -> None:
        """``link`` delivered a block it was asked for (the link has checked its length).

        The write of a batch runs as a task of its own: the link that
        delivered the last block goes on reading while its piece is hashed
        (waiting for the thread stalled the link once per piece). At most
        WRITES_IN_FLIGHT run at once; past that the caller waits here for one
        to finish.
        """
        await self._perform(self.core.block_received(link, index, begin, block))

    async def store_block(self, link: Peer, index: int, begin: int, block: bytes) -> None:
        """Buffer a block the caller has already reported to the picker (web seeds)."""
        await self._perform(self.core.buffer_block(index, begin, block))

    async def requests_failed(self, link: Peer, blocks: list[tuple[int, int]]) -> None:
        """``link`` rejected these (index, begin) requests, or choked us with them outstanding."""
        await self._perform(self.core.requests_failed(link, blocks))

    def uploaded_to(self, link: PeerLink, nbytes: int, now: float) -> None:
        """Piece bytes written to ``link``'s socket."""
        self.uploaded += nbytes
        self.metrics.up.inc(nbytes)
        self.choker.record_upload(link, nbytes, now)

    def downloaded_from(self, link: PeerLink, nbytes: int, now: float, latency: float | None = None) -> None:
        """Piece bytes received from ``link`` (counted before they are checked), ``latency``
        seconds after we asked for them (None: not known)."""
        if latency is not None:
            self.metrics.request_latency.observe(latency)
        self.downloaded += nbytes
        self.metrics.down.inc(nbytes)
        self.choker.record_download(link, nbytes, now)

    async def writes_done(self) -> None:
        """Wait until every batch write started so far is written and checked."""
        for _ in range(WRITES_IN_FLIGHT):
            await self._write_slots.acquire()
        for _ in range(WRITES_IN_FLIGHT):
            self._write_slots.release()

    async def _perform(self, actions: list[Action]) -> None:
        """Carry out the core's actions, in order."""
        for action in actions:
            match action:
                case Cancel(peer, index, begin, length):
                    cast(Peer, peer).cancel(index, begin, length)
                case Write():
                    # Shielded: the blocks are out of the core's buffer and
                    # counted as received, so they must reach the disk (or be
                    # released) even if the link that sent them is closed
                    # meanwhile (worker threads are not cancelled either).
                    with trio.CancelScope(shield=True):
                        await self._write_slots.acquire()
                    self.nursery.start_soon(self._write, action)
                case Verify(index):
                    try:
                        ok = await trio.to_thread.run_sync(self.storage.verify_piece, index)
                    except OSError as exc:
                        lost = self.core.piece_lost(index, trio.current_time())
                        self._disk_error("reading back", index, exc, lost)
                        await self._perform(lost)
                    else:
                        await self._perform(self.core.piece_checked(index, ok))
                case Verified():
                    await self._verified(action)
                case HashFailed():
                    self._hash_failed(action)
                case Refill():
                    await self.wake_requesters()
                case PauseRequests():
                    pass  # pick() asks the core; the request timeouts' sweep resumes after it

    async def _write(self, w: Write) -> None:
        """One batch write (and hash check), in a worker thread; a task of its own."""
        try:
            try:
                if w.whole:
                    ok = await trio.to_thread.run_sync(self.storage.write_piece, w.index, list(w.blocks))
                else:
                    await trio.to_thread.run_sync(self._write_batch, w.index, w.blocks)
            except OSError as exc:  # the disk, not the peer: the piece is fetched again
                actions = self.core.write_failed(w.index, trio.current_time())
                self._disk_error("writing", w.index, exc, actions)
            else:
                actions = self.core.write_done(w.index, ok if w.whole else None)
            await self._perform(actions)
        finally:
            self._write_slots.release()

    def _disk_error(self, what: str, index: int, exc: OSError, actions: list[Action]) -> None:
        """Count a disk error; log it in one line when it starts a pause (others at debug)."""
        self.metrics.disk_errors.inc()
        pause = next((a for a in actions if type(a) is PauseRequests), None)
        if pause is None:
            log.debug("%s: %s piece %d failed: %s", self.meta.name, what, index, exc)
            return
        log.error("%s: %s piece %d failed: %s; it is fetched again, no new requests for %.0f s",
                  self.meta.name, what, index, exc, cast(PauseRequests, pause).seconds)

    def _hash_failed(self, a: HashFailed) -> None:
        self.metrics.failed.inc()
        log.warning("piece %d failed its hash check (from %d peers)", a.index, len(a.senders))
        for culprit in a.senders:
            peer = cast(Peer, culprit)
            banned = self.session.offend(self.info_hash, self._ban_keys(peer), "bad_hash", a.points)
            if banned or a.certain:
                log.info("closing %s: sent piece %d with a wrong hash", peer, a.index)
                peer.abort()

    async def _verified(self, a: Verified) -> None:
        self.metrics.verified.inc()
        self.piece_verified.set()
        self.piece_verified = trio.Event()
        for other in list(self.links):
            other.send_nowait(pw.Have(a.index))
        if a.complete:
            self._update_state()
            await trio.to_thread.run_sync(self.storage.save_resume)
            log.info("%s: complete", self.meta.name)
            self._reannounce.set()
            for other in list(self.links):
                other.set_interested(False)
                if self.picker.is_seed(other):
                    other.close("seed_to_seed")

    def _write_batch(self, index: int, batch: tuple[tuple[int, bytes], ...]) -> None:
        for begin, block in batch:
            self.storage.write_block(index, begin, block)

    def may_serve(self, link: PeerLink, index: int) -> bool:
        """Whether ``link`` may have blocks of piece ``index`` (we have it; super-seeding allows it)."""
        return self.storage.is_verified(index) and (self.super is None or self.super.may_serve(link, index))

    async def read_block(self, index: int, begin: int, length: int) -> memoryview:
        """A block of a verified piece (a view of it), from a small cache of whole pieces.

        Peers request a piece's blocks one after another, so the piece is read
        once and its blocks are served from memory as slices of it, uncopied.
        The read is done on the event loop when the page cache has the whole
        piece (no thread hop), else in a worker thread.
        """
        piece = self.read_cache.get(index)
        if piece is None:
            piece = self.storage.read_piece_nowait(index)
            if piece is None:  # not all in the page cache: read it where waiting is harmless
                piece = memoryview(await trio.to_thread.run_sync(self.storage.read_piece, index))
            self.read_cache[index] = piece
            self.read_cache_bytes += len(piece)
            while self.read_cache_bytes > READ_CACHE and len(self.read_cache) > 1:
                _old, dropped = self.read_cache.popitem(last=False)
                self.read_cache_bytes -= len(dropped)
        else:
            self.read_cache.move_to_end(index)
        if begin + length > len(piece):
            raise ValueError(f"block {index}:{begin}+{length} is outside the piece")
        return piece[begin:begin + length]

    def stream(self, offset: int, rate: float) -> int:
        """Streaming (deadline) mode, as in the seeds' Spotify design.

        A reader starts at byte ``offset`` now and goes on at ``rate``
        bytes/s: piece i is due when the reader reaches its first byte.
        Deadlined pieces are picked before any other, in deadline order, and
        each urgent block goes to the peer expected to deliver it first (its
        queued bytes over its measured rate). Returns the pieces deadlined.
        """
        if not 0 <= offset < self.meta.total_length or not rate > 0:
            raise ValueError("offset must be inside the torrent and rate > 0")
        now = trio.current_time()
        plen = self.meta.piece_length
        first = offset // plen
        for i in range(first, self.meta.num_pieces):
            self.picker.set_deadline(i, now + max(0, i * plen - offset) / rate)
        self.nursery.start_soon(self.wake_requesters)
        return sum(1 for i in range(first, self.meta.num_pieces) if not self.storage.is_verified(i))

    async def wake_requesters(self) -> None:
        if self.picker.has_deadlines and self.core.may_request(trio.current_time()):
            now = trio.current_time()
            # A peer with no rate measured yet is assumed to do one block a
            # second, so new links get urgent work too.
            rates = {link: max(self.choker.download_rate(link, now), float(BLOCK_SIZE))
                     for link in self.links if not link.peer_choking and not link.closed}
            for link, blocks in self.picker.assign_urgent(rates, now).items():
                link.send_requests(blocks, now)
        for link in list(self.links):
            link.fill_requests()

    async def on_extended(self, link: PeerLink, ev: pw.Extended) -> None:
        if ev.ext_id == 0:
            link.ext = pw.decode_ext_handshake(ev.payload)
            if self.session.banned(self.info_hash, link.ban_keys()):
                link.close("banned")  # its listening port names a banned peer
        elif ev.ext_id == EXT_IDS["ut_pex"]:
            if self.meta.private:
                return  # BEP 27: we never offered ut_pex; a peer that sends it anyway is ignored
            pex = pw.decode_pex(ev.payload)
            self.add_addresses(list(pex.added) + list(pex.added6), "pex")
        elif ev.ext_id == EXT_IDS["ut_metadata"]:
            msg = pw.decode_metadata(ev.payload)
            their_id = link.ext.m.get("ut_metadata") if link.ext else None
            if isinstance(msg, pw.MetadataRequest) and their_id:
                raw = self.meta.raw_info
                start = msg.piece * pw.METADATA_PIECE
                if start < len(raw):
                    reply = pw.MetadataData(msg.piece, len(raw), raw[start:start + pw.METADATA_PIECE])
                else:
                    reply = pw.MetadataReject(msg.piece)
                link.send_nowait(pw.Extended(their_id, pw.encode_metadata(reply)))

    # -- peers -------------------------------------------------------------------

    def add_addresses(self, addrs: Iterable[tuple[str, int]], source: str = "manual") -> None:
        """Remember addresses to dial; ``source`` is one of SOURCES."""
        if source not in SOURCES:
            raise ValueError(f"unknown address source {source!r}")
        if self.meta.private and source not in ("tracker", "manual"):
            return  # BEP 27: a private torrent's peers come from its trackers only
        me = self.session.listen_addr
        added = False
        for addr in addrs:
            addr = (addr[0], int(addr[1]))
            if addr in self.known or (me is not None and addr == (me.host, me.port)):
                continue
            if len(self.known) >= MAX_KNOWN:
                break
            self.known[addr] = 0.0
            added = True
        if added:
            self.wake_connector.set()

    def forget_address(self, addr: tuple[str, int]) -> None:
        """Never dial ``addr`` again (unless it is learned again)."""
        self.known.pop(addr, None)

    async def attach(self, stream: trio.SocketStream, conn: pw.PeerConnection, addr: tuple[str, int],
                     outgoing: bool) -> None:
        """Run a link whose handshake is done, until it ends.

        The session owns the stream: it dialled or accepted it, and closes it
        when this returns.
        """
        if outgoing:
            self.connecting.discard(addr)  # a link now, no longer a dial
        peer_id = conn.their_handshake.peer_id
        refused = self._refuse(addr, peer_id, outgoing)
        if refused is not None:
            if refused:
                self.metrics.disconnects.labels(refused).inc()
            return
        link = PeerLink(self, stream, conn, addr, peer_id, outgoing,
                        first_message_timeout=self.session.config.peer.first_message_timeout)
        now = trio.current_time()
        # Greeting and joining happen with no await between them, so a Have
        # broadcast for a piece verified meanwhile is queued after our
        # bitfield, never before it.
        self._greet(link)
        self.links.add(link)
        self.choker.add_peer(link, now)
        self._peers_changed()
        if self.super is not None:
            for i in self.super.add_peer(link):
                link.send_nowait(pw.Have(i))
        try:
            await link.run()
        except* Banned as group:
            exc = first_leaf(group)
            log.info("closing %s: %s", link, exc)
            self.session.offend(self.info_hash, link.ban_keys(), exc.reason, exc.points)
        except* RemoteProtocolError as group:
            bad = first_leaf(group)
            log.info("%s broke the protocol (%s): %s", link, bad.reason, bad)
            self.metrics.protocol_errors.labels(bad.reason).inc()
            self.session.offend(self.info_hash, link.ban_keys(), "protocol", 1)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as group:
            log.debug("%s: connection lost: %s", link, group.exceptions[0])
        finally:
            if link.close_reason:
                log.debug("%s closed: %s", link, link.close_reason)
                self.metrics.disconnects.labels(link.close_reason).inc()
            link.closed = True
            self.links.discard(link)
            self._peers_changed()
            if self.super is not None:
                self.super.remove_peer(link)
            self.choker.remove_peer(link)
            gone = self.core.peer_gone(link)
            if outgoing and addr in self.known:
                self.known[addr] = trio.current_time() + RETRY_AFTER
            if len(self.links) < self.session.config.peer.reannounce_below:
                self._reannounce.set()
            await self._perform(gone)  # its requests go to other peers

    def _refuse(self, addr: tuple[str, int], peer_id: bytes, outgoing: bool) -> str | None:
        """Why a handshaken connection may not join (None: it may; "": quietly).

        At the soft limit the least useful link makes room for it (see the
        module docstring); at the hard limit with nobody to evict, it is refused.
        """
        if peer_id == self.session.peer_id:
            self.session.ban_address(addr, "self_connection")
            return ""
        if any(link.peer_id == peer_id for link in self.links):
            return ""  # already connected to this peer (both dialled at once)
        keys: list[tuple[str, object]] = [(addr[0], peer_id)] + ([addr] if outgoing else [])
        if self.session.banned(self.info_hash, keys):
            return "banned"
        cfg = self.session.config.peer
        live = [link for link in self.links if not link.close_reason]
        victim = None
        if len(live) >= cfg.max_connections_soft:
            victim = least_useful((Candidate(link, self.picker.is_seed(link), link.peer_interested,
                                             link.am_interested, link.last_payload) for link in live),
                                  trio.current_time(), seeding=self.picker.complete)
        decision = admit(len(live), cfg.max_connections_soft, cfg.max_connections_hard, victim)
        if decision == "refuse":
            return "full"
        if decision == "evict":
            cast(PeerLink, victim).close("evicted")
        return None

    def _ban_keys(self, peer: Peer) -> list[tuple[str, object]]:
        keys = getattr(peer, "ban_keys", None)
        return keys() if keys is not None else [peer.addr]

    # -- what a link reports -------------------------------------------------------

    def peer_have(self, link: PeerLink, index: int) -> None:
        """``link``'s peer announced piece ``index`` (Have)."""
        self.picker.peer_have(link, index)
        self.on_peer_pieces(link, index)
        if not self.picker.have(index):
            link.set_interested(True)
        self.on_peer_seed(link)

    def peer_bitfield(self, link: PeerLink, bits: bytes | None) -> None:
        """``link``'s peer has these pieces (Bitfield; None: Have All)."""
        if bits is None:
            self.picker.peer_have_all(link)
        else:
            self.picker.peer_bitfield(link, bits)
        self.on_peer_pieces(link, None)
        link.set_interested(not self.picker.complete)
        self.on_peer_seed(link)

    def peer_has_none(self, link: PeerLink) -> None:
        """Have None: it replaces what the peer had (aria2 sends it twice) and changes nothing else."""
        self.picker.peer_bitfield(link, ())

    def peer_requested(self, link: PeerLink, now: float) -> None:
        """``link``'s peer sent a Request (the choker forgives it an unused slot)."""
        self.choker.record_request(link, now)

    # -- what a link asks ----------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every piece is verified: nothing more to request."""
        return self.picker.complete

    def requested_from(self, link: PeerLink, index: int, begin: int) -> bool:
        """Whether a Piece from ``link`` at (index, begin) answers one of our requests to it."""
        return self.picker.is_requested(link, index, begin)

    def block_length(self, index: int, begin: int) -> int:
        """The length of the block at (index, begin); ValueError if there is no such block."""
        return self.picker.block_length(index, begin)

    def download_rate(self, link: PeerLink, now: float) -> float:
        """Bytes/s we receive from ``link`` (the choker's measure)."""
        return self.choker.download_rate(link, now)

    def pick(self, link: PeerLink, count: int, now: float) -> list[Block]:
        """Up to ``count`` blocks to request from ``link`` now (recorded as requested).

        None while requests pause after a disk error.
        """
        if not self.core.may_request(now):
            return []
        return self.picker.pick(link, None, count, now)

    def peer_interested(self, link: PeerLink, interested: bool) -> None:
        self.choker.set_interested(link, interested)
        if interested:
            self.wake_choker.set()  # a free slot is filled now, not at the next tick

    def we_interested(self, link: PeerLink, interested: bool, now: float) -> None:
        self.choker.set_we_interested(link, interested, now)

    def on_peer_seed(self, link: PeerLink) -> None:
        """A peer turned out to have every piece: two seeds have nothing to trade."""
        if self.picker.complete and self.picker.is_seed(link):
            link.close("seed_to_seed")

    def _greet(self, link: PeerLink) -> None:
        """Queue our extended handshake and piece state (the link's queue is empty)."""
        conn = link.conn
        if conn.extensions:
            ours = {k: v for k, v in EXT_IDS.items() if k != "ut_pex" or not self.meta.private}
            hs = pw.ExtHandshake(m=ours, metadata_size=len(self.meta.raw_info),
                                 v=f"shoal {self.session.version}", reqq=500,
                                 p=self.session.listen_addr.port if self.session.listen_addr else None,
                                 yourip=None)
            link.send_nowait(pw.Extended(0, pw.encode_ext_handshake(hs)))
        n = self.storage.num_verified
        if self.super is not None:
            if conn.fast:
                link.send_nowait(pw.HaveNone())
            return  # pieces are announced one by one (on_peer_pieces)
        if conn.fast and n == self.meta.num_pieces:
            link.send_nowait(pw.HaveAll())
        elif conn.fast and n == 0:
            link.send_nowait(pw.HaveNone())
        elif n:
            link.send_nowait(pw.Bitfield(self.storage.bitfield()))

    def on_peer_pieces(self, link: PeerLink, index: int | None) -> None:
        """A peer announced piece ``index`` (None: a bitfield): super-seeding offers more."""
        if self.super is None:
            return
        for peer, pieces in self.super.peer_has(link, index).items():
            for i in pieces:
                peer.send_nowait(pw.Have(i))
        if not self.super.missing:
            for peer, pieces in self.super.finish().items():
                for i in pieces:
                    peer.send_nowait(pw.Have(i))
            log.info("%s: every piece is out in the swarm; seeding normally", self.meta.name)
            self.super = None

    def _peers_changed(self) -> None:
        self.peers_changed.set()
        self.peers_changed = trio.Event()

    def listen_addresses(self) -> set[tuple[str, int]]:
        """Where our connected peers accept connections (IPv4, as ut_pex "added" carries)."""
        found = set()
        for link in self.links:
            if ":" in link.addr[0]:
                continue
            if link.outgoing:
                found.add(link.addr)
            elif link.ext is not None and link.ext.p:
                found.add((link.addr[0], link.ext.p))  # an incoming link's port is ephemeral
        return found

    async def _pex(self) -> None:
        if self.meta.private:
            return  # BEP 27
        while True:
            await trio.sleep(self.session.config.peer.pex_interval)  # BEP 11's pace, not synchronisation
            current = self.listen_addresses()
            for link in list(self.links):
                their_id = link.ext.m.get("ut_pex") if link.ext else None
                if not their_id or link.closed:
                    continue
                added = sorted(current - link.pex_sent - {link.addr})[:PEX_MAX]
                dropped = sorted(link.pex_sent - current)[:PEX_MAX]
                if not added and not dropped:
                    continue
                pex = pw.Pex(added=tuple(added), added_flags=bytes([pw.PEX_CONNECTABLE]) * len(added),
                             dropped=tuple(dropped))
                link.send_nowait(pw.Extended(their_id, pw.encode_pex(pex)))
                link.pex_sent = (link.pex_sent | set(added)) - set(dropped)

    async def _connector(self) -> None:
        limit = self.session.config.peer.max_connections_soft
        while True:
            now = trio.current_time()
            busy = {link.addr for link in self.links} | self.connecting
            for addr, not_before in list(self.known.items()):
                if len(self.links) + len(self.connecting) >= limit:
                    break
                if addr in busy or not_before > now or self.session.banned(self.info_hash, [addr]):
                    continue
                self.connecting.add(addr)
                self.nursery.start_soon(self._dial, addr)
            self.wake_connector = trio.Event()
            with trio.move_on_after(5.0):
                await self.wake_connector.wait()

    async def _dial(self, addr: tuple[str, int]) -> None:
        """The session dials, handshakes and runs the link (attach) and closes the stream."""
        try:
            joined = await self.session.dial(self, addr)
        finally:
            self.connecting.discard(addr)
        if not joined:
            self.known[addr] = trio.current_time() + RETRY_AFTER

    async def _choke_loop(self) -> None:
        while True:
            decision = self.choker.tick(trio.current_time())
            for link in list(self.links):
                link.set_choking(link not in decision.unchoke)
                if self.choker.strikes(link) >= MAX_STRIKES:
                    link.close("unused_slots")  # unchoked again and again, never asked for a block
            if self.choker.rounds > self._rounds_seen:
                self.metrics.choke_rounds.inc(self.choker.rounds - self._rounds_seen)
                self._rounds_seen = self.choker.rounds
            self.wake_choker = trio.Event()
            with trio.move_on_after(1.0):
                await self.wake_choker.wait()

    async def _saver(self) -> None:
        """Save resume data while downloading, so a kill -9 costs at most a recheck.

        Storage fsyncs the written files before the resume file names their
        pieces; a crash between saves loses nothing either, since at start
        pieces the resume data does not vouch for are re-hashed from disk.
        """
        saved = self.storage.num_verified
        while not self.picker.complete:
            await trio.sleep(RESUME_SAVE_INTERVAL)
            if self.storage.num_verified != saved:
                saved = self.storage.num_verified
                await trio.to_thread.run_sync(self.storage.save_resume)

    async def _timeouts(self) -> None:
        """Once a second: re-issue requests that timed out, and top up every link.

        Requests are normally topped up as blocks arrive; the sweep covers a
        link that went quiet with blocks handed back to the picker (a queue
        that was full, a peer that left) and nothing arriving to trigger it.
        """
        timeout = self.session.config.picker.request_timeout
        while True:
            await trio.sleep(1.0)
            await self._perform([a for a in self.core.expired(trio.current_time(), timeout)
                                       if type(a) is Cancel])
            await self.wake_requesters()

    # -- trackers ----------------------------------------------------------------

    def _announce_for(self, event: Event) -> Announce:
        me = self.session.listen_addr
        left = self.left()
        return Announce(info_hash=self.info_hash, peer_id=self.session.peer_id,
                        port=me.port if me else 0, uploaded=self.uploaded, downloaded=self.downloaded,
                        left=left, event=event, numwant=self.session.config.peer.numwant)

    async def _announce_all(self, event: Event) -> tuple[float, float] | None:
        """Announce to every tracker; the (interval, min interval) to wait, or None if none answered.

        A tracker that fails, for whatever reason, costs a log line and a
        count in ``tracker_errors``; it never raises out of here.
        """
        interval, min_interval, answered = 1800.0, 60.0, False
        for url in self.trackers:
            try:
                tracker = open_tracker(url, local_address=self.session.local_host,
                                       timeout=self.session.tracker_timeout)
            except ValueError:
                continue
            try:
                reply = await tracker.announce(self._announce_for(event))
            except TrackerError as exc:
                log.info("tracker %s (%s): %s", url, event.name.lower(), exc)
                self.metrics.announces.labels("error").inc()
                self.metrics.tracker_errors.labels(exc.reason).inc()
                continue
            finally:
                tracker.close()
            answered = True
            if isinstance(reply, Failure):
                log.warning("tracker %s refused us: %s", url, reply.reason)
                self.metrics.announces.labels("refused").inc()
                continue
            # HTTP replies carry a min interval; BEP 15 replies do not.
            interval = float(reply.interval)
            min_interval = float(getattr(reply, "min_interval", None) or min(interval, 60.0))
            self.add_addresses(((p.ip, p.port) for p in reply.peers), "tracker")
            self.metrics.announces.labels("ok").inc()
        return (interval, min_interval) if answered or not self.trackers else None

    async def _announcer(self) -> None:
        """Announce at the tracker's interval; sooner when short of peers or just completed.

        The seeds: "If nodes in the peers set become less than 20, Alice
        contacts the tracker again" -- but never more often than the
        tracker's min interval. A completed event goes out at once. When no
        tracker answers, the next try follows a capped exponential back-off
        (reset by an answer), whatever the number of peers.
        """
        below = self.session.config.peer.reannounce_below
        backoff = Backoff(self.session.announce_retry_first, self.session.announce_retry_max)
        started = False  # "started" is sent until a tracker has heard it

        async def announce(event: Event) -> tuple[float, float]:
            nonlocal started
            got = await self._announce_all(Event.STARTED if not started and event is Event.NONE else event)
            if got is None:
                delay = backoff.failed()
                return delay, delay
            started = True
            backoff.succeeded()
            return got

        try:
            interval, min_interval = await announce(Event.STARTED)
            last = trio.current_time()
            announced_complete = self.picker.complete
            while True:
                self._reannounce = trio.Event()
                wait = interval if len(self.links) >= below or backoff.failures else min_interval
                with trio.move_on_after(max(0.0, last + wait - trio.current_time())):
                    await self._reannounce.wait()
                completing = self.picker.complete and not announced_complete
                if not completing and trio.current_time() < last + min_interval:
                    continue  # woken early by a lost peer: the next wait honours min_interval
                event = Event.COMPLETED if completing else Event.NONE
                announced_complete = announced_complete or completing
                interval, min_interval = await announce(event)
                last = trio.current_time()
        finally:
            # Bounded, and never raises: a tracker that is already gone (the
            # one on this node stopping first) must not fail our stop.
            with trio.CancelScope(shield=True), trio.move_on_after(2 * self.session.tracker_timeout) as scope:
                await self._announce_all(Event.STOPPED)
            if scope.cancelled_caught:
                log.info("%s: stopped announce abandoned after %.0fs", self.meta.name,
                         2 * self.session.tracker_timeout)


def first_leaf(group: BaseExceptionGroup[E]) -> E:
    """The first exception an ``except*`` caught, however deeply nurseries nested it."""
    exc: BaseException = group.exceptions[0]
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return cast(E, exc)


# Our BEP 10 extension ids (what peers must use when they send to us).
EXT_IDS = {"ut_metadata": 1, "ut_pex": 2}
