"""Distributed merge sort (seed IV.B): every rank sorts its share of the records
in sub-blocks (one per step), merges its runs, then the sorted runs are merged
up a binary tree towards rank 0, which ends with every record in order.

size = records per rank (int64 keys drawn from a fixed seed). Steps: SUB sort
steps, one merge step, then one step per tree level (log2 n), the same count
on every rank; a rank that has handed its run on just keeps stepping.
"""

from __future__ import annotations

import numpy as np

SUB = 32  # local sort steps
CHUNK = 1 << 17  # int64 per message (1 MiB)


def _data(rank: int, size: int) -> np.ndarray:
    return np.random.default_rng(1000 + rank).integers(0, 1 << 62, size, dtype=np.int64)


def _levels(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _capacity(rank: int, n: int, size: int) -> int:
    """Records rank may end up holding: its own and those of its tree children."""
    span = 1
    while rank % (2 * span) == 0 and span < n:
        span *= 2
    return size * min(span, n - rank)


def setup(rank, size: int) -> None:
    cap = _capacity(rank.rank, rank.n, size)
    buf = np.zeros(cap, dtype=np.int64)
    buf[:size] = _data(rank.rank, size)
    rank.register("buf", buf)
    # count: valid records; stage: next step to run
    rank.register("ctl", np.array([size, 0], dtype=np.int64))
    rank.params = {"size": size}


async def _send_run(rank, dest: int, run: np.ndarray) -> None:
    await rank.send(dest, np.array([run.size], dtype=np.int64))
    for lo in range(0, run.size, CHUNK):
        await rank.send(dest, run[lo : lo + CHUNK])


async def _recv_run(rank, src: int) -> np.ndarray:
    total = int(np.frombuffer(await rank.recv(src), dtype=np.int64)[0])
    parts, got = [], 0
    while got < total:
        part = np.frombuffer(await rank.recv(src), dtype=np.int64)
        parts.append(part)
        got += part.size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


async def main(rank) -> bytes:
    buf, ctl = rank.state["buf"], rank.state["ctl"]
    size, n, me = rank.params["size"], rank.n, rank.rank
    total_steps = SUB + 1 + _levels(n)
    while ctl[1] < total_steps:
        stage = int(ctl[1])
        count = int(ctl[0])
        if stage < SUB:  # sort one sub-block of our own records
            lo, hi = size * stage // SUB, size * (stage + 1) // SUB
            buf[lo:hi] = np.sort(buf[lo:hi], kind="stable")
        elif stage == SUB:  # merge the sorted sub-blocks
            buf[:count] = np.sort(buf[:count], kind="stable")
        else:  # tree level l: ranks at odd multiples of 2^l hand their run down
            span = 1 << (stage - SUB - 1)
            if count and me % (2 * span) == span:
                await _send_run(rank, me - span, buf[:count].copy())
                ctl[0] = 0
            elif count and me % (2 * span) == 0 and me + span < n:
                other = await _recv_run(rank, me + span)
                merged = np.concatenate([buf[:count], other])
                merged.sort(kind="stable")
                buf[: merged.size] = merged
                ctl[0] = merged.size
        ctl[1] += 1
        await rank.safe_point()
    return buf[: int(ctl[0])].tobytes()


def reference(n: int, size: int) -> list[bytes]:
    everything = np.sort(np.concatenate([_data(r, size) for r in range(n)]), kind="stable")
    return [everything.tobytes()] + [b""] * (n - 1)
