"""A rank with a large state (the recovery benchmark): size MiB of bytes per
rank, of which each step rewrites 1 MiB and passes 8 bytes round a ring."""

from __future__ import annotations

import numpy as np

STEPS = 60
MIB = 1 << 20


def _init(rank: int, size: int) -> np.ndarray:
    x = np.arange(size * MIB // 8, dtype=np.uint64)
    x *= np.uint64(2654435761 + rank)
    return x.view(np.uint8)


def setup(rank, size: int) -> None:
    rank.register("x", _init(rank.rank, size))
    rank.register("i", np.zeros(1, dtype=np.int64))
    rank.params = {"size": size}


def _step(x: np.ndarray, i: int, token: int, size: int) -> None:
    lo = (i * MIB) % (size * MIB)
    x[lo : lo + MIB] ^= np.uint8((token + i) & 0xFF)


async def main(rank) -> bytes:
    x, i = rank.state["x"], rank.state["i"]
    right, left = (rank.rank + 1) % rank.n, (rank.rank - 1) % rank.n
    while i[0] < STEPS:
        await rank.send(right, i)
        token = int(np.frombuffer(await rank.recv(left), dtype=np.int64)[0])
        _step(x, int(i[0]), token, rank.params["size"])
        i[0] += 1
        await rank.safe_point()
    return x[:64].tobytes() + np.array([int(x.sum(dtype=np.uint64))], dtype=np.uint64).tobytes()


def reference(n: int, size: int) -> list[bytes]:
    out = []
    for r in range(n):
        x = _init(r, size)
        for i in range(STEPS):
            _step(x, i, i, size)
        out.append(x[:64].tobytes() + np.array([int(x.sum(dtype=np.uint64))], dtype=np.uint64).tobytes())
    return out
