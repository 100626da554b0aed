"""Fetching a torrent's info dictionary from peers (BEP 9), for magnet links.

A magnet link names a torrent by its info-hash only. Before anything can be
downloaded, the info dictionary itself has to come from peers that have it:

1. Candidate peers come from the link's ``x.pe`` addresses and from its
   trackers (announced to every ``ANNOUNCE_EVERY`` seconds until done).
2. Up to ``PARALLEL`` peers are tried at once. Each is handshaken with the
   extension bit, sent our BEP 10 handshake naming ``ut_metadata``, and, once
   its own handshake gives its ``ut_metadata`` id and ``metadata_size``,
   asked for every 16 KiB metadata piece (at most ``IN_FLIGHT`` at a time).
3. The pieces are joined and checked against the info-hash
   (:func:`parse_info` with ``expected_info_hash``). The first peer to deliver
   a dictionary that hashes right wins and the others are cancelled. A peer
   whose dictionary hashes wrong is banned; one that rejects, lacks the
   extension, or breaks the protocol is dropped; one whose connection failed
   is tried again ``RETRY_AFTER`` seconds later, ``ATTEMPTS`` times in all.

The result is a :class:`Metainfo` with the link's trackers and web seeds, and
the bytes of the .torrent file built around the dictionary, which the daemon
keeps in its library so a restart does not fetch it again. :func:`fetch_and_add`
then starts the torrent and hands it every peer learned on the way -- the
link's ``x.pe`` addresses and the trackers' -- so a magnet whose only
sources are ``x.pe`` peers downloads from them too (BEP 27: a ``private``
torrent takes only the trackers').

A link that names no tracker and no ``x.pe`` peer has no source at all (there
is no DHT here): :func:`fetch_metadata` raises :class:`NoSource` at once. One
whose only sources are ``x.pe`` peers raises it when every one of them has
failed ``ATTEMPTS`` times.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

import trio

from shoal.core.swarm.backoff import Backoff
from shoal.daemons.peer.announce import TrackerError, open_tracker
from shoal.daemons.peer.session import RECEIVE_SIZE, Session
from shoal.daemons.peer.torrent import CONNECT_TIMEOUT, EXT_IDS, first_leaf
from shoal.protocol import peer_wire as pw
from shoal.protocol.errors import RemoteProtocolError
from shoal.protocol.metainfo import Magnet, Metainfo, metainfo_file, parse_info, parse_metainfo
from shoal.protocol.tracker import Announce, Event, Failure

log = logging.getLogger("shoal.peer")

PARALLEL = 8  # peers asked at once
IN_FLIGHT = 16  # metadata pieces requested from one peer at once
PEER_TIMEOUT = 30.0  # a peer must deliver the whole dictionary in this time
ANNOUNCE_EVERY = 30.0  # tracker announces while the dictionary is still missing
RETRY_AFTER = 5.0  # a peer that closed on us is tried again this much later
ATTEMPTS = 5  # ... at most this many times (a client may refuse us while it starts up)
# Our own bound on a dictionary we accept (the codec's is 64 MiB). 10 MiB holds
# the piece hashes of a 500 GiB torrent with 1 MiB pieces.
MAX_METADATA = 10 << 20


@dataclass(frozen=True, slots=True)
class Fetched:
    meta: Metainfo
    torrent: bytes  # the .torrent file: the fetched info dictionary and the link's trackers
    tracker_peers: tuple[tuple[str, int], ...] = ()  # addresses the trackers gave while fetching


class NoSource(Exception):
    """The magnet link has no source left to fetch the metadata from."""


class _Found(Exception):
    def __init__(self, raw_info: bytes) -> None:
        self.raw_info = raw_info


async def fetch_metadata(session: Session, magnet: Magnet) -> Fetched:
    """Fetch and verify the info dictionary; runs until it succeeds, is cancelled,
    or (no trackers) every ``x.pe`` peer failed: :class:`NoSource`."""
    if not magnet.trackers and not magnet.peers:
        raise NoSource("the magnet link names no tracker and no x.pe peer (and there is no DHT here)")
    queue_send, queue_receive = trio.open_memory_channel[tuple[str, int]](math.inf)
    seen: set[tuple[str, int]] = set()
    from_trackers: list[tuple[str, int]] = []
    pending = 0  # addresses queued, being tried, or waiting for a retry

    def offer(addrs, tracker: bool = False) -> None:
        nonlocal pending
        for addr in addrs:
            addr = (addr[0], int(addr[1]))
            if tracker and addr not in from_trackers:
                from_trackers.append(addr)
            if addr not in seen and not session.banned(magnet.info_hash, [addr]):
                seen.add(addr)
                pending += 1
                queue_send.send_nowait(addr)

    attempts: dict[tuple[str, int], int] = {}

    async def retry_later(addr) -> None:
        await trio.sleep(RETRY_AFTER)  # a back-off, not synchronisation
        queue_send.send_nowait(addr)

    def given_up(addr) -> None:
        nonlocal pending
        pending -= 1
        if not pending and not magnet.trackers:
            raise NoSource(f"no reachable source: the {len(seen)} x.pe peer(s) failed {ATTEMPTS} times each "
                           "and the magnet link names no tracker")

    offer(magnet.peers)
    raw_info: bytes | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_announcer, session, magnet, partial(offer, tracker=True))
            limiter = trio.CapacityLimiter(PARALLEL)
            async for addr in queue_receive:
                await limiter.acquire_on_behalf_of(addr)
                attempts[addr] = attempts.get(addr, 0) + 1
                retry = partial(nursery.start_soon, retry_later, addr) if attempts[addr] < ATTEMPTS else None
                nursery.start_soon(_try_peer, session, magnet.info_hash, addr, limiter, retry,
                                   partial(given_up, addr))
    except* _Found as group:
        raw_info = first_leaf(group).raw_info
    except* NoSource as group:
        raise first_leaf(group) from None
    assert raw_info is not None  # the loop above only ends by _Found, NoSource or cancellation
    trackers = [[url] for url in magnet.trackers]
    torrent = metainfo_file(raw_info, trackers, magnet.web_seeds)
    return Fetched(parse_metainfo(torrent), torrent, tuple(from_trackers))


async def fetch_and_add(session: Session, magnet: Magnet, save_dir=None, *, upload_rate: int = 0,
                        download_rate: int = 0, on_fetched=None):
    """Fetch the metadata, start the torrent, and give it the peers found on the way.

    ``on_fetched(fetched)`` runs between the two (the daemon keeps the
    .torrent file then). Returns the torrent.
    """
    fetched = await fetch_metadata(session, magnet)
    if on_fetched is not None:
        on_fetched(fetched)
    torrent = await session.add(fetched.meta, save_dir, upload_rate=upload_rate, download_rate=download_rate)
    torrent.add_addresses(fetched.tracker_peers, "tracker")
    torrent.add_addresses(magnet.peers, "magnet")
    return torrent


async def _announcer(session: Session, magnet: Magnet, offer) -> None:
    """Announce every ANNOUNCE_EVERY seconds; sooner, with back-off, while no tracker answers."""
    me = session.listen_addr
    backoff = Backoff(session.announce_retry_first, min(session.announce_retry_max, ANNOUNCE_EVERY))
    while True:
        answered = False
        for url in magnet.trackers:
            try:
                tracker = open_tracker(url, local_address=session.local_host, timeout=session.tracker_timeout)
            except ValueError:
                continue
            # left is unknown until the dictionary arrives; any non-zero value
            # says "leecher" (what libtorrent sends for a magnet too).
            ann = Announce(info_hash=magnet.info_hash, peer_id=session.peer_id, port=me.port if me else 0,
                           uploaded=0, downloaded=0, left=1, event=Event.NONE,
                           numwant=session.config.peer.numwant)
            try:
                reply = await tracker.announce(ann)
            except TrackerError as exc:
                log.info("tracker %s: %s", url, exc)
                session.metrics.announces.labels("error").inc()
                session.metrics.tracker_errors.labels(exc.reason).inc()
                continue
            finally:
                tracker.close()
            answered = True
            if isinstance(reply, Failure):
                session.metrics.announces.labels("refused").inc()
            else:
                session.metrics.announces.labels("ok").inc()
                offer([(p.ip, p.port) for p in reply.peers])
        if answered or not magnet.trackers:
            backoff.succeeded()
            delay = ANNOUNCE_EVERY
        else:
            delay = backoff.failed()
        await trio.sleep(delay)  # the re-announce period or back-off, not synchronisation


async def _try_peer(session: Session, info_hash: bytes, addr: tuple[str, int], limiter, retry,
                    given_up=None) -> None:
    """Try one peer; on a failure that may pass, ``retry()`` (if given), else ``given_up()``."""
    retried = False
    try:
        with trio.move_on_after(PEER_TIMEOUT):
            raw = await _from_peer(session, info_hash, addr)
            if raw is not None:
                raise _Found(raw)
    except RemoteProtocolError as exc:
        log.info("metadata from %s:%d: %s", *addr, exc)
        session.metrics.protocol_errors.labels(exc.reason).inc()
        if exc.reason == "info_hash_mismatch":
            session.offend(info_hash, [addr], "bad_metadata", 2)
        if exc.reason == "bad_handshake" and retry is not None:
            retry()
            retried = True
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError) as exc:
        log.debug("metadata from %s:%d: %s", *addr, exc)
        if retry is not None:
            retry()
            retried = True
    finally:
        limiter.release_on_behalf_of(addr)
    if not retried and given_up is not None:
        given_up()


async def _from_peer(session: Session, info_hash: bytes, addr: tuple[str, int]) -> bytes | None:
    """The verified info dictionary from one peer, or None if it cannot give it."""
    with trio.fail_after(CONNECT_TIMEOUT):
        stream = await session.connect(addr)
    async with stream:
        with trio.fail_after(session.config.peer.handshake_timeout):
            conn = await session.handshake_out(stream, info_hash, None)
        if not conn.extensions:
            return None
        ours = EXT_IDS["ut_metadata"]
        hs = pw.ExtHandshake(m={"ut_metadata": ours}, v=f"shoal {session.version}")
        await stream.send_all(conn.send(pw.Extended(0, pw.encode_ext_handshake(hs))))
        theirs: int | None = None
        size = 0
        pieces: dict[int, bytes] = {}
        asked = 0
        while True:
            event = conn.next_event()
            if event is pw.NEED_DATA:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return None
                conn.receive_data(data)
                continue
            if not isinstance(event, pw.Extended):
                continue  # bitfields, haves, chokes: nothing to us yet
            if event.ext_id == 0 and theirs is None:
                ext = pw.decode_ext_handshake(event.payload)
                theirs = ext.m.get("ut_metadata")
                size = ext.metadata_size or 0
                if not theirs or not 0 < size <= MAX_METADATA:
                    return None
            elif event.ext_id == ours and theirs:
                msg = pw.decode_metadata(event.payload)
                if isinstance(msg, pw.MetadataReject):
                    return None
                if isinstance(msg, pw.MetadataData):
                    if msg.total_size != size:
                        raise RemoteProtocolError("metadata total_size changed", "bad_metadata")
                    pieces[msg.piece] = msg.data
                elif isinstance(msg, pw.MetadataRequest):
                    # We have nothing to give yet.
                    reject = pw.encode_metadata(pw.MetadataReject(msg.piece))
                    await stream.send_all(conn.send(pw.Extended(theirs, reject)))
            else:
                continue
            total = math.ceil(size / pw.METADATA_PIECE)
            if len(pieces) == total:
                raw = b"".join(pieces[i] for i in range(total))
                parse_info(raw, expected_info_hash=info_hash)  # raises info_hash_mismatch
                return raw
            requests = b""
            while asked < total and asked - len(pieces) < IN_FLIGHT:
                requests += conn.send(pw.Extended(theirs, pw.encode_metadata(pw.MetadataRequest(asked))))
                asked += 1
            if requests:
                await stream.send_all(requests)
