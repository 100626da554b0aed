"""e-Science Central's "sleep 0" invocation rate, through one dispatcher.

    .venv/bin/python bench/dispatch/rate.py [--workers 2] [--builtin 20000] [--subprocess 3000]

A dispatcher and ``--workers`` worker daemons run on loopback (real processes,
real RPC). One job of N independent tasks is submitted and timed from the
submission to the moment the dispatcher records the job done (its own
timestamps), so the rate includes parsing and storing the job, dispatching
every task through the policy, leasing, running, reporting and the durable
completion of every task:

* builtin: ``builtin = "sleep 0"``, run inside the worker (no process);
* subprocess: ``command = ["true"]``, each task its own process;
* workflow: chains of 10 builtin ``sleep 0`` tasks fused into one invocation
  (``bundle_chains``), seed 002's "workflow of ten tasks" (tasks/s counted).

Targets (issue 6): >= 2,000 builtin tasks/s and >= 500 subprocess tasks/s.
For comparison: Falkon published 487 tasks/s; e-Science Central 55
invocations/s with 200 engines. Results: printed, and saved to rate.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import trio
from cluster import Cluster, save

HERE = Path(__file__).resolve().parent


def job(kind: str, n: int) -> dict:
    if kind == "builtin":
        return {"name": "rate-builtin", "tasks": [{"name": "t", "builtin": "sleep 0", "replicas": n}]}
    if kind == "subprocess":
        return {"name": "rate-proc", "tasks": [{"name": "t", "command": ["true"], "replicas": n}]}
    chains = n // 10
    tasks = []
    for c in range(chains):
        for k in range(10):
            tasks.append({"name": f"c{c}s{k}", "builtin": "sleep 0", **({"deps": [f"c{c}s{k - 1}"]} if k else {})})
    return {"name": "rate-workflow", "bundle_chains": True, "tasks": tasks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--builtin", type=int, default=20000, help="tasks in the builtin run")
    p.add_argument("--subprocess", type=int, default=3000, help="tasks in the subprocess run")
    p.add_argument("--workflow", type=int, default=10000, help="tasks in the 10-task workflow run")
    p.add_argument("--repeat", type=int, default=3, help="runs per kind; the best is reported")
    p.add_argument("--proc-slots", type=int, default=8,
                   help="slots per worker for subprocess tasks (`true` barely uses a core, so more than the cores)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    results = {"workers": args.workers, "cores": cores, "runs": []}
    setups = [("builtin", args.builtin, 64, 512), ("workflow", args.workflow, 64, 512),
              ("subprocess", args.subprocess, args.proc_slots, 2 * args.proc_slots)]
    for kind, n, slots, prefetch in setups:
        if n <= 0:
            continue
        with Cluster(args.workers, slots, prefetch) as cluster:
            best = None
            for _ in range(args.repeat):
                row = trio.run(cluster.run_job, job(kind, n))
                assert row["state"] == "done" and row["done"] == n, row
                rate = n / row["seconds"]
                best = max(best or 0.0, rate)
                results["runs"].append({"kind": kind, "tasks": n, "seconds": row["seconds"], "tasks_per_s": rate,
                                        "slots": slots, "prefetch": prefetch})
                print(f"{kind:<10} {n:>6} tasks in {row['seconds']:6.2f} s = {rate:8.0f} tasks/s")
            results[kind] = best
    targets = {"builtin": 2000, "subprocess": 500}
    print(f"\n{'kind':<12}{'best tasks/s':>14}{'target':>10}  verdict   ({args.workers} workers, {cores} cores)")
    for kind in ("builtin", "workflow", "subprocess"):
        if kind in results:
            t = targets.get(kind)
            verdict = "-" if t is None else ("met" if results[kind] >= t else "MISSED")
            print(f"{kind:<12}{results[kind]:>14.0f}{t if t else '-':>10}  {verdict}")
    save(HERE / "rate.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
