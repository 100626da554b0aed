"""The tracker's swarm table: who is in which torrent, with bounded memory.

Theory of operation
-------------------
A tracker keeps soft state. Each torrent (keyed by its 20-byte info-hash) has
a :class:`Swarm` of peers keyed by peer_id. An announce inserts or refreshes
the sender, and returns up to ``numwant`` *other* peers chosen at random (the
seeds: "50 randomly chosen active peers"). A peer that stops announcing
expires after ``peer_timeout`` seconds; an announce with ``event=stopped``
removes it at once.

Random choice has to be cheap for a swarm of 10,000 peers, so each swarm keeps
its peers in a list as well as a dict from peer_id to list index; removal
swaps the last element into the hole. ``random.sample`` over the list is then
O(numwant). Each peer's wire value (:class:`Peer`, with its compact 6- or
18-byte form, BEP 23 / BEP 7) is built once, when the peer joins, not on every
response that lists it.

Memory is bounded three ways: a maximum number of torrents, of peers per
torrent and of peers overall. A new torrent or peer beyond a bound is refused
(``TableFull``), existing ones are still served.

Nothing here does I/O or reads a clock: callers pass ``now`` (monotonic
seconds), so tests drive expiry with plain numbers.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack

from shoal.protocol.errors import ProtocolError
from shoal.protocol.tracker import Announce, Event, Peer


class TableFull(Exception):
    """A bound on torrents or peers was reached; ``reason`` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerEntry:
    """One peer in one swarm. ``peer`` is the wire value, built once per join."""

    __slots__ = ("peer_id", "peer", "left", "last_seen", "index")

    def __init__(self, peer_id: bytes, ip: str, port: int, left: int, now: float) -> None:
        self.peer_id = peer_id
        self.peer = Peer(ip, port, peer_id)
        self.left = left
        self.last_seen = now
        self.index = -1

    @property
    def ip(self) -> str:
        return self.peer.ip

    @property
    def port(self) -> int:
        return self.peer.port

    @property
    def v6(self) -> bool:
        return self.peer.is_ipv6

    @property
    def is_seed(self) -> bool:
        return self.left == 0


class Swarm:
    """The peers of one torrent, in two lists (seeders, leechers) plus two indexes.

    ``peers`` finds an entry by peer_id, ``by_addr`` by the ip:port it listens
    on (its compact form, which the entry holds anyway): one address is one
    listening client, so it has one entry at most.
    """

    __slots__ = ("peers", "by_addr", "seeds", "leeches", "downloaded")

    def __init__(self) -> None:
        self.peers: dict[bytes, PeerEntry] = {}
        self.by_addr: dict[bytes, PeerEntry] = {}
        self.seeds: list[PeerEntry] = []
        self.leeches: list[PeerEntry] = []
        # BEP 48 "downloaded": how many times a completed event was seen.
        self.downloaded = 0

    @property
    def seeders(self) -> int:
        return len(self.seeds)

    @property
    def leechers(self) -> int:
        return len(self.leeches)

    @property
    def order(self) -> list[PeerEntry]:
        return self.leeches + self.seeds

    def _list(self, entry: PeerEntry) -> list[PeerEntry]:
        return self.seeds if entry.left == 0 else self.leeches

    def add(self, entry: PeerEntry) -> None:
        pool = self._list(entry)
        entry.index = len(pool)
        pool.append(entry)
        self.peers[entry.peer_id] = entry
        self.by_addr[entry.peer.compact] = entry

    def _unlink(self, entry: PeerEntry) -> None:
        pool = self._list(entry)
        last = pool.pop()
        if last is not entry:
            last.index = entry.index
            pool[entry.index] = last

    def remove(self, entry: PeerEntry) -> None:
        self._unlink(entry)
        del self.peers[entry.peer_id]
        del self.by_addr[entry.peer.compact]

    def update_left(self, entry: PeerEntry, left: int) -> None:
        if (left == 0) != (entry.left == 0):
            self._unlink(entry)
            entry.left = left
            pool = self._list(entry)
            entry.index = len(pool)
            pool.append(entry)
        else:
            entry.left = left

    def sample(self, numwant: int, exclude: PeerEntry | None, seeder: bool) -> list[PeerEntry]:
        """Up to ``numwant`` peers other than ``exclude``.

        A leecher gets a window of the whole swarm. A seeder gets leechers
        first, and the rest of its ``numwant`` from the other seeders: it
        has nothing to fetch from them, but a client that announces left=0
        before it has anything (aria2 while it fetches a magnet's metadata
        announces so) would otherwise be sent back empty-handed from a
        swarm of seeders, and never find one.
        """
        if not seeder:
            return _window((self.leeches, self.seeds), numwant, exclude)
        chosen = _window((self.leeches,), numwant, None)
        if len(chosen) < numwant:
            chosen += _window((self.seeds,), numwant - len(chosen), exclude)
        return chosen


