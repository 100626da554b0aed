"""O, L, R and r for blocking (Plank's N+1 parity) and enhanced (the seed's
scheme) on the three applications, laid out like the seed's Tables 10-12.

Each cell is two runs of the app as real processes on loopback (4 or 9 ranks,
a coordinator and a backup), checkpointing every 0.2 s: a failure-free run for
O and L, and a run with rank 1 killed with SIGKILL 1.5 s in and replaced, for R. O is the mean time a
checkpoint added to a rank's run (enhanced: the pause to capture the deltas;
blocking: the freeze, from reaching the round's step until every rank has
committed); L is the mean time from the grant (blocking: the round's start) to
the commit; R is the time from the failure's detection until every rank runs
again. r is Vaidya's overhead ratio (seed equations 1-3) at the seed's
lambda = 6.301e-6 per second. Every run's result is checked bit for bit.

Target: enhanced O <= half of blocking O, on every app.

    .venv/bin/python bench/checkpoint/overhead.py
"""

from __future__ import annotations

import io
import json
import sys
from functools import partial
from pathlib import Path

import trio

from shoal.ckpt.launcher import run_app
from shoal.core.checkpoint.overhead import model

LAMBDA = 6.301e-6
APPS = [("mergesort", "Table 10: merge sort", 4, 3_000_000),
        ("cannon", "Table 11: matrix multiplication (Cannon)", 9, 700),
        ("apsp", "Table 12: all pairs shortest paths", 4, 200)]


def main() -> int:
    rows = []
    ok = True
    for app, title, ranks, size in APPS:
        print(f"\n{title} ({ranks} ranks, size {size})")
        print(f"{'':<12} {'O ms':>9} {'L ms':>9} {'R ms':>9} {'r':>10}   checkpoints  bit-identical")
        cells = {}
        for mode in ("blocking", "enhanced"):
            # O and L from a failure-free run; R from a second run with rank 1 killed.
            runs = {}
            for kills in ([], [(1, 1.5)]):
                log = io.StringIO()
                runs[bool(kills)] = trio.run(partial(run_app, app, ranks, size=size, kills=kills, mode=mode,
                                                     interval=0.2, out=log, timeout=300.0))
            g, gk = runs[False].status["groups"][0], runs[True].status["groups"][0]
            O, L, R = g["O"], g["L"], gk["R"]  # noqa: E741 - the seed's names
            r = model(O, L, R, 1 / LAMBDA).r if O > 0 else float("nan")
            both = runs[False].ok and runs[True].ok
            cells[mode] = {"O": O, "L": L, "R": R, "r": r, "checkpoints": g["numbers"], "ok": both,
                           "recovered": gk["epoch"] > 0}
            ok &= both
            name = "N+1 Parity" if mode == "blocking" else "Proposed"
            print(f"{name:<12} {O * 1e3:>9.2f} {L * 1e3:>9.2f} {R * 1e3:>9.1f} {r:>10.6f}   "
                  f"{str(g['numbers']):<12} {both}")
        ratio = cells["enhanced"]["O"] / cells["blocking"]["O"] if cells["blocking"]["O"] else float("nan")
        met = ratio <= 0.5
        print(f"enhanced O / blocking O = {ratio:.3f} (target <= 0.5: {'met' if met else 'MISSED'})")
        rows.append({"app": app, "ranks": ranks, "size": size, **{m: c for m, c in cells.items()},
                     "O_ratio": ratio, "target_met": met})
    Path(__file__).with_suffix(".json").write_text(json.dumps({"lambda": LAMBDA, "rows": rows}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
