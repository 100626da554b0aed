"""N+1 XOR parity at block granularity (seed 003, section II; Plank's N+1 parity).

Theory of operation
-------------------
There are n application ranks. Rank i keeps its last consistent checkpoint, a byte
string of size S_i, in its own memory. The coordinator (the seed's checkpoint
processor P_c) keeps the parity checkpoint of size S_c = max S_i, whose j-th byte is

    b_c,j = b_1,j XOR b_2,j XOR ... XOR b_n,j      (b_i,j = 0 when j >= S_i)

and the backup (P_b) keeps a copy of it. If rank f is lost, its checkpoint is the
XOR of every survivor's checkpoint with the parity, cut to S_f (``reconstruct``).

The seed takes checkpoint 0 by sending the whole memory, then tracks written pages
with copy-on-write so that a later checkpoint only costs the pages that changed.
Here the page is a fixed-size *block* (``BLOCK_SIZE`` by default, configurable per
group): when rank i moves from checkpoint ``old`` to ``new`` it sends, for every
block k whose contents differ, the delta ``old_k XOR new_k`` (``changed_blocks``).
Because XOR is its own inverse, the coordinator updates the parity with
``parity_k ^= delta`` (``Parity.apply``) without ever seeing old or new. Checkpoint
0 is the same operation with ``old`` empty: every non-zero block is sent.

Sizes may grow or shrink between checkpoints. Both sides are zero-padded to the
longer length, so a shrink sends the old tail as its own delta and thereby removes
it from the parity; the rank then reports its new size (``Parity.set_size``). The
parity's logical length is the largest reported size; storage grows on demand.

A checkpoint must be applied all or nothing: the coordinator buffers a rank's
deltas until the rank commits and then applies them (``Parity.apply_all``), so the
parity always corresponds to each rank's last *completed* checkpoint.

The mirror to the backup is either the same stream of deltas (the backup runs its
own ``Parity``) or a full ``snapshot()``; if both are lost the parity is rebuilt
from the ranks' checkpoints with ``Parity.recompute``.

Everything here is plain numpy on uint8 buffers; no I/O, no clocks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np

BLOCK_SIZE = 65536
"""Default block size in bytes (the seed's page). Configurable per group."""

MAX_BLOCK_SIZE = 64 * 1024 * 1024
"""Upper bound on a block size: one delta is held in memory as one bytes object."""

_SNAP_MAGIC = b"SHPAR1"
_SNAP_HEAD = struct.Struct("!6sIII")  # magic, block size, number of ranks, reserved
_SNAP_RANK = struct.Struct("!qQ")  # rank, size


def as_u8(buf) -> np.ndarray:
    """A flat uint8 view (no copy) of bytes, bytearray, memoryview, mmap or ndarray."""
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("array must be C-contiguous")
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def _check_block_size(block_size: int) -> int:
    if not isinstance(block_size, int) or not 0 < block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size must be an integer in 1..{MAX_BLOCK_SIZE}, got {block_size!r}")
    return block_size


def xor_into(dst: np.ndarray, src) -> None:
    """``dst ^= src`` in place; ``dst`` is a writable uint8 array, ``src`` any buffer.

    ``src`` may be shorter than ``dst`` (only its length is touched) but not longer.
    numpy vectorises uint8 XOR with SIMD, so no wider view is needed.
    """
    s = src if isinstance(src, np.ndarray) and src.dtype == np.uint8 and src.ndim == 1 else as_u8(src)
    n = s.size
    if n > dst.size:
        raise ValueError(f"source of {n} bytes is longer than destination of {dst.size}")
    d = dst[:n]
    np.bitwise_xor(d, s, out=d)


def changed_blocks(old, new, block_size: int = BLOCK_SIZE) -> list[tuple[int, bytes]]:
    """The XOR deltas ``old ^ new`` of the blocks that differ, as (block index, delta).

    Both buffers are zero-padded to the longer one, so growth sends the new tail and a
    shrink sends the old tail (which clears it from the parity). The last delta is
    cut at the padded length, so it may be shorter than ``block_size``.
    """
    _check_block_size(block_size)
    a, b = as_u8(old), as_u8(new)
    common = min(a.size, b.size)
    total = max(a.size, b.size)
    longer = a if a.size > b.size else b
    out: list[tuple[int, bytes]] = []
    # Blocks lying wholly inside both buffers: XOR a bounded window of them at a time
    # into one scratch buffer (<= 16 MiB), then keep the blocks whose XOR is not zero.
    full = common // block_size
    step = max(1, (16 * 1024 * 1024) // block_size)
    scratch = np.empty(min(full, step) * block_size, dtype=np.uint8)
    wide = block_size % 8 == 0  # test for non-zero 8 bytes at a time when blocks allow
    for k0 in range(0, full, step):
        k1 = min(k0 + step, full)
        lo, hi = k0 * block_size, k1 * block_size
        x = scratch[: hi - lo]
        np.bitwise_xor(a[lo:hi], b[lo:hi], out=x)
        words = x.view(np.uint64) if wide else x
        differ = np.flatnonzero(words.reshape(k1 - k0, -1).any(axis=1))
        for d in differ.tolist():
            out.append((k0 + d, x[d * block_size : (d + 1) * block_size].tobytes()))
    # The remaining blocks straddle or pass the end of the shorter buffer: zero-pad it.
    for k in range(full, -(-total // block_size)):
        lo, hi = k * block_size, min((k + 1) * block_size, total)
        delta = np.zeros(hi - lo, dtype=np.uint8)
        if common > lo:
            delta[: common - lo] = np.bitwise_xor(a[lo:common], b[lo:common])
        tail_from = max(lo, common)
        delta[tail_from - lo :] = longer[tail_from:hi]
        if delta.any():
            out.append((k, delta.tobytes()))
    return out


class Parity:
    """The coordinator's in-memory parity checkpoint for one group (N+1 XOR)."""

    def __init__(self, block_size: int = BLOCK_SIZE):
        self.block_size = _check_block_size(block_size)
        self._buf = np.zeros(0, dtype=np.uint8)
        self.sizes: dict[int, int] = {}

    # -- state ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """The logical parity size S_c = max S_i (0 with no rank)."""
        return max(self.sizes.values(), default=0)

    def view(self) -> memoryview:
        """Read-only view of the parity bytes 0..S_c (zero-padded if not yet written)."""
        self._grow(self.nbytes)
        v = self._buf[: self.nbytes].view()
        v.flags.writeable = False
        return memoryview(v.data)

    def _grow(self, size: int) -> None:
        if size > self._buf.size:
            # amortised doubling; fresh memory is zero, i.e. the XOR identity
            new = np.zeros(max(size, min(2 * self._buf.size, size + 256 * 1024 * 1024)), dtype=np.uint8)
            new[: self._buf.size] = self._buf
            self._buf = new

    # -- updates -------------------------------------------------------------
    def set_size(self, rank: int, size: int) -> None:
        """Record rank's checkpoint length S_rank (the parity size is the maximum)."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.sizes[rank] = int(size)
        self._grow(size)

    def forget(self, rank: int) -> None:
        """Drop a rank's size entry (its bytes must already be XORed out by deltas)."""
        self.sizes.pop(rank, None)

    def apply(self, rank: int, block: int, delta) -> None:
        """``parity[block] ^= delta``: fold one block delta of ``rank`` into the parity.

        ``rank`` is not needed for XOR itself; it is part of the signature so that
        other codes (``erasure.RSParity``) can share the coordinator's call site.
        """
        d = as_u8(delta)
        n = d.size
        if block < 0:
            raise ValueError(f"block index must be >= 0, got {block}")
        if n > self.block_size:
            raise ValueError(f"delta of {n} bytes exceeds the block size {self.block_size}")
        lo = block * self.block_size
        self._grow(lo + n)
        xor_into(self._buf[lo : lo + n], d)

    def apply_all(self, rank: int, deltas: Iterable[tuple[int, bytes]], size: int) -> None:
        """Apply one committed checkpoint of ``rank``: all its deltas, then its new size."""
        for block, delta in deltas:
            self.apply(rank, block, delta)
        self.set_size(rank, size)

    # -- recovery ------------------------------------------------------------
    def reconstruct(self, lost: int, survivors: Mapping[int, object]) -> bytes:
        """The lost rank's checkpoint: XOR of every survivor's checkpoint and the parity.

        ``survivors`` maps every other known rank to its checkpoint buffer.
        """
        if lost not in self.sizes:
            raise KeyError(f"rank {lost} is not part of this parity")
        missing = set(self.sizes) - {lost} - set(survivors)
        if missing:
            raise ValueError(f"survivors missing for ranks {sorted(missing)}")
        size = self.sizes[lost]
        self._grow(size)
        out = self._buf[:size].copy()
        for rank, buf in survivors.items():
            if rank == lost:
                raise ValueError("the lost rank cannot also be a survivor")
            if rank not in self.sizes:
                raise ValueError(f"rank {rank} is not part of this parity")
            s = as_u8(buf)
            if s.size != self.sizes[rank]:
                raise ValueError(f"rank {rank} checkpoint is {s.size} bytes, parity expects {self.sizes[rank]}")
            xor_into(out, s[:size])
        return out.tobytes()

    @classmethod
    def recompute(cls, checkpoints: Mapping[int, object], block_size: int = BLOCK_SIZE) -> Parity:
        """Rebuild the parity from scratch from every rank's checkpoint."""
        p = cls(block_size)
        for rank, buf in checkpoints.items():
            s = as_u8(buf)
            p.set_size(rank, s.size)
            xor_into(p._buf[: s.size], s)
        return p

    # -- mirroring -----------------------------------------------------------
    def snapshot(self) -> bytes:
        """A self-describing byte image (block size, sizes, parity) for the backup."""
        head = _SNAP_HEAD.pack(_SNAP_MAGIC, self.block_size, len(self.sizes), 0)
        ranks = b"".join(_SNAP_RANK.pack(r, s) for r, s in sorted(self.sizes.items()))
        return head + ranks + bytes(self.view())

    @classmethod
    def from_snapshot(cls, data) -> Parity:
        """Inverse of ``snapshot``; raises ValueError on a malformed image."""
        mv = memoryview(data).cast("B")
        if len(mv) < _SNAP_HEAD.size:
            raise ValueError("parity snapshot too short")
        magic, block_size, nranks, _ = _SNAP_HEAD.unpack_from(mv, 0)
        if magic != _SNAP_MAGIC:
            raise ValueError("not a parity snapshot")
        off = _SNAP_HEAD.size
        if len(mv) < off + nranks * _SNAP_RANK.size:
            raise ValueError("parity snapshot truncated in its rank table")
        p = cls(block_size)
        for _ in range(nranks):
            rank, size = _SNAP_RANK.unpack_from(mv, off)
            off += _SNAP_RANK.size
            p.sizes[rank] = size
        body = mv[off:]
        if len(body) != p.nbytes:
            raise ValueError(f"parity snapshot body is {len(body)} bytes, expected {p.nbytes}")
        p._grow(p.nbytes)
        p._buf[: p.nbytes] = np.frombuffer(body, dtype=np.uint8)
        return p

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Parity):
            return NotImplemented
        return (
            self.block_size == other.block_size
            and self.sizes == other.sizes
            and bytes(self.view()) == bytes(other.view())
        )

    def __repr__(self) -> str:
        return f"Parity(block_size={self.block_size}, ranks={len(self.sizes)}, nbytes={self.nbytes})"
