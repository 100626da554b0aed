"""Reed-Solomon parity with m holders: survives any m simultaneous failures.

Beyond the seed (which tolerates one failure per parity group), as the issue asks.

Theory of operation
-------------------
k ranks' checkpoints are the k data shards, each zero-padded to the largest size
S_c. A systematic Reed-Solomon code over GF(2^8) adds m parity shards; any k of the
k+m shards give back all k data shards. The byte-wise encoding is linear:

    parity_j[x] = XOR_i  c_ij * data_i[x]        (products in GF(2^8))

so, exactly like N+1 XOR parity (which is the case m = 1 with every c_i0 = 1), a
rank's change from old to new updates every parity holder with its block delta:

    parity_j[block] ^= c_ij * (old XOR new)[block]

``RSParity`` is the coordinator's counterpart of ``parity.Parity`` built on that
rule: the same ``apply``/``set_size``/``snapshot`` calls, m parity buffers, and a
``reconstruct`` that takes up to m lost ranks.

Encoding and decoding whole shards use zfec (a C implementation of Rizzo's
Vandermonde code, measured at ~700 MB/s here, see bench/checkpoint/parity.py). The
coefficients c_ij are read out of zfec itself (encode the unit vector e_i, one byte
long) and the products c * delta use GF(2^8) tables built here with zfec's field
polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11d); tests/checkpoint/test_erasure.py
checks that these products equal zfec's own encoding for every byte value, and
that applying deltas equals re-encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np
import zfec

from shoal.core.checkpoint.parity import BLOCK_SIZE, _check_block_size, as_u8, xor_into

FIELD_POLY = 0x11D
MAX_SHARDS = 256  # k + m <= 256 in GF(2^8)


def _gf_tables() -> np.ndarray:
    """MUL[a, b] = a * b in GF(2^8) modulo FIELD_POLY, as a 256x256 uint8 table."""
    exp = np.zeros(512, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= FIELD_POLY
    exp[255:510] = exp[0:255]
    mul = exp[(log[:, None] + log[None, :])].astype(np.uint8)
    mul[0, :] = 0
    mul[:, 0] = 0
    return mul


MUL = _gf_tables()


_MUL16: dict[int, np.ndarray] = {}


def _mul16(c: int) -> np.ndarray:
    """c times both bytes of every uint16 (little-endian pairs): a 128 KiB table that
    halves the number of lookups. Built on first use; at most 256 of them (32 MiB)."""
    t = _MUL16.get(c)
    if t is None:
        pairs = np.arange(65536)
        row = MUL[c].astype(np.uint16)
        t = _MUL16[c] = row[pairs & 0xFF] | (row[pairs >> 8] << 8)
    return t


def gf_mul(c: int, data) -> np.ndarray:
    """c * data byte-wise in GF(2^8) (a new uint8 array)."""
    d = as_u8(data)
    even = d.size & ~1
    out = np.empty(d.size, dtype=np.uint8)
    np.take(_mul16(c), d[:even].view(np.uint16), out=out[:even].view(np.uint16))
    if even != d.size:
        out[-1] = MUL[c][d[-1]]
    return out


class ReedSolomon:
    """A systematic (k + m, k) Reed-Solomon code: k data shards, m parity shards."""

    def __init__(self, k: int, m: int):
        if not (k >= 1 and m >= 1 and k + m <= MAX_SHARDS):
            raise ValueError(f"need k >= 1, m >= 1 and k + m <= {MAX_SHARDS}, got k={k} m={m}")
        self.k, self.m = k, m
        self._enc = zfec.Encoder(k, k + m)
        self._dec = zfec.Decoder(k, k + m)
        self._parity_nums = tuple(range(k, k + m))
        # coefficients[i][j] = c_ij, read from zfec by encoding the unit vector e_i
        self.coefficients: list[list[int]] = []
        for i in range(k):
            unit = tuple(b"\x01" if x == i else b"\x00" for x in range(k))
            self.coefficients.append([p[0] for p in self._enc.encode(unit, self._parity_nums)])

    def encode(self, shards: list) -> list[bytes]:
        """The m parity shards of k data shards (zero-padded to the longest)."""
        if len(shards) != self.k:
            raise ValueError(f"expected {self.k} data shards, got {len(shards)}")
        size = max(len(as_u8(s)) for s in shards)
        if size == 0:
            return [b""] * self.m
        padded = tuple(_pad(s, size) for s in shards)
        return [bytes(p) for p in self._enc.encode(padded, self._parity_nums)]

    def decode(self, shards: Mapping[int, object], sizes) -> list[bytes]:
        """All k data shards from any k of the k+m (indices 0..k-1 data, k.. parity).

        ``sizes`` gives the k data shards' real lengths (list or dict by index)."""
        sizes = [sizes[i] for i in range(self.k)]
        have = sorted(i for i in shards if 0 <= i < self.k + self.m)
        if len(have) < self.k:
            raise ValueError(f"need {self.k} shards to decode, have {len(have)}")
        have = have[: self.k]
        size = max(len(as_u8(shards[i])) for i in have)
        if size == 0:
            return [b"" for _ in sizes]
        blocks = [_pad(shards[i], size) for i in have]
        data = self._dec.decode(blocks, have)
        return [bytes(d)[:n] for d, n in zip(data, sizes, strict=False)]

    def delta(self, i: int, delta) -> list[np.ndarray]:
        """The m parity contributions c_ij * delta of a change ``delta`` to shard i."""
        return [gf_mul(c, delta) for c in self.coefficients[i]]

    def apply_delta(self, parities: list[np.ndarray], i: int, offset: int, delta) -> None:
        """parity_j[offset:] ^= c_ij * delta for every holder j, in place."""
        n = len(as_u8(delta))
        for p, contrib in zip(parities, self.delta(i, delta), strict=False):
            xor_into(p[offset : offset + n], contrib)


