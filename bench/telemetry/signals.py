"""Which of the collector's signals move when each HPAS fault runs on this machine.

For each injector kind: the collector (every default source, real /proc and
/sys) samples every 0.5 s for ``--normal`` seconds, then for ``--fault``
seconds while the fault runs (at ``--intensity``), then the fault's resources
are released. For every metric, the shift of its mean during the fault is
expressed in standard deviations of the normal period (z); the table lists,
per kind, the largest shifts (a metric flat in the normal period is scaled by
5 % of the larger mean instead, so |z| <= 20 for it), and what PSI, the run queue, the node's network
total and the page-fault rate did. This is not a detector benchmark (that is
bench/telemetry/live.py): it says whether a fault is visible in the inputs at
all, which the detector cannot do better than.

    .venv/bin/python bench/telemetry/signals.py [--normal 6] [--fault 6] [--intensity 1]

Prints a table and writes bench/telemetry/signals.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

from shoal.daemons.telemetry.inject import KINDS, inject
from shoal.daemons.telemetry.sources import Collector, default_sources

HERE = Path(__file__).resolve().parent
PERIOD = 0.5
WATCH = ("psi_cpu_some.stalled_per_s", "psi_memory_some.stalled_per_s", "psi_io_some.stalled_per_s",
         "proc_running", "cpu_all_util", "net_all_tx.bytes_per_s", "vm_pgfault_per_s", "mem_used.bytes")


def collect(col: Collector, seconds: float) -> list[dict[str, float]]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(col.sample(time.time()))
        time.sleep(PERIOD)  # the sampling period itself, not a synchronisation
    return out


def stats(rows: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = set().union(*rows) if rows else set()
    res = {}
    for k in keys:
        xs = [r[k] for r in rows if k in r]
        m = sum(xs) / len(xs)
        res[k] = (m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)))
    return res


def one(kind: str, normal_s: float, fault_s: float, intensity: float | None, directory: str) -> dict:
    col = Collector(default_sources(Path("/"), gpu=False))
    col.sample(time.time())
    normal = stats(collect(col, normal_s))
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(
        inject(kind, fault_s, intensity=intensity, directory=directory)))
    t.start()
    fault_rows = collect(col, fault_s)
    t.join(fault_s + 60)
    fault = stats(fault_rows[1:])  # the first sample straddles the start
    shifts = {}
    for k, (m, _) in fault.items():
        if k in normal:
            nm, ns = normal[k]
            # a metric flat in the normal period (load_15 over seconds, a counter at 0) would give
            # an infinite z: its scale is at least 5 % of the larger of its two means, so a jump
            # from 0 reads as z = 20, the most this table says
            shifts[k] = (m - nm) / max(ns, 0.05 * max(abs(nm), abs(m)), 1e-12)
    top = sorted(shifts, key=lambda k: -abs(shifts[k]))[:5]
    return {"kind": kind, "injected": result, "top": [(k, shifts[k]) for k in top],
            "watch": {k: {"normal": normal.get(k, (None,))[0], "fault": fault.get(k, (None,))[0],
                          "z": shifts.get(k)} for k in WATCH}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--normal", type=float, default=6.0)
    ap.add_argument("--fault", type=float, default=6.0)
    ap.add_argument("--intensity", type=float, default=None, help="default: each kind's own")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory of the io kinds")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS))
    args = ap.parse_args()
    rows = [one(k, args.normal, args.fault, args.intensity, args.dir) for k in args.kinds]
    print(f"{'kind':<12} {'PSI cpu/mem/io (z)':>22} {'net_all tx z':>13} {'faults/s z':>11}  largest shifts (z)")
    for r in rows:
        w = r["watch"]

        def z(k: str, w=w) -> str:
            return "-" if w[k]["z"] is None else f"{w[k]['z']:.1f}"

        psi = "/".join(z(f"psi_{x}_some.stalled_per_s") for x in ("cpu", "memory", "io"))
        top = ", ".join(f"{k} {v:+.0f}" for k, v in r["top"][:3])
        print(f"{r['kind']:<12} {psi:>22} {z('net_all_tx.bytes_per_s'):>13} {z('vm_pgfault_per_s'):>11}  {top}")
    out = {"kinds": rows, "normal_seconds": args.normal, "fault_seconds": args.fault, "period": PERIOD,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_at_end": os.getloadavg()},
           "command": "python bench/telemetry/signals.py " + " ".join(sys.argv[1:])}
    (HERE / "signals.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