def _window(pools: tuple[list[PeerEntry], ...], numwant: int, exclude: PeerEntry | None) -> list[PeerEntry]:
    """Up to ``numwant`` entries of the lists ``pools`` end to end, other than ``exclude``, from a random window.

    Like opentracker, the reply is a run of consecutive entries starting at a
    random position (wrapping around), which costs O(numwant) list slicing
    instead of a per-element random draw, and the lists are never joined (that
    would copy the whole swarm per announce). The order of the lists is join
    order shuffled by swap-removal, and each request starts elsewhere, so
    every peer is handed out about equally often. Always a new list.
    """
    n = sum(len(p) for p in pools)
    k = numwant + (exclude is not None)
    if numwant <= 0 or n == 0:
        return []
    if k >= n:
        chosen = [e for p in pools for e in p]
    else:
        start = random.randrange(n)
        chosen = _run(pools, start, k)
        if len(chosen) < k:  # wrap around
            chosen += _run(pools, 0, k - len(chosen))
    if exclude is not None:
        chosen = [p for p in chosen if p is not exclude]
    return chosen[:numwant]


def _run(pools: tuple[list[PeerEntry], ...], start: int, k: int) -> list[PeerEntry]:
    """At most ``k`` consecutive entries of ``pools`` end to end from position ``start``, no wrap."""
    out: list[PeerEntry] = []
    for p in pools:
        if start >= len(p):
            start -= len(p)
            continue
        out += p[start : start + k - len(out)]
        start = 0
        if len(out) == k:
            break
    return out


@dataclass(frozen=True, slots=True)
class AnnounceResult:
    peers: list[PeerEntry]
    complete: int
    incomplete: int