def _pad(buf, size: int):
    b = as_u8(buf)
    if b.size == size:
        return b.tobytes() if not isinstance(buf, bytes) else buf
    out = np.zeros(size, dtype=np.uint8)
    out[: b.size] = b
    return out.tobytes()


_SNAP_HEAD = struct.Struct("!6sIIII")  # magic, block size, k, m, reserved
_SNAP_MAGIC = b"SHRSP1"


class RSParity:
    """The coordinator's Reed-Solomon parity for a group of k ranks (0..k-1), m holders.

    Same call shape as ``parity.Parity``; ``views()`` gives the m parity buffers (one
    per parity holder), ``reconstruct`` rebuilds up to m lost ranks.
    """

    def __init__(self, k: int, m: int, block_size: int = BLOCK_SIZE):
        self.code = ReedSolomon(k, m)
        self.k, self.m = k, m
        self.block_size = _check_block_size(block_size)
        self._bufs = [np.zeros(0, dtype=np.uint8) for _ in range(m)]
        self.sizes: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        return max(self.sizes.values(), default=0)

    def _grow(self, size: int) -> None:
        for j, b in enumerate(self._bufs):
            if size > b.size:
                new = np.zeros(max(size, min(2 * b.size, size + 256 * 1024 * 1024)), dtype=np.uint8)
                new[: b.size] = b
                self._bufs[j] = new

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.k:
            raise ValueError(f"rank {rank} is outside 0..{self.k - 1}")

    def views(self) -> list[memoryview]:
        self._grow(self.nbytes)
        return [b[: self.nbytes].data.toreadonly() for b in self._bufs]

    def set_size(self, rank: int, size: int) -> None:
        self._check_rank(rank)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.sizes[rank] = int(size)
        self._grow(size)

    def apply(self, rank: int, block: int, delta) -> None:
        """Fold one block delta of ``rank`` into every parity holder."""
        self._check_rank(rank)
        n = len(as_u8(delta))
        if block < 0:
            raise ValueError(f"block index must be >= 0, got {block}")
        if n > self.block_size:
            raise ValueError(f"delta of {n} bytes exceeds the block size {self.block_size}")
        lo = block * self.block_size
        self._grow(lo + n)
        self.code.apply_delta(self._bufs, rank, lo, delta)

    def apply_all(self, rank: int, deltas: Iterable[tuple[int, bytes]], size: int) -> None:
        for block, delta in deltas:
            self.apply(rank, block, delta)
        self.set_size(rank, size)

    def reconstruct(
        self, lost: Iterable[int], survivors: Mapping[int, object], holders: Iterable[int] | None = None
    ) -> dict[int, bytes]:
        """The checkpoints of up to m lost ranks from the survivors and the parity.

        ``holders`` lists the parity holders (0..m-1) whose buffers are usable
        (default all); at least as many as there are lost ranks are needed."""
        lost = sorted(set(lost))
        if len(lost) > self.m:
            raise ValueError(f"{len(lost)} lost ranks exceed the {self.m} this code survives")
        holders = sorted(set(range(self.m) if holders is None else holders))
        if any(not 0 <= j < self.m for j in holders):
            raise ValueError(f"parity holders must be in 0..{self.m - 1}, got {holders}")
        if len(holders) < len(lost):
            raise ValueError(f"{len(lost)} lost ranks need as many parity holders, have {len(holders)}")
        for r in lost:
            if r not in self.sizes:
                raise KeyError(f"rank {r} is not part of this parity")
        missing = set(range(self.k)) - set(lost) - set(survivors)
        if missing:
            raise ValueError(f"survivors missing for ranks {sorted(missing)}")
        size = self.nbytes
        self._grow(size)
        shards: dict[int, object] = {i: survivors[i] for i in range(self.k) if i not in lost}
        for r, buf in shards.items():
            if as_u8(buf).size != self.sizes.get(r, 0):
                raise ValueError(f"rank {r} checkpoint is {as_u8(buf).size} bytes, "
                                 f"parity expects {self.sizes.get(r, 0)}")
        for j in holders[: len(lost)]:
            shards[self.k + j] = self._bufs[j][:size]
        data = self.code.decode(shards, [self.sizes.get(i, 0) for i in range(self.k)])
        return {r: data[r] for r in lost}

    @classmethod
    def recompute(cls, k: int, m: int, checkpoints: Mapping[int, object], block_size: int = BLOCK_SIZE) -> RSParity:
        p = cls(k, m, block_size)
        for rank, buf in checkpoints.items():
            p.set_size(rank, as_u8(buf).size)
        size = p.nbytes
        if size:
            parity = p.code.encode([checkpoints.get(i, b"") for i in range(k)])
            for j, pj in enumerate(parity):
                p._bufs[j][:size] = np.frombuffer(pj, dtype=np.uint8)
        return p

    def snapshot(self) -> bytes:
        head = _SNAP_HEAD.pack(_SNAP_MAGIC, self.block_size, self.k, self.m, 0)
        sizes = struct.pack(f"!{self.k}q", *[self.sizes.get(i, -1) for i in range(self.k)])
        return head + sizes + b"".join(bytes(v) for v in self.views())

    @classmethod
    def from_snapshot(cls, data) -> RSParity:
        mv = memoryview(data).cast("B")
        if len(mv) < _SNAP_HEAD.size:
            raise ValueError("RS parity snapshot too short")
        magic, block_size, k, m, _ = _SNAP_HEAD.unpack_from(mv, 0)
        if magic != _SNAP_MAGIC:
            raise ValueError("not an RS parity snapshot")
        p = cls(k, m, block_size)
        off = _SNAP_HEAD.size
        if len(mv) < off + 8 * k:
            raise ValueError("RS parity snapshot truncated in its size table")
        for i, s in enumerate(struct.unpack_from(f"!{k}q", mv, off)):
            if s >= 0:
                p.sizes[i] = s
        off += 8 * k
        n = p.nbytes
        if len(mv) - off != n * m:
            raise ValueError(f"RS parity snapshot body is {len(mv) - off} bytes, expected {n * m}")
        p._grow(n)
        for j in range(m):
            p._bufs[j][:n] = np.frombuffer(mv[off + j * n : off + (j + 1) * n], dtype=np.uint8)
        return p

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RSParity):
            return NotImplemented
        return (
            (self.k, self.m, self.block_size, self.sizes) == (other.k, other.m, other.block_size, other.sizes)
            and [bytes(v) for v in self.views()] == [bytes(v) for v in other.views()]
        )
