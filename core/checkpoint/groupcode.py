"""One interface over the two parity codes, with chunk-wise recovery.

The coordinator and the backup hold one :class:`GroupCode` per group: m = 1 is
the seed's N+1 XOR parity (:class:`parity.Parity`), m >= 2 is Reed-Solomon
(:class:`erasure.RSParity`). Both are linear, so a rank's block delta is folded
in the same way (``apply``) and deltas commute: the order in which ranks'
checkpoints arrive does not matter, and the backup can apply them in any order.

Recovery and recomputation work on byte ranges (``decode_range``,
``encode_range``) so that a 256 MiB checkpoint never has to cross the RPC
transport, or sit in memory, as one piece: the coordinator asks every survivor
for the same range of its checkpoint, decodes that range and hands it on.
"""

from __future__ import annotations

import numpy as np

from shoal.core.checkpoint.erasure import RSParity
from shoal.core.checkpoint.parity import Parity, as_u8, xor_into


def _padded(buf, length: int) -> np.ndarray:
    b = as_u8(buf)
    if b.size == length:
        return b
    out = np.zeros(length, dtype=np.uint8)
    out[: min(b.size, length)] = b[:length]
    return out


class GroupCode:
    def __init__(self, n: int, m: int, block_size: int):
        self.n, self.m, self.block_size = n, m, block_size
        self.p: Parity | RSParity = Parity(block_size) if m == 1 else RSParity(n, m, block_size)

    @property
    def sizes(self) -> dict[int, int]:
        return self.p.sizes

    @property
    def nbytes(self) -> int:
        """Bytes held: the parity size times the number of parity holders."""
        return self.p.nbytes * self.m

    def holders(self) -> list[memoryview]:
        return [self.p.view()] if self.m == 1 else self.p.views()

    def apply(self, rank: int, block: int, delta) -> None:
        self.p.apply(rank, block, delta)

    def set_size(self, rank: int, size: int) -> None:
        self.p.set_size(rank, size)

    # -- ranges of the concatenated holders (mirroring) -------------------------
    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the holders laid end to end."""
        whole = self.p.nbytes
        out = bytearray()
        for j, h in enumerate(self.holders()):
            lo, hi = max(offset, j * whole), min(offset + length, (j + 1) * whole)
            if lo < hi:
                out += h[lo - j * whole : hi - j * whole]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Inverse of ``read`` (the sizes must be set first)."""
        whole = self.p.nbytes
        bufs = [self.p._buf] if self.m == 1 else self.p._bufs  # noqa: SLF001 - restore path
        src = as_u8(data)
        for j, buf in enumerate(bufs):
            lo, hi = max(offset, j * whole), min(offset + src.size, (j + 1) * whole)
            if lo < hi:
                buf[lo - j * whole : hi - j * whole] = src[lo - offset : hi - offset]

    # -- recovery ---------------------------------------------------------------
    def decode_range(self, lost: list[int], chunks: dict[int, object], offset: int, length: int) -> dict[int, bytes]:
        """Bytes [offset, offset+length) of every lost rank's checkpoint.

        ``chunks`` holds the same range of every survivor's checkpoint (shorter
        ones are zero-padded, as in the parity)."""
        holders = self.holders()
        if self.m == 1:
            if len(lost) != 1:
                raise ValueError(f"XOR parity recovers one rank, not {len(lost)}")
            out = _padded(holders[0][offset : offset + length], length).copy()
            for rank, chunk in chunks.items():
                if rank in self.sizes:
                    xor_into(out, _padded(chunk, length))
            return {lost[0]: out.tobytes()}
        if len(lost) > self.m:
            raise ValueError(f"{len(lost)} lost ranks exceed the {self.m} this code survives")
        shards: dict[int, object] = {}
        for i in range(self.n):
            if i not in lost:
                shards[i] = _padded(chunks.get(i, b""), length).tobytes()
        for j in range(len(lost)):
            shards[self.n + j] = _padded(holders[j][offset : offset + length], length).tobytes()
        data = self.p.code.decode(shards, [length] * self.n)
        return {r: data[r] for r in lost}

    def encode_range(self, chunks: dict[int, object], offset: int, length: int) -> None:
        """Recompute the holders' bytes [offset, offset+length) from every rank's range."""
        bufs = [self.p._buf] if self.m == 1 else self.p._bufs  # noqa: SLF001 - rebuild path
        if self.m == 1:
            acc = np.zeros(length, dtype=np.uint8)
            for chunk in chunks.values():
                xor_into(acc, _padded(chunk, length))
            bufs[0][offset : offset + length] = acc
            return
        parity = self.p.code.encode([_padded(chunks.get(i, b""), length).tobytes() for i in range(self.n)])
        for j, pj in enumerate(parity):
            bufs[j][offset : offset + length] = np.frombuffer(pj, dtype=np.uint8)