class SwarmTable:
    def __init__(self, *, max_torrents: int, max_peers_per_torrent: int, max_peers: int) -> None:
        self.max_torrents = max_torrents
        self.max_peers_per_torrent = max_peers_per_torrent
        self.max_peers = max_peers
        self.swarms: dict[bytes, Swarm] = {}
        self.peer_count = 0

    def clear(self) -> None:
        self.swarms.clear()
        self.peer_count = 0

    # -- requests --------------------------------------------------------

    def announce(self, req: Announce, ip: str, numwant: int, now: float) -> AnnounceResult:
        """Apply one announce from ``ip`` and choose peers for the reply."""
        swarm = self.swarms.get(req.info_hash)
        if swarm is None:
            if req.event is Event.STOPPED:
                return AnnounceResult([], 0, 0)
            if len(self.swarms) >= self.max_torrents:
                raise TableFull("torrent_limit")
            swarm = self.swarms[req.info_hash] = Swarm()
        entry = swarm.peers.get(req.peer_id)
        if req.event is Event.STOPPED:
            if entry is not None:
                self._drop(req.info_hash, swarm, entry)
            return AnnounceResult([], swarm.seeders, swarm.leechers)
        if entry is not None and (entry.ip != ip or entry.port != req.port):
            # Same peer_id from a new address: the client moved (or restarted).
            self._drop(req.info_hash, swarm, entry, keep_empty=True)
            entry = None
        if entry is None:
            entry = PeerEntry(req.peer_id, ip, req.port, req.left, now)
            old = swarm.by_addr.get(entry.peer.compact)
            if old is not None:
                # A new peer_id on a known ip:port: the client restarted (most
                # make a new peer_id per run). Its old entry goes, or the
                # address would be listed twice and handed to itself.
                self._drop(req.info_hash, swarm, old, keep_empty=True)
            if len(swarm.peers) >= self.max_peers_per_torrent or self.peer_count >= self.max_peers:
                if not swarm.peers:
                    del self.swarms[req.info_hash]
                raise TableFull("peer_limit")
            swarm.add(entry)
            self.peer_count += 1
        else:
            swarm.update_left(entry, req.left)
            entry.last_seen = now
        if req.event is Event.COMPLETED:
            swarm.downloaded += 1
        peers = swarm.sample(numwant, entry, entry.is_seed) if numwant else []
        return AnnounceResult(peers, swarm.seeders, swarm.leechers)

    def scrape(self, info_hash: bytes) -> tuple[int, int, int]:
        """(complete, downloaded, incomplete) for one torrent, zeros if unknown."""
        swarm = self.swarms.get(info_hash)
        if swarm is None:
            return (0, 0, 0)
        return (swarm.seeders, swarm.downloaded, swarm.leechers)

    def expire(self, now: float, timeout: float) -> int:
        """Drop peers not heard from in ``timeout`` seconds; return how many."""
        cutoff = now - timeout
        dropped = 0
        for info_hash, swarm in list(self.swarms.items()):
            stale = [p for p in swarm.peers.values() if p.last_seen < cutoff]
            for entry in stale:
                self._drop(info_hash, swarm, entry)
            dropped += len(stale)
        return dropped

    def stats(self) -> tuple[int, int, int]:
        """(swarms, seeders, leechers) over the whole table."""
        seeders = sum(len(s.seeds) for s in self.swarms.values())
        return (len(self.swarms), seeders, self.peer_count - seeders)

    def _drop(self, info_hash: bytes, swarm: Swarm, entry: PeerEntry, keep_empty: bool = False) -> None:
        swarm.remove(entry)
        self.peer_count -= 1
        if not swarm.peers and not keep_empty:
            del self.swarms[info_hash]

    # -- persistence -----------------------------------------------------
    #
    # The snapshot stores each peer's age in seconds rather than a clock
    # reading, so it is independent of the monotonic clock's origin, which
    # changes across reboots.

    SNAPSHOT_VERSION = 1

    def snapshot(self, now: float) -> bytes:
        torrents = [
            [ih, s.downloaded, [[p.peer_id, p.ip, p.port, p.left, now - p.last_seen] for p in s.order]]
            for ih, s in self.swarms.items()
        ]
        return msgpack.packb([self.SNAPSHOT_VERSION, torrents], use_bin_type=True)

    def restore(self, blob: bytes, now: float, timeout: float) -> int:
        """Load a snapshot, skipping expired peers; return peers restored.

        Raises ValueError if the blob is not a snapshot this version wrote.
        """
        try:
            version, torrents = msgpack.unpackb(blob, raw=False)
            if version != self.SNAPSHOT_VERSION:
                raise ValueError(f"snapshot version {version!r}")
            restored = 0
            for info_hash, downloaded, peers in torrents:
                for peer_id, ip, port, left, age in _fresh(peers, timeout):
                    if not (isinstance(info_hash, bytes) and len(info_hash) == 20 and len(peer_id) == 20):
                        raise ValueError("bad key length")
                    ipaddress.ip_address(ip)
                    req = Announce(info_hash=info_hash, peer_id=peer_id, port=port,
                                   uploaded=0, downloaded=0, left=left)
                    try:
                        self.announce(req, ip, 0, now - age)
                    except TableFull:
                        continue
                    restored += 1
                if info_hash in self.swarms:
                    self.swarms[info_hash].downloaded = downloaded
        except (TypeError, ValueError, KeyError, IndexError, ProtocolError, msgpack.UnpackException) as exc:
            raise ValueError(f"unreadable swarm snapshot: {exc}") from None
        return restored


def _fresh(peers: Iterable[list], timeout: float) -> Iterator[list]:
    for p in peers:
        if p[4] < timeout:
            yield p
