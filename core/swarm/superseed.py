"""Super-seeding (BEP 16): an initial seed that uploads each piece about once.

A plain seed advertises every piece, and leechers that pick the same rare
pieces all fetch them from the seed, so a seed typically uploads 1.5-2
copies before the swarm can finish without it. A super-seed instead poses
as a peer with nothing and announces (Have) only ``per_peer`` pieces to each
leecher at a time (:data:`PER_PEER`), choosing the pieces it has sent least often. A piece's
offer to a peer is settled -- and the peer is offered another -- when the
piece shows up at any peer (a Have from the peer itself or from another: the
piece is out in the swarm). The seed serves only pieces it offered to that
peer. Once every piece has been announced by some peer, the swarm holds a
whole copy without us; the seed announces everything and seeds normally
from then on.

:class:`SuperSeeder` is the bookkeeping only, with no I/O: the torrent asks
it what to announce and whether a request may be served, and tells it which
pieces peers announce. ``has(peer, index)`` is the caller's view of a peer's
pieces (the picker's).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable

Peer = Hashable

# Pieces offered to each leecher at a time. Two (BEP 16's "one or two") leave the
# seed idle while a leecher's Have and its next requests cross the link: in the lab
# (8 leechers, 2 MiB/s, 20 ms round trips, 64 KiB pieces) the seed's uplink was busy
# 34 % of the time and the swarm took 3.3x its bound; with 8 it was busy 86 % and took
# 1.47x, the seed uploading 1.22 copies (4: 1.83x; 16: the same as 8).
PER_PEER = 8


class SuperSeeder:
    def __init__(self, num_pieces: int, has: Callable[[Peer, int], bool], *, per_peer: int = PER_PEER,
                 copies: int = 1, rng: random.Random) -> None:
        if num_pieces < 1 or per_peer < 1:
            raise ValueError("num_pieces and per_peer must be >= 1")
        self.num_pieces = num_pieces
        self.has = has
        self.per_peer = per_peer
        self.rng = rng
        self.sent = [0] * num_pieces  # offers made of each piece (each costs about one upload)
        self.offered: dict[Peer, set[int]] = {}
        self.announced: dict[Peer, set[int]] = {}
        self.copies = copies  # super-seeding ends when every piece is at this many peers
        self.out = bytearray(num_pieces)  # peers that announced each piece, up to ``copies``
        self.missing = num_pieces  # pieces at fewer than ``copies`` peers
        self.done = False

    def add_peer(self, peer: Peer) -> list[int]:
        self.offered[peer] = set()
        self.announced[peer] = set()
        return self._top_up(peer)

    def remove_peer(self, peer: Peer) -> None:
        self.offered.pop(peer, None)
        self.announced.pop(peer, None)

    def may_serve(self, peer: Peer, index: int) -> bool:
        return self.done or index in self.offered.get(peer, ())

    def peer_has(self, peer: Peer, index: int | None) -> dict[Peer, list[int]]:
        """``peer`` announced piece ``index`` (None: a whole bitfield). Returns new Haves to send."""
        for i in range(self.num_pieces) if index is None else (index,):
            if self.out[i] < self.copies and (index is not None or self.has(peer, i)):
                self.out[i] += 1
                if self.out[i] == self.copies:
                    self.missing -= 1
        out: dict[Peer, list[int]] = {}
        for q, offers in self.offered.items():
            if index is None:
                settled = {i for i in offers if self.has(q, i)} if q == peer else set()
            else:
                settled = {index} & offers
            if settled:
                offers -= settled
                new = self._top_up(q)
                if new:
                    out[q] = new
        if index is None and peer in self.offered and peer not in out:
            new = self._top_up(peer)
            if new:
                out[peer] = new
        return out

    def finish(self) -> dict[Peer, list[int]]:
        """Every piece is out in the swarm: announce the rest to everyone and stop."""
        self.done = True
        out = {}
        for q, seen in self.announced.items():
            rest = [i for i in range(self.num_pieces) if i not in seen and not self.has(q, i)]
            if rest:
                out[q] = rest
        return out

    def _top_up(self, peer: Peer) -> list[int]:
        offers, seen = self.offered[peer], self.announced[peer]
        want = self.per_peer - len(offers)
        if want <= 0 or self.done:
            return []
        cands = [i for i in range(self.num_pieces) if i not in offers and not self.has(peer, i)]
        # least sent first; ties at random so peers spread over the pieces
        self.rng.shuffle(cands)
        cands.sort(key=self.sent.__getitem__)
        new = cands[:want]
        for i in new:
            self.sent[i] += 1
            offers.add(i)
            seen.add(i)
        return new
