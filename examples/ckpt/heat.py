"""Heat diffusion along a rod, split over N ranks that exchange halos, checkpointed by shoal.ckpt.

    shoal ckpt run --ranks 4 -- python examples/ckpt/heat.py OUT_DIR [CELLS_PER_RANK STEPS]

Rank r holds cells r*CELLS .. (r+1)*CELLS-1 of the rod (a hot middle, cold
ends held at 0). Every step it sends its edge cells to its neighbours, receives
theirs (the halo) and updates its cells; after STEPS steps it writes them to
OUT_DIR/rank<r>.bin. Kill a rank at any moment: `shoal ckpt run` starts it
again under the same id and the files come out bit-identical.
"""

import os
import sys
from pathlib import Path

import numpy as np
import trio

from shoal.ckpt import rank_from_env

ALPHA = 0.25  # diffusion number; the explicit scheme is stable up to 0.5


def initial(first: int, cells: int, total: int) -> np.ndarray:
    x = np.arange(first, first + cells)
    return np.where(np.abs(x - total / 2) < total / 8, 100.0, 0.0)


def stencil(u: np.ndarray, left: float, right: float) -> np.ndarray:
    """One explicit step of u_t = u_xx; ``left`` and ``right`` are the neighbours' edge cells."""
    padded = np.concatenate(([left], u, [right]))
    return u + ALPHA * (padded[:-2] - 2 * u + padded[2:])


async def main(rank) -> bytes:
    u, step = rank.state["u"], rank.state["step"]  # registered: restored after a rollback
    left, right = rank.rank - 1, rank.rank + 1
    while step[0] < rank.params["steps"]:
        if left >= 0:
            await rank.send(left, u[:1])
        if right < rank.n:
            await rank.send(right, u[-1:])
        halo_left = np.frombuffer(await rank.recv(left))[0] if left >= 0 else 0.0
        halo_right = np.frombuffer(await rank.recv(right))[0] if right < rank.n else 0.0
        u[:] = stencil(u, halo_left, halo_right)  # in place
        step[0] += 1
        await rank.safe_point()  # a checkpoint may be taken here
    return u.tobytes()


def run(out: Path, cells: int, steps: int) -> None:
    rank = rank_from_env()  # rank id, group, coordinator, token: from `shoal ckpt run`
    rank.register("u", initial(rank.rank * cells, cells, rank.n * cells))
    rank.register("step", np.zeros(1, np.int64))
    rank.params = {"steps": steps}
    result = trio.run(rank.run, main)  # raises GroupFailed if the group cannot recover
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"rank{rank.rank}.tmp"
    tmp.write_bytes(result)
    os.replace(tmp, out / f"rank{rank.rank}.bin")


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 3):
        sys.exit("usage: heat.py OUT_DIR [CELLS_PER_RANK STEPS]")
    cells, steps = (int(args[1]), int(args[2])) if len(args) == 3 else (10_000, 600)
    run(Path(args[0]), cells, steps)
