"""Which blocks to request from which peer: the piece picker.

Theory of operation
-------------------
A torrent is ``num_pieces`` pieces of ``piece_length`` bytes (the last one may
be shorter), each cut into blocks of ``block_size`` bytes (16 KiB, as in
libtorrent and in Spotify's chunks; the last block of a piece may be
shorter). A block is the unit of a request; a piece is the unit of a hash
check.

Every piece is in exactly one of four states:

* **fresh** - nothing requested or received. Fresh pieces live in
  *availability buckets*: ``_buckets[a]`` is a list of the fresh pieces that
  ``a`` non-seed peers have, and ``_pos[i]`` is piece ``i``'s place in its
  list (-1 when not fresh). A Have moves one piece to the next bucket: a
  swap-remove from one list and an append to another, O(1). Seeds (a full
  bitfield or Have All) are only counted (``_seeds``): they add 1 to every
  piece and change no order, so a seed joining or leaving costs O(1).
* **partial** - some block requested or received; a :class:`_Piece` keeps
  each block's state (wanted / requested / received) and who it is requested
  from. ``_open`` holds the partial pieces that still have a wanted block.
* **received** - every block received, waiting for the caller's hash check
  (still in ``_partial``, with no wanted block).
* **had** - verified (:meth:`PiecePicker.we_have`); never picked again.

A piece goes back from partial to fresh when its last request is released
with no block received, and from received to fresh on :meth:`piece_failed`.

:meth:`PiecePicker.pick` fills a peer's request queue in this order; each
step only takes blocks of pieces the peer has, never a block already
requested from this peer, and stops when ``count`` blocks are found:

0. pieces with a deadline (:meth:`set_deadline`), earliest deadline first;
1. partial pieces ("partial pieces are completed first"): those this peer
   already has requests in, then the other open ones, oldest first;
2. a new piece: at random while we have fewer than ``random_first`` pieces
   (the seeds' "random first"); then in ``"rarest"`` mode the lowest
   availability, ties broken at random (local rarest first), or in
   ``"sequential"`` mode the lowest index (streaming);
3. end-game: when no block is wanted any more (every remaining block is
   requested from someone), a block already requested from other peers may
   be requested again, from at most ``endgame_max`` peers in all. The first
   :meth:`block_received` returns the others, to be sent a Cancel.

Cost of one pick (P open partial pieces, B blocks per piece, D deadlines):
steps 0-1 are O(D + P + B) on small sets. A new rarest piece for a peer that
holds a fraction f of the fresh pieces costs about 1/f list probes from the
lowest non-empty bucket (a seed: 1), plus a walk over the bucket numbers (at
most the number of peers + 1); bucket 0 (pieces only seeds have) is skipped
for a non-seed peer. A peer known to hold at most sqrt(num_pieces) pieces is
served from its own piece list instead, O(L log L). Random first probes 64
random indices, then falls back to a wrap-around scan. Sequential scans up
from the first missing piece. None of these read all pieces in the common
case; the worst case (a peer whose pieces all sit in crowded buckets full of
pieces it lacks) is linear in the fresh pieces. End-game walks the blocks in
flight, O(requests outstanding), only once nothing is wanted any more.

Measured (CPython 3.11, this repository's dev machine; 16,384 pieces, 30
peers with random half bitfields, one block asked per received block as the
daemon does): about 5 us per pick() in steady state, 10-25 us for a call
that starts a new piece (also with 1-block pieces, 5 % bitfields, or two
seeds), about 70 us per call during an end-game with 3,000 requests in
flight. tests/peer/test_picker.py::test_pick_cost_16k_pieces_30_peers prints
the steady-state figure on every run.

Request bookkeeping: each (peer, block) request remembers when it was made;
one insertion-ordered dict over all of them lets :meth:`expired` return the
overdue ones oldest first in O(expired + 1).

Nothing here does I/O, reads a clock or imports trio: ``now`` is an argument
and randomness comes from the injected ``random.Random``.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Container, Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Block", "PiecePicker", "queue_depth", "BLOCK_SIZE"]

#: 16 KiB: what every client requests (BEP 3 practice, libtorrent, Spotify's chunks).
BLOCK_SIZE = 16384

_WANTED, _REQUESTED, _RECEIVED = 0, 1, 2
# Random-first tries this many random indices before falling back to a scan.
_RANDOM_PROBES = 64

Peer = Hashable


def queue_depth(rate_bytes_per_s: float, *, seconds: float = 3.0, block: int = BLOCK_SIZE,
                lo: int = 2, hi: int = 500) -> int:
    """Requests to keep in flight to a peer so its link never idles.

    libtorrent's rule: enough blocks to cover ``seconds`` of transfer at the
    peer's current download rate, ``seconds * rate / block``, clamped to
    ``lo..hi`` (2 keeps a new or slow peer busy while one block is on the
    wire; 500 bounds memory and the damage of a peer that stalls).
    """
    if not rate_bytes_per_s > 0:  # also catches NaN
        return lo
    want = rate_bytes_per_s * seconds / block
    if want >= hi:
        return hi
    return max(lo, int(want))


@dataclass(frozen=True, slots=True)
class Block:
    """One request: ``length`` bytes at offset ``begin`` of piece ``index``."""

    index: int
    begin: int
    length: int


class _AllPieces:
    """The piece set of a seed: contains everything."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True


