"""All-pairs shortest paths (seed IV.B): Floyd-Warshall with the distance
matrix split by rows over the ranks. At step k the owner of row k sends it to
every other rank, and each rank relaxes its rows through vertex k. Communication
intensive, as the seed says. size = vertices per rank; edge weights are small
integers (held as float64, so every sum is exact and results match the
sequential reference bit for bit).
"""

from __future__ import annotations

import numpy as np


def _graph(v: int) -> np.ndarray:
    rng = np.random.default_rng(4242 + v)
    w = rng.integers(1, 100, (v, v)).astype(np.float64)
    w[rng.random((v, v)) < 0.7] = np.inf  # a sparse graph
    np.fill_diagonal(w, 0.0)
    return w


def setup(rank, size: int) -> None:
    v = size * rank.n
    rank.register("D", _graph(v)[rank.rank * size : (rank.rank + 1) * size].copy())
    rank.register("k", np.zeros(1, dtype=np.int64))
    rank.params = {"rows": size, "v": v}


async def main(rank) -> bytes:
    D, k = rank.state["D"], rank.state["k"]
    rows, v, me = rank.params["rows"], rank.params["v"], rank.rank
    while k[0] < v:
        kk = int(k[0])
        owner = kk // rows
        if owner == me:
            row = D[kk - me * rows].copy()
            for dest in range(rank.n):
                if dest != me:
                    await rank.send(dest, row)
        else:
            row = np.frombuffer(await rank.recv(owner), dtype=np.float64)
        np.minimum(D, D[:, kk : kk + 1] + row[None, :], out=D)
        k[0] += 1
        await rank.safe_point()
    return D.tobytes()


def reference(n: int, size: int) -> list[bytes]:
    D = _graph(size * n)
    for kk in range(D.shape[0]):
        np.minimum(D, D[:, kk : kk + 1] + D[kk][None, :], out=D)
    return [D[r * size : (r + 1) * size].tobytes() for r in range(n)]
