"""Whom to upload to: the choker (tit-for-tat with an optimistic unchoke).

Theory of operation
-------------------
The seeds' rule: upload to the ``slots`` (4) peers that upload to us fastest,
recomputed every ``interval`` (10 s), plus one peer picked at random every
``optimistic_interval`` (30 s) so newcomers get a first piece and better
partners can be discovered. Unchoked peers get our data; choked ones don't.

:meth:`Choker.tick` is meant to be called often (every second, or after
events). It runs a *round* when the regular boundary is due and rotates the
optimistic unchoke when its boundary is due; boundaries sit on a fixed grid
from the first tick (``t0 + k * interval``), so with the defaults every third
round also rotates the optimistic slot, as in the mainline client. Between
boundaries it changes nothing that is working: a slot holder keeps its slot
even if a faster peer appears. It only fills a slot that became *empty* (its
holder left or lost interest), as libtorrent does when a peer becomes
interested while a slot is free.

A round ranks the interested peers that are not the current optimistic one:

* downloading: by their upload rate to us (a :class:`RateMeter` over
  ``rate_window`` seconds), tit-for-tat. Snubbed peers are left out: a peer
  we want data from (``we_interested``, True unless told otherwise) that has
  sent no block for ``snub_after`` seconds, counted from the last block, its
  arrival or the moment we became interested, loses its regular slot at the
  next round and can only get the optimistic one (mainline's anti-snubbing).
* seeding, ``upload_rate``: by our upload rate to them (serve those who can
  take data fastest, mainline 4.x).
* seeding, ``round_robin``: those that held a regular slot least recently
  first (libtorrent's default when seeding), so every interested peer gets
  turns.

Ties go, when downloading, to the peer that has sent us more bytes in all
(so a free-rider loses every tie among zero rates to a peer that ever
reciprocated), then to the current holders (no churn) if they ever gave us
anything, then to chance. The optimistic
slot goes to a random interested peer outside the regular set, preferably not
the previous one; a peer that connected less than ``newcomer_age`` seconds
ago weighs ``newcomer_weight`` (3) times as much, as in the mainline client.
Not-interested peers are choked (they want nothing) and hold no slot.

Slots go to peers that use them. Interest alone counts for nothing: a slot
holder that has neither sent a Request nor been sent a block for
``request_grace`` seconds since it was unchoked (or since its last request
or block) loses the slot at once, and the slot goes to the next candidate.
Each such loss is a *strike*; candidates are ranked by fewest strikes right
after their rate, so a crowd that sends Interested and never requests gets
each slot for ``request_grace`` once, and a real peer behind it gets its
turn within ``ceil(crowd / slots) * request_grace``. :meth:`strikes` lets the
caller drop a peer that keeps wasting slots; a Request forgives its strikes.

:class:`ChokeDecision` is the whole picture, not a delta: ``unchoke`` and
``choke`` partition the known peers. The caller sends Choke/Unchoke only to
peers whose state differs from what it last sent.

Cost: a round sorts the interested peers, O(n log n); other ticks are O(n)
at most (usually O(1) checks plus the set copies of the decision). No I/O, no
clock (``now`` is an argument), randomness from the injected ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

from shoal.core.swarm.rates import RateMeter

__all__ = ["Choker", "ChokeDecision"]

Peer = Hashable


@dataclass(frozen=True, slots=True)
class ChokeDecision:
    """Who is unchoked now; ``unchoke`` and ``choke`` partition the known peers."""

    unchoke: frozenset
    choke: frozenset
    optimistic: Peer | None = None
    recomputed: bool = False  # this tick ran a regular round


class _PeerState:
    __slots__ = ("joined", "seq", "interested", "we_interested", "last_block", "down", "up",
                 "last_slot", "received", "unchoked_at", "last_used", "strikes")

    def __init__(self, now: float, seq: int, rate_window: float) -> None:
        self.joined = now
        self.seq = seq
        self.interested = False  # the peer wants our data
        self.we_interested = True  # we want theirs (snub detection)
        self.last_block = now  # start of the current no-data stretch
        self.down = RateMeter(rate_window)  # them -> us
        self.up = RateMeter(rate_window)  # us -> them
        self.last_slot = -1  # grant number of the last regular slot (round robin)
        self.received = 0  # bytes of piece data they ever sent us
        self.unchoked_at: float | None = None  # since when it holds a slot (None: choked)
        self.last_used = -float("inf")  # its last Request to us, or our last block to it
        self.strikes = 0  # slots it held without using them


class Choker:
    """Upload slot allocation for one torrent. See the module docstring."""

    def __init__(self, *, slots: int = 4, interval: float = 10.0, optimistic_interval: float = 30.0,
                 snub_after: float = 60.0,
                 seeding_policy: Literal["upload_rate", "round_robin"] = "upload_rate",
                 optimistic_slots: int = 1, newcomer_age: float = 60.0, newcomer_weight: float = 3.0,
                 rate_window: float = 20.0, request_grace: float = 5.0, rng: random.Random) -> None:
        if slots < 0 or optimistic_slots < 0:
            raise ValueError("slots must be >= 0")
        if not (interval > 0 and optimistic_interval > 0 and snub_after > 0 and rate_window > 0
                and request_grace > 0):
            raise ValueError("intervals must be > 0")
        if seeding_policy not in ("upload_rate", "round_robin"):
            raise ValueError(f"seeding_policy must be upload_rate or round_robin, got {seeding_policy!r}")
        self.slots = slots
        self.interval = interval
        self.optimistic_interval = optimistic_interval
        self.snub_after = snub_after
        self.seeding_policy = seeding_policy
        self.optimistic_slots = optimistic_slots
        self.newcomer_age = newcomer_age
        self.newcomer_weight = newcomer_weight
        self.rate_window = rate_window
        self.request_grace = request_grace
        self.rng = rng
        self.seeding = False
        #: regular rounds run (a metric: shoal_peer_choke_rounds_total)
        self.rounds = 0
        #: optimistic rotations run
        self.optimistic_rounds = 0
        #: slots taken back from holders that did not use them (strikes given)
        self.unused_slots = 0
        self._peers: dict[Peer, _PeerState] = {}
        self._seq = 0
        self._grants = 0
        self._regular: dict[Peer, None] = {}  # ordered, for deterministic iteration
        self._optimistic: dict[Peer, None] = {}
        self._struck: set = set()  # lost their slot at this tick: not candidates until the next
        self._next_round: float | None = None
        self._next_optimistic: float | None = None

    # ---------------------------------------------------------------- peers

    def add_peer(self, peer: Peer, now: float) -> None:
        if peer in self._peers:
            raise ValueError(f"peer {peer!r} already added")
        self._peers[peer] = _PeerState(now, self._seq, self.rate_window)
        self._seq += 1

    def remove_peer(self, peer: Peer) -> None:
        self._peers.pop(peer, None)
        self._regular.pop(peer, None)
        self._optimistic.pop(peer, None)

    def set_interested(self, peer: Peer, interested: bool) -> None:
        """The peer sent Interested / Not Interested (it wants our data or not)."""
        self._peers[peer].interested = interested

    def set_we_interested(self, peer: Peer, interested: bool, now: float) -> None:
        """We sent Interested / Not Interested: only peers we want data from can snub us."""
        st = self._peers[peer]
        if interested and not st.we_interested:
            st.last_block = now
        st.we_interested = interested

    def record_download(self, peer: Peer, nbytes: int, now: float) -> None:
        """The peer sent us ``nbytes`` of piece data."""
        st = self._peers[peer]
        st.down.add(nbytes, now)
        st.received += nbytes
        if nbytes > 0:
            st.last_block = now

    def record_upload(self, peer: Peer, nbytes: int, now: float) -> None:
        """We sent the peer ``nbytes`` of piece data."""
        st = self._peers[peer]
        st.up.add(nbytes, now)
        st.last_used = now

    def record_request(self, peer: Peer, now: float) -> None:
        """The peer sent us a Request: it uses its slot (or will, once unchoked).

        Its strikes are forgiven: a real peer that once had nothing to ask
        of us (its blocks all requested elsewhere) is not a free-loader.
        """
        st = self._peers[peer]
        st.last_used = now
        st.strikes = 0

    def set_seeding(self, seeding: bool) -> None:
        """We have every piece: rank by upload (or round robin), no snubbing. Applies from the next round."""
        self.seeding = seeding

    # -------------------------------------------------------------- queries

    def download_rate(self, peer: Peer, now: float) -> float:
        return self._peers[peer].down.rate(now)

    def upload_rate(self, peer: Peer, now: float) -> float:
        return self._peers[peer].up.rate(now)

    def strikes(self, peer: Peer) -> int:
        """Slots this peer held without using them."""
        return self._peers[peer].strikes

    def is_snubbed(self, peer: Peer, now: float) -> bool:
        st = self._peers[peer]
        return (not self.seeding and st.we_interested
                and now - st.last_block >= self.snub_after)

    @property
    def unchoked(self) -> frozenset:
        return frozenset(self._regular) | frozenset(self._optimistic)

    @property
    def optimistic(self) -> Peer | None:
        return next(iter(self._optimistic), None)

    def __len__(self) -> int:
        return len(self._peers)

    # ----------------------------------------------------------------- tick

    def tick(self, now: float) -> ChokeDecision:
        """Advance to ``now``; run the round / optimistic rotation if due. See the module docstring."""
        if self._next_round is None or self._next_optimistic is None:
            self._next_round = now
            self._next_optimistic = now
        due_round = now >= self._next_round
        due_optimistic = now >= self._next_optimistic

        # Holders that left were dropped by remove_peer; those that lost interest go now.
        for held in (self._regular, self._optimistic):
            for p in [p for p in held if not self._peers[p].interested]:
                del held[p]
        # Holders that have not used their slot lose it now, whatever the round.
        # (They are choked at least until the next tick, even if nobody else wants the slot.)
        grace = self.request_grace
        struck = set()
        for held in (self._regular, self._optimistic):
            for p in list(held):
                st = self._peers[p]
                if st.unchoked_at is not None and now - max(st.unchoked_at, st.last_used) >= grace:
                    del held[p]
                    st.strikes += 1
                    self.unused_slots += 1
                    struck.add(p)
        self._struck = struck

        previous_optimistic = list(self._optimistic)
        if due_optimistic:
            self._optimistic.clear()  # the old one competes for a regular slot this round
        if due_round:
            self._round(now)
            self.rounds += 1
            self._next_round = _next_boundary(self._next_round, self.interval, now)
        elif len(self._regular) < self.slots:
            self._fill_regular(now)
        if due_optimistic:
            self.optimistic_rounds += 1
            self._next_optimistic = _next_boundary(self._next_optimistic, self.optimistic_interval, now)
            self._fill_optimistic(now, avoid=set(previous_optimistic))
        elif len(self._optimistic) < self.optimistic_slots:
            self._fill_optimistic(now, avoid=set())
        unchoke = frozenset(self._regular) | frozenset(self._optimistic)
        for p, st in self._peers.items():
            if p not in unchoke:
                st.unchoked_at = None
            elif st.unchoked_at is None:
                st.unchoked_at = now
        return ChokeDecision(unchoke=unchoke, choke=frozenset(self._peers.keys() - unchoke),
                             optimistic=self.optimistic, recomputed=due_round)

    def _candidates(self, now: float) -> list[Peer]:
        """Interested peers that may hold a regular slot, in join order."""
        return [p for p, st in self._peers.items()
                if st.interested and p not in self._optimistic and p not in self._struck
                and not self.is_snubbed(p, now)]

    def _ranked(self, cands: list[Peer], now: float) -> list[Peer]:
        rnd = self.rng.random
        peers = self._peers
        if self.seeding and self.seeding_policy == "round_robin":
            # least recently served first; join order breaks ties so the rotation is fair
            return sorted(cands, key=lambda p: (peers[p].strikes, peers[p].last_slot, peers[p].seq))
        if self.seeding:
            def rate(p: Peer) -> float:
                return peers[p].up.rate(now)
        else:
            def rate(p: Peer) -> float:
                return peers[p].down.rate(now)
        # Equal rates (most often: zero, in the rate window) go first to the
        # peer that has given us more in all (downloading only), so a peer
        # that never uploads loses every tie to one that ever did; and a
        # holder keeps its slot on a tie only if it ever gave us anything.
        if self.seeding:
            keyed = [(-rate(p), peers[p].strikes, 0, p not in self._regular, rnd(), peers[p].seq, p)
                     for p in cands]
        else:
            keyed = [(-rate(p), peers[p].strikes, -peers[p].received,
                      not (p in self._regular and peers[p].received), rnd(), peers[p].seq, p) for p in cands]
        keyed.sort(key=lambda k: k[:6])
        return [k[-1] for k in keyed]

    def _grant(self, peers: list[Peer]) -> None:
        for p in peers:
            self._regular[p] = None
            self._grants += 1  # a queue position: the peer goes to the back of the line
            self._peers[p].last_slot = self._grants

    def _round(self, now: float) -> None:
        ranked = self._ranked(self._candidates(now), now)
        self._regular.clear()
        self._grant(ranked[:self.slots])

    def _fill_regular(self, now: float) -> None:
        cands = [p for p in self._candidates(now) if p not in self._regular]
        self._grant(self._ranked(cands, now)[:self.slots - len(self._regular)])

    def _fill_optimistic(self, now: float, avoid: set) -> None:
        cands = [p for p, st in self._peers.items()
                 if st.interested and p not in self._regular and p not in self._optimistic
                 and p not in self._struck]
        fresh = [p for p in cands if p not in avoid]
        if fresh:
            cands = fresh
        if cands:  # the fewest strikes first: a peer that wasted slots waits for the others
            fewest = min(self._peers[p].strikes for p in cands)
            cands = [p for p in cands if self._peers[p].strikes == fewest]
        while cands and len(self._optimistic) < self.optimistic_slots:
            weights = [self.newcomer_weight if now - self._peers[p].joined < self.newcomer_age else 1.0
                       for p in cands]
            r = self.rng.random() * sum(weights)
            k = 0
            while k < len(cands) - 1 and r >= weights[k]:
                r -= weights[k]
                k += 1
            self._optimistic[cands.pop(k)] = None


def _next_boundary(boundary: float, step: float, now: float) -> float:
    """The first grid point ``boundary + k * step`` after ``now``."""
    if now < boundary + step:
        return boundary + step
    return boundary + (int((now - boundary) // step) + 1) * step