_ALL = _AllPieces()


class _PeerInfo:
    """What the picker knows about one peer."""

    __slots__ = ("bits", "count", "sparse", "reqs", "working", "queued")

    def __init__(self, num_pieces: int) -> None:
        # bits[i] == 1 when the peer has piece i; None for a seed.
        self.bits: bytearray | None = bytearray(num_pieces)
        self.count = 0
        # The peer's pieces as a set while there are few of them (for the
        # sparse pick path); dropped for good once the peer has many.
        self.sparse: set[int] | None = set()
        # outstanding requests: (piece, block number) -> time requested
        self.reqs: dict[tuple[int, int], float] = {}
        # piece -> number of outstanding requests in it
        self.working: dict[int, int] = {}
        self.queued = 0  # bytes requested and not yet received


class _Piece:
    """Block states of a partial piece."""

    __slots__ = ("state", "reqs", "n_wanted", "n_received", "hint", "contributors")

    def __init__(self, nblocks: int) -> None:
        self.state = bytearray(nblocks)  # _WANTED / _REQUESTED / _RECEIVED
        self.reqs: list[list[Peer] | None] = [None] * nblocks
        self.n_wanted = nblocks
        self.n_received = 0
        self.hint = 0  # no wanted block below this one
        self.contributors: set[Peer] = set()


