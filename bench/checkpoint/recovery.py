"""Recovery time of a rank whose checkpointed state is 256 MiB, on loopback.

Three rank processes (``shoal.ckpt.launcher``), a coordinator and
a backup served in this process. Each rank holds 256 MiB (plus its 256 MiB
checkpoint copy). Rank 1 is killed with SIGKILL once every rank has committed
a checkpoint after checkpoint 0; its replacement process reads the 256 MiB
image, decoded range by range from the two survivors' images and the parity.

Reported: the replacement's image transfer (join to image in memory) and the
coordinator's R (failure detected to every rank running again). Target: R <= 2 s.

    .venv/bin/python bench/checkpoint/recovery.py [--mib 256]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import trio

from shoal.ckpt.launcher import run_app

TARGET = 2.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--ranks", type=int, default=3)
    # 0.3 s: the 256 MiB bigstate app can finish about 0.9 s after checkpoint 0, and a
    # kill after the end measures nothing.
    p.add_argument("--kill-at", type=float, default=0.3, help="seconds after every rank holds checkpoint 0")
    args = p.parse_args()
    log = io.StringIO()
    outcome = trio.run(lambda: run_app("bigstate", args.ranks, size=args.mib, kills=[(1, args.kill_at)],
                                       interval=0.5, out=log, timeout=600.0, block_size=1 << 20))
    print(log.getvalue())
    group = outcome.status["groups"][0]
    rank1 = outcome.rank_stats.get(1, {})
    row = {
        "state_mib": args.mib,
        "ranks": args.ranks,
        "image_transfer_s": rank1.get("recovery_seconds"),
        "recovered_bytes": rank1.get("recovered_bytes"),
        "R_s": group["R"],
        "target_s": TARGET,
        "met": group["R"] <= TARGET if group["R"] else False,
        "bit_identical": outcome.ok,
    }
    print(f"{'state':>8} {'ranks':>5} {'image transfer':>15} {'R (detect->resume)':>19} {'target':>7}  met")
    transfer = f"{row['image_transfer_s']:.3f} s" if row["image_transfer_s"] is not None else "-"
    print(f"{args.mib:>5} MiB {args.ranks:>5} {transfer:>15} {row['R_s']:>17.3f} s {TARGET:>5.1f} s  "
          f"{'yes' if row['met'] else 'NO'}")
    print(f"result bit-identical to the failure-free reference: {outcome.ok}")
    (Path(__file__).with_suffix(".json")).write_text(json.dumps(row, indent=2) + "\n")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
