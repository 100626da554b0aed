"""Cannon's matrix multiplication (seed IV.B) on a q x q torus of n = q^2 ranks.

Rank (i, j) holds blocks of A and B, pre-skewed (A_{i,i+j}, B_{i+j,j}); each of
the q steps adds A @ B to its C block, then passes A one rank left and B one
rank up. size = block edge b (float64, the matrix is qb x qb). The reference
accumulates the same block products in the same order, so results match bit
for bit.
"""

from __future__ import annotations

import math

import numpy as np


def _q(n: int) -> int:
    q = math.isqrt(n)
    if q * q != n:
        raise ValueError(f"Cannon's algorithm needs a square number of ranks, not {n}")
    return q


def _block(which: str, bi: int, bj: int, b: int) -> np.ndarray:
    seed = {"A": 1, "B": 2}[which] * 1_000_003 + bi * 1009 + bj
    return np.random.default_rng(seed).standard_normal((b, b))


def setup(rank, size: int) -> None:
    q = _q(rank.n)
    i, j = divmod(rank.rank, q)
    rank.register("A", _block("A", i, (i + j) % q, size))
    rank.register("B", _block("B", (i + j) % q, j, size))
    rank.register("C", np.zeros((size, size)))
    rank.register("k", np.zeros(1, dtype=np.int64))
    rank.params = {"b": size}


async def main(rank) -> bytes:
    q = _q(rank.n)
    i, j = divmod(rank.rank, q)
    A, B, C, k = (rank.state[x] for x in "ABCk")
    left, right = i * q + (j - 1) % q, i * q + (j + 1) % q
    up, down = ((i - 1) % q) * q + j, ((i + 1) % q) * q + j
    while k[0] < q:
        C += A @ B
        if q > 1:
            await rank.send(left, A)
            await rank.send(up, B)
            A[:] = np.frombuffer(await rank.recv(right), dtype=np.float64).reshape(A.shape)
            B[:] = np.frombuffer(await rank.recv(down), dtype=np.float64).reshape(B.shape)
        k[0] += 1
        await rank.safe_point()
    return C.tobytes()


def reference(n: int, size: int) -> list[bytes]:
    q = _q(n)
    out = []
    for r in range(n):
        i, j = divmod(r, q)
        C = np.zeros((size, size))
        for k in range(q):
            m = (i + j + k) % q
            C += _block("A", i, m, size) @ _block("B", m, j, size)
        out.append(C.tobytes())
    return out