class PiecePicker:
    """Piece and block selection for one torrent. See the module docstring."""

    def __init__(self, num_pieces: int, piece_length: int, total_length: int, *,
                 block_size: int = BLOCK_SIZE, random_first: int = 4,
                 mode: Literal["rarest", "sequential"] = "rarest", endgame_max: int = 2,
                 rng: random.Random) -> None:
        if num_pieces < 1 or piece_length < 1 or block_size < 1:
            raise ValueError("num_pieces, piece_length and block_size must be positive")
        if not (num_pieces - 1) * piece_length < total_length <= num_pieces * piece_length:
            raise ValueError(f"{num_pieces} pieces of {piece_length} bytes cannot hold {total_length} bytes")
        if endgame_max < 1:
            raise ValueError("endgame_max must be >= 1")
        self.num_pieces = num_pieces
        self.piece_length = piece_length
        self.total_length = total_length
        self.block_size = block_size
        self.random_first = random_first
        self.endgame_max = endgame_max
        self.rng = rng
        self.mode = mode
        self._sparse_limit = math.isqrt(num_pieces)

        self._have = bytearray(num_pieces)
        self._num_have = 0
        self._avail = [0] * num_pieces  # non-seed peers having each piece
        self._seeds = 0
        order = list(range(num_pieces))
        rng.shuffle(order)  # the order inside a bucket is arbitrary; start it random
        self._buckets: list[list[int]] = [order]
        self._pos = [0] * num_pieces
        for k, i in enumerate(order):
            self._pos[i] = k
        self._num_fresh = num_pieces
        self._partial: dict[int, _Piece] = {}
        self._open: dict[int, None] = {}
        self._peers: dict[Peer, _PeerInfo] = {}
        self._timeline: dict[tuple[Peer, int, int], float] = {}
        self._deadline: dict[int, float] = {}
        self._deadline_order: list[tuple[float, int]] = []
        self._seq_next = 0

    # ------------------------------------------------------------------ sizes

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("rarest", "sequential"):
            raise ValueError(f"mode must be 'rarest' or 'sequential', got {value!r}")
        self._mode = value

    def piece_size(self, index: int) -> int:
        if index == self.num_pieces - 1:
            return self.total_length - index * self.piece_length
        return self.piece_length

    def blocks_in_piece(self, index: int) -> int:
        return -(-self.piece_size(index) // self.block_size)

    def block(self, index: int, begin: int) -> Block:
        """The :class:`Block` at ``begin`` in piece ``index`` (ValueError if not a block boundary)."""
        self._check_index(index)
        size = self.piece_size(index)
        if begin < 0 or begin >= size or begin % self.block_size:
            raise ValueError(f"offset {begin} is not a block of piece {index}")
        return Block(index, begin, min(self.block_size, size - begin))

    def block_length(self, index: int, begin: int) -> int:
        """The length of the block at ``begin`` in piece ``index`` (ValueError as :meth:`block`).

        :meth:`block` without making a Block: this runs for every block received.
        """
        if not 0 <= index < self.num_pieces:
            self._check_index(index)
        size = self.total_length - index * self.piece_length if index == self.num_pieces - 1 \
            else self.piece_length
        if begin < 0 or begin >= size or begin % self.block_size:
            raise ValueError(f"offset {begin} is not a block of piece {index}")
        return min(self.block_size, size - begin)

    def _block(self, index: int, j: int) -> Block:
        begin = j * self.block_size
        return Block(index, begin, min(self.block_size, self.piece_size(index) - begin))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_pieces:
            raise ValueError(f"piece index {index} out of range 0..{self.num_pieces - 1}")

    # ------------------------------------------------------------ read-outs

    @property
    def num_have(self) -> int:
        return self._num_have

    @property
    def complete(self) -> bool:
        return self._num_have == self.num_pieces

    @property
    def in_endgame(self) -> bool:
        """No block is wanted any more: every missing block is requested or received."""
        return self._num_fresh == 0 and not self._open and not self.complete

    def have(self, index: int) -> bool:
        return bool(self._have[index])

    def availability(self, index: int) -> int:
        """How many connected peers have piece ``index``."""
        return self._avail[index] + self._seeds

    def all_blocks_received(self, index: int) -> bool:
        """Every block of ``index`` is in: time to check its hash."""
        p = self._partial.get(index)
        return p is not None and p.n_received == len(p.state)

    def outstanding(self, peer: Peer) -> list[Block]:
        """The blocks requested from ``peer`` and not yet received, oldest first."""
        info = self._peers.get(peer)
        if info is None:
            return []
        return [self._block(i, j) for (i, j) in info.reqs]

    def queued_bytes(self, peer: Peer) -> int:
        info = self._peers.get(peer)
        return 0 if info is None else info.queued

    def is_requested(self, peer: Peer, index: int, begin: int) -> bool:
        """Whether a Piece message from ``peer`` at (index, begin) answers one of our requests."""
        info = self._peers.get(peer)
        if info is None or begin % self.block_size:
            return False
        return (index, begin // self.block_size) in info.reqs

    # --------------------------------------------------------- availability

    def _info(self, peer: Peer) -> _PeerInfo:
        info = self._peers.get(peer)
        if info is None:
            info = self._peers[peer] = _PeerInfo(self.num_pieces)
        return info

    def _bucket_move(self, i: int, old: int, new: int) -> None:
        bucket = self._buckets[old]
        k = self._pos[i]
        last = bucket.pop()
        if last != i:
            bucket[k] = last
            self._pos[last] = k
        buckets = self._buckets
        while len(buckets) <= new:
            buckets.append([])
        self._pos[i] = len(buckets[new])
        buckets[new].append(i)

    def _inc(self, i: int) -> None:
        a = self._avail[i]
        self._avail[i] = a + 1
        if self._pos[i] >= 0:
            self._bucket_move(i, a, a + 1)

    def _dec(self, i: int) -> None:
        a = self._avail[i]
        self._avail[i] = a - 1
        if self._pos[i] >= 0:
            self._bucket_move(i, a, a - 1)

    def _forget_pieces(self, info: _PeerInfo) -> None:
        """Take a peer's pieces out of the availability counts."""
        if info.bits is None:
            self._seeds -= 1
        else:
            bits = info.bits
            dec = self._dec
            for i in (info.sparse if info.sparse is not None else range(self.num_pieces)):
                if bits[i]:
                    dec(i)
        info.bits = bytearray(self.num_pieces)
        info.count = 0
        info.sparse = set()

    def _make_seed(self, info: _PeerInfo) -> None:
        if info.bits is not None:
            self._forget_pieces(info)
            info.bits = None
            info.sparse = None
            info.count = self.num_pieces
            self._seeds += 1

    def peer_bitfield(self, peer: Peer, have: Iterable[int] | bytes | bytearray) -> None:
        """A peer's Bitfield message (BEP 3 bytes, high bit first) or a set of piece indices.

        Raises ValueError for a wrong-sized bitfield, spare bits set or an
        index out of range: the peer broke the protocol.
        """
        n = self.num_pieces
        if isinstance(have, (bytes, bytearray, memoryview)):
            raw = bytes(have)
            if len(raw) != (n + 7) // 8:
                raise ValueError(f"bitfield of {len(raw)} bytes for {n} pieces")
            spare = 8 * len(raw) - n
            if spare and raw[-1] & ((1 << spare) - 1):
                raise ValueError("bitfield has spare bits set")
            indices: Iterable[int] = [
                (k << 3) | b for k, byte in enumerate(raw) if byte for b in range(8) if byte & (0x80 >> b)
            ]
        else:
            indices = set(have)
            for i in indices:
                self._check_index(i)
        info = self._info(peer)
        if info.bits is None or info.count:
            self._forget_pieces(info)
        bits = info.bits
        assert bits is not None
        count = 0
        for i in indices:
            bits[i] = 1
            count += 1
        if count == n:  # a full bitfield: count it as a seed, O(1) from now on
            info.bits = None
            info.sparse = None
            info.count = n
            self._seeds += 1
            return
        info.count = count
        info.sparse = set(indices) if count <= self._sparse_limit else None
        inc = self._inc
        for i in indices:
            inc(i)

    def peer_have(self, peer: Peer, index: int) -> None:
        """A peer's Have message (ValueError for an index out of range)."""
        self._check_index(index)
        info = self._info(peer)
        bits = info.bits
        if bits is None or bits[index]:
            return
        bits[index] = 1
        info.count += 1
        if info.sparse is not None:
            if info.count <= self._sparse_limit:
                info.sparse.add(index)
            else:
                info.sparse = None
        self._inc(index)
        if info.count == self.num_pieces:
            self._make_seed(info)

    def peer_have_all(self, peer: Peer) -> None:
        """A seed: a full bitfield or BEP 6 Have All. O(1) for a new peer."""
        self._make_seed(self._info(peer))

    def is_seed(self, peer: Peer) -> bool:
        """The peer has every piece (a full bitfield, Have All, or Haves for all)."""
        info = self._peers.get(peer)
        return info is not None and info.bits is None

    def peer_gone(self, peer: Peer) -> list[Block]:
        """The peer disconnected: forget its pieces and release its requests.

        Returns the released blocks; they are wanted again.
        """
        info = self._peers.get(peer)
        if info is None:
            return []
        released = [self._block(i, j) for (i, j) in info.reqs]
        for (i, j) in list(info.reqs):
            self._release(peer, info, i, j)
        self._forget_pieces(info)
        del self._peers[peer]
        return released

    # ---------------------------------------------------------- piece state

    def _make_fresh(self, i: int) -> None:
        # A partial piece sits outside the buckets while its availability
        # keeps changing, so its level may be above every existing bucket.
        buckets = self._buckets
        while len(buckets) <= self._avail[i]:
            buckets.append([])
        bucket = buckets[self._avail[i]]
        self._pos[i] = len(bucket)
        bucket.append(i)
        self._num_fresh += 1

    def _unfresh(self, i: int) -> None:
        bucket = self._buckets[self._avail[i]]
        k = self._pos[i]
        last = bucket.pop()
        if last != i:
            bucket[k] = last
            self._pos[last] = k
        self._pos[i] = -1
        self._num_fresh -= 1

    def _partial_of(self, i: int) -> _Piece:
        p = self._partial.get(i)
        if p is None:
            self._unfresh(i)
            p = self._partial[i] = _Piece(self.blocks_in_piece(i))
            self._open[i] = None
        return p

    def _drop_requests(self, i: int, p: _Piece) -> list[tuple[Peer, Block]]:
        dropped = []
        for j, reqs in enumerate(p.reqs):
            if reqs:
                for q in reqs:
                    self._forget_request(q, i, j)
                    dropped.append((q, self._block(i, j)))
                p.reqs[j] = None
        return dropped

    def we_have(self, index: int) -> list[tuple[Peer, Block]]:
        """Piece ``index`` passed its hash check (or was found on disk at start).

        Returns requests still outstanding for it (end-game leftovers), which
        the caller should cancel; they are forgotten here.
        """
        self._check_index(index)
        if self._have[index]:
            return []
        self._have[index] = 1
        self._num_have += 1
        dropped: list[tuple[Peer, Block]] = []
        p = self._partial.pop(index, None)
        if p is not None:
            self._open.pop(index, None)
            dropped = self._drop_requests(index, p)
        elif self._pos[index] >= 0:
            self._unfresh(index)
        self.set_deadline(index, None)
        return dropped

    def piece_failed(self, index: int) -> set[Peer]:
        """Piece ``index`` failed its hash check: every block is wanted again.

        Returns the peers that sent blocks of it (a caller may distrust them).
        """
        self._check_index(index)
        p = self._partial.pop(index, None)
        if p is None:
            return set()
        self._open.pop(index, None)
        self._drop_requests(index, p)
        self._make_fresh(index)
        return p.contributors

    def _forget_request(self, peer: Peer, i: int, j: int) -> None:
        """Remove the peer's record of request (i, j); leaves the block state alone."""
        info = self._peers.get(peer)
        if info is None or info.reqs.pop((i, j), None) is None:
            return
        n = info.working[i] - 1
        if n:
            info.working[i] = n
        else:
            del info.working[i]
        info.queued -= self.block_length(i, j * self.block_size)
        del self._timeline[(peer, i, j)]

    def _release(self, peer: Peer, info: _PeerInfo, i: int, j: int) -> None:
        """Cancel an outstanding request; the block is wanted again if nobody else has it."""
        self._forget_request(peer, i, j)
        p = self._partial.get(i)
        if p is None:
            return
        reqs = p.reqs[j]
        if reqs and peer in reqs:
            reqs.remove(peer)
        if p.state[j] != _REQUESTED or reqs:
            return
        p.reqs[j] = None
        p.state[j] = _WANTED
        p.n_wanted += 1
        if j < p.hint:
            p.hint = j
        if p.n_wanted == len(p.state):  # nothing requested or received: fresh again
            del self._partial[i]
            self._open.pop(i, None)
            self._make_fresh(i)
        else:
            self._open[i] = None

    def request_failed(self, peer: Peer, index: int, begin: int) -> None:
        """A request was rejected, timed out or cancelled: the block is wanted again."""
        info = self._peers.get(peer)
        if info is None or begin % self.block_size:
            return
        j = begin // self.block_size
        if (index, j) in info.reqs:
            self._release(peer, info, index, j)

    def block_received(self, peer: Peer, index: int, begin: int) -> list[Peer]:
        """A block arrived. Returns the other peers it was requested from (send them Cancel).

        A block we already have is ignored (returns []). Raises ValueError
        for an index or offset that is not a block of this torrent.
        """
        self.block_length(index, begin)  # validates
        j = begin // self.block_size
        if self._have[index]:
            self._forget_request(peer, index, j)
            return []
        p = self._partial_of(index)
        if p.state[j] == _RECEIVED:
            self._forget_request(peer, index, j)
            return []
        reqs = p.reqs[j] or []
        others = [q for q in reqs if q != peer]
        for q in reqs:
            self._forget_request(q, index, j)
        self._forget_request(peer, index, j)
        p.reqs[j] = None
        if p.state[j] == _WANTED:
            p.n_wanted -= 1
            if not p.n_wanted:
                self._open.pop(index, None)
        p.state[j] = _RECEIVED
        p.n_received += 1
        p.contributors.add(peer)
        return others

    # ------------------------------------------------------------ deadlines

    def peer_has(self, peer: Peer, index: int) -> bool:
        """What the peer told us it has (bitfield, Have, Have All)."""
        info = self._peers.get(peer)
        return info is not None and (info.bits is None or bool(info.bits[index]))

    @property
    def has_deadlines(self) -> bool:
        return bool(self._deadline_order)

    def set_deadline(self, index: int, deadline: float | None) -> None:
        """Piece ``index`` is needed by ``deadline`` (None: no longer). Deadlines come first."""
        self._check_index(index)
        old = self._deadline.pop(index, None)
        if old is not None:
            k = bisect.bisect_left(self._deadline_order, (old, index))
            del self._deadline_order[k]
        if deadline is not None and not self._have[index]:
            self._deadline[index] = deadline
            bisect.insort(self._deadline_order, (deadline, index))

    # -------------------------------------------------------------- picking

    def _request(self, peer: Peer, info: _PeerInfo, i: int, p: _Piece, j: int, now: float,
                 out: list[Block]) -> None:
        if p.state[j] == _WANTED:
            p.state[j] = _REQUESTED
            p.n_wanted -= 1
            if not p.n_wanted:
                self._open.pop(i, None)
        reqs = p.reqs[j]
        if reqs is None:
            p.reqs[j] = [peer]
        else:
            reqs.append(peer)
        blk = self._block(i, j)
        info.reqs[(i, j)] = now
        info.working[i] = info.working.get(i, 0) + 1
        info.queued += blk.length
        self._timeline[(peer, i, j)] = now
        out.append(blk)

    def _take(self, peer: Peer, info: _PeerInfo, i: int, p: _Piece, count: int, now: float,
              out: list[Block]) -> None:
        """Request wanted blocks of partial piece ``i``, lowest offset first."""
        state = p.state
        j = p.hint
        nb = len(state)
        while p.n_wanted and j < nb and len(out) < count:
            if state[j] == _WANTED:
                self._request(peer, info, i, p, j, now, out)
            j += 1
        p.hint = j

    def pick(self, peer: Peer, peer_pieces: Container[int] | None, count: int, now: float) -> list[Block]:
        """Up to ``count`` blocks to request from ``peer`` now, in request order.

        ``peer_pieces`` is what the peer has; None means what the picker was
        told through peer_bitfield/peer_have/peer_have_all (cheapest). The
        blocks are recorded as requested from ``peer`` at ``now``.
        """
        if isinstance(peer_pieces, (bytes, bytearray, memoryview)):
            raise TypeError("peer_pieces is a container of piece indices, not a bitfield")
        out: list[Block] = []
        if count <= 0 or self.complete:
            return out
        info = self._info(peer)
        if peer_pieces is None:
            has: Container[int] = _ALL if info.bits is None else _Bits(info.bits)
            sparse: set[int] | frozenset[int] | None = info.sparse if info.bits is not None else None
            first_bucket = 0 if info.bits is None else 1
        else:
            has = peer_pieces
            first_bucket = 0
            sparse = (peer_pieces if isinstance(peer_pieces, (set, frozenset))
                      and len(peer_pieces) <= self._sparse_limit else None)
        partial = self._partial

        # 0. deadlines, earliest first
        if self._deadline_order:
            for _, i in list(self._deadline_order):
                if i in has and (i in self._open or self._pos[i] >= 0):
                    self._take(peer, info, i, self._partial_of(i), count, now, out)
                    if len(out) >= count:
                        return out

        # 1. partial pieces: the ones this peer works on, then the others, oldest first
        if self._open:
            for i in [i for i in info.working if i in self._open and i in has]:
                self._take(peer, info, i, partial[i], count, now, out)
                if len(out) >= count:
                    return out
            for i in list(self._open):
                if i in has:
                    self._take(peer, info, i, partial[i], count, now, out)
                    if len(out) >= count:
                        return out

        # 2. new pieces
        if self._num_fresh:
            for i in self._fresh_pieces(has, sparse, first_bucket):
                self._take(peer, info, i, self._partial_of(i), count, now, out)
                if len(out) >= count:
                    return out

        # 3. end-game: duplicate requests, fewest requesters first
        if self.in_endgame:
            for level in range(1, self.endgame_max):
                for i, p in list(partial.items()):
                    if p.n_received == len(p.state) or i not in has:
                        continue
                    for j, reqs in enumerate(p.reqs):
                        if reqs and len(reqs) == level and peer not in reqs:
                            self._request(peer, info, i, p, j, now, out)
                            if len(out) >= count:
                                return out
        return out

    def _fresh_pieces(self, has: Container[int], sparse: set[int] | frozenset[int] | None,
                      first_bucket: int):
        """Yield fresh pieces the peer has, best first; the caller takes each before the next.

        ``first_bucket`` is 1 when ``has`` is the picker's own record of a
        non-seed peer: bucket 0 holds pieces no non-seed peer has, so it can
        be skipped unread (it is large when there are seeds, or early on).
        """
        pos = self._pos
        if sparse is not None:  # few pieces: order the peer's own list once
            cands = [i for i in sparse if pos[i] >= 0]
            if self._mode == "sequential":
                cands.sort()
            elif self._num_have < self.random_first:
                self.rng.shuffle(cands)
            else:
                rnd = self.rng.random
                avail = self._avail
                cands.sort(key=lambda i: (avail[i], rnd()))
            for i in cands:
                if pos[i] >= 0:
                    yield i
            return
        while self._num_fresh:
            if self._mode == "sequential":
                nxt = self._next_sequential(has)
            elif self._num_have < self.random_first:
                nxt = self._next_random(has)
            else:
                nxt = self._next_rarest(has, first_bucket)
            if nxt is None:
                return
            yield nxt

    def _next_sequential(self, has: Container[int]) -> int | None:
        n, have, pos = self.num_pieces, self._have, self._pos
        i = self._seq_next
        while i < n and have[i]:
            i += 1
        self._seq_next = i
        while i < n:
            if pos[i] >= 0 and i in has:
                return i
            i += 1
        return None

    def _next_random(self, has: Container[int]) -> int | None:
        n, pos, rng = self.num_pieces, self._pos, self.rng
        for _ in range(_RANDOM_PROBES):
            i = rng.randrange(n)
            if pos[i] >= 0 and i in has:
                return i
        start = rng.randrange(n)
        for k in range(n):
            i = (start + k) % n
            if pos[i] >= 0 and i in has:
                return i
        return None

    def _next_rarest(self, has: Container[int], first_bucket: int) -> int | None:
        rng = self.rng
        buckets = self._buckets
        for a in range(first_bucket, len(buckets)):
            bucket = buckets[a]
            size = len(bucket)
            if not size:
                continue
            start = rng.randrange(size)  # ties broken at random
            for k in range(start, size):
                if bucket[k] in has:
                    return bucket[k]
            for k in range(start):
                if bucket[k] in has:
                    return bucket[k]
        return None

    # ------------------------------------------------------ Spotify's rule

    def assign_urgent(self, peers: dict[Peer, float], now: float) -> dict[Peer, list[Block]]:
        """Hand out the wanted blocks of deadlined pieces, most urgent first.

        Spotify's rule: for each block in deadline order, among the peers in
        ``peers`` (peer -> expected download rate, bytes/s) that have the
        piece, take the one expected to deliver it first,
        ``(queued bytes at that peer + block) / rate``, and request it there.
        A peer takes at most :func:`queue_depth` of its rate in outstanding
        requests; blocks nobody can take stay wanted. O(U x len(peers)) for U
        urgent blocks. The blocks are recorded as requested at ``now``.
        """
        result: dict[Peer, list[Block]] = {}
        if not self._deadline_order:
            return result
        room: dict[Peer, int] = {}
        queued: dict[Peer, float] = {}
        for q, rate in peers.items():
            info = self._peers.get(q)
            if info is not None and rate > 0:
                room[q] = queue_depth(rate) - len(info.reqs)
                queued[q] = info.queued
        for _, i in list(self._deadline_order):
            if not (i in self._open or self._pos[i] >= 0):
                continue
            p = self._partial.get(i)
            j = 0 if p is None else p.hint
            nb = self.blocks_in_piece(i)
            while j < nb:
                if p is not None:
                    if not p.n_wanted:
                        break
                    if p.state[j] != _WANTED:
                        j += 1
                        continue
                length = self._block(i, j).length
                best, best_t = None, math.inf
                for q, left in room.items():
                    bits = self._peers[q].bits
                    if left <= 0 or (bits is not None and not bits[i]):
                        continue
                    t = (queued[q] + length) / peers[q]
                    if t < best_t:
                        best, best_t = q, t
                if best is None:
                    break
                p = self._partial_of(i)
                self._request(best, self._peers[best], i, p, j, now, result.setdefault(best, []))
                queued[best] += length
                room[best] -= 1
                j += 1
        return result

    # ------------------------------------------------------------- timeouts

    def expired(self, now: float, timeout: float) -> list[tuple[Peer, Block]]:
        """Requests older than ``timeout``, oldest first; they are released (wanted again).

        The caller sends each peer a Cancel; the next pick() hands the blocks
        out again, partial pieces first. A late block is still accepted by
        :meth:`block_received`. ``now`` must not go backwards between pick()
        calls for the oldest-first early stop to be exact.
        """
        limit = now - timeout
        due = []
        for key, t in self._timeline.items():
            if t > limit:
                break
            due.append(key)
        out = []
        for (peer, i, j) in due:
            out.append((peer, self._block(i, j)))
            self._release(peer, self._peers[peer], i, j)
        return out

    # ------------------------------------------------------------ checking

    def _check(self) -> None:
        """Verify every internal invariant (tests only; O(everything))."""
        n = self.num_pieces
        fresh = 0
        for a, bucket in enumerate(self._buckets):
            for k, i in enumerate(bucket):
                assert self._pos[i] == k and self._avail[i] == a, (i, a, k)
                assert not self._have[i] and i not in self._partial
                fresh += 1
        assert fresh == self._num_fresh
        avail = [0] * n
        seeds = 0
        for info in self._peers.values():
            if info.bits is None:
                seeds += 1
            else:
                assert sum(info.bits) == info.count < n
                for i in range(n):
                    avail[i] += info.bits[i]
                if info.sparse is not None:
                    assert info.sparse == {i for i in range(n) if info.bits[i]}
        assert avail == self._avail and seeds == self._seeds
        for i in range(n):
            assert (self._pos[i] >= 0) + bool(self._have[i]) + (i in self._partial) == 1, i
        requests = 0
        for i, p in self._partial.items():
            assert p.n_wanted == p.state.count(_WANTED) and p.n_received == p.state.count(_RECEIVED)
            assert p.n_wanted < len(p.state)  # else it would be fresh
            assert (i in self._open) == (p.n_wanted > 0)
            assert all(s != _WANTED for s in p.state[:p.hint])
            for j, reqs in enumerate(p.reqs):
                assert bool(reqs) == (p.state[j] == _REQUESTED), (i, j)
                for q in reqs or ():
                    assert (i, j) in self._peers[q].reqs
                    requests += 1
                assert len(reqs or ()) == len(set(reqs or ()))
        assert requests == len(self._timeline) == sum(len(x.reqs) for x in self._peers.values())
        for info in self._peers.values():
            assert sum(info.working.values()) == len(info.reqs)
            assert info.queued == sum(self._block(i, j).length for (i, j) in info.reqs)


class _Bits:
    """``i in _Bits(bits)``: membership in a peer's bytearray of 0/1 flags."""

    __slots__ = ("bits",)

    def __init__(self, bits: bytearray) -> None:
        self.bits = bits

    def __contains__(self, i: object) -> bool:
        return bool(self.bits[i])  # type: ignore[call-overload]  # only ever asked for int indices
