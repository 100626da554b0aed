"""A ring: every step each rank passes its vector to the next rank and mixes in
the one it receives. Small and message-heavy, for the property tests.

size = number of steps; the vector has 4096 int64 (32 KiB, one block at the
default 64 KiB, several at small block sizes).
"""

from __future__ import annotations

import numpy as np

WIDTH = 4096
P = 2_147_483_647


def _init(rank: int) -> np.ndarray:
    return (np.arange(WIDTH, dtype=np.int64) * (rank + 7) + rank) % P


def setup(rank, size: int) -> None:
    rank.register("x", _init(rank.rank))
    rank.register("i", np.zeros(1, dtype=np.int64))
    rank.params = {"steps": size}


def _mix(x: np.ndarray, y: np.ndarray, i: int) -> np.ndarray:
    return (x * 31 + np.roll(y, 1) + i) % P


async def main(rank) -> bytes:
    x, i = rank.state["x"], rank.state["i"]
    right, left = (rank.rank + 1) % rank.n, (rank.rank - 1) % rank.n
    while i[0] < rank.params["steps"]:
        await rank.send(right, x)
        y = np.frombuffer(await rank.recv(left), dtype=np.int64)
        x[:] = _mix(x, y, int(i[0]))
        i[0] += 1
        await rank.safe_point()
    return x.tobytes()


def reference(n: int, size: int) -> list[bytes]:
    xs = [_init(r) for r in range(n)]
    for i in range(size):
        xs = [_mix(xs[r], xs[(r - 1) % n], i) for r in range(n)]
    return [x.tobytes() for x in xs]
