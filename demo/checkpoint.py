"""The checkpoint part of ``shoal demo``: an app as real processes, a rank killed
with SIGKILL and recovered from the parity, the result checked bit for bit."""

from __future__ import annotations

from shoal.ckpt.launcher import describe, run_app


async def tour(size_mib: int, timeout: float, out) -> int:
    print("diskless checkpointing: all-pairs shortest paths on 4 rank processes; rank 1 is killed with SIGKILL "
          "1 s in, a replacement process receives its state from the coordinator (XOR of the survivors' "
          "checkpoints and the parity) and the survivors roll back to their own", file=out)
    outcome = await run_app("apsp", 4, size=200, kills=[(1, 1.0)], mode="enhanced", interval=0.2,
                            out=out, timeout=min(timeout, 55.0))
    describe(outcome, out)
    return 0 if outcome.ok else 1
