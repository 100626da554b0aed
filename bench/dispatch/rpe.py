"""Relative processing effectiveness RPE_n = T1 / (n * Tn), like seed 002's Figure 7.

    .venv/bin/python bench/dispatch/rpe.py [--workers 1,2,4,8,16,32] [--lengths 0.1,0.25,1] [--per-worker 4]

One dispatcher and max(n) worker daemons (one slot each, as e-Science Central's
single-core engines) run on loopback. For each n, every worker but n is
excluded through the dispatcher's anomaly hook (``exclude``), then a job of
``per-worker * n`` independent tasks of length L is submitted; Tn is the
dispatcher's own time from submission to the job recorded done. Each task is
its own process (``sleep L``, the real /bin/sleep), so the figure includes
process start-up as well as dispatch, lease, report and durable completion.

T1 is measured with one worker on ``per-worker * 2`` tasks and scaled
linearly to the n-worker workload (one worker runs its tasks one after
another, so its time is linear in their number). Tasks sleep rather than
compute: this 2-core machine cannot run 32 CPU-bound tasks at once, and what
RPE measures is the system's overhead around the tasks.

Target (issue 6): RPE >= 0.9 for 1-s tasks at the largest n this machine
sustains. Results: printed as a table (rows n, columns L), saved to rpe.json.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import trio
from cluster import Cluster, save

HERE = Path(__file__).resolve().parent


def job(n_tasks: int, length: float, builtin: bool) -> dict:
    task = {"builtin": f"sleep {length}"} if builtin else {"command": ["sleep", str(length)]}
    return {"name": f"rpe-{length}", "tasks": [{"name": "t", "replicas": n_tasks, **task}]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4,8,16,32", help="comma-separated n")
    p.add_argument("--lengths", default="0.1,0.25,1", help="comma-separated task lengths in seconds")
    p.add_argument("--per-worker", type=int, default=4, help="tasks per worker in each run")
    p.add_argument("--builtin", action="store_true", help="builtin sleep instead of a process per task")
    args = p.parse_args()
    ns = sorted({int(x) for x in args.workers.split(",")})
    lengths = [float(x) for x in args.lengths.split(",")]
    ids = [f"w{i:02d}" for i in range(max(ns))]
    results: dict = {"cores": os.cpu_count(), "per_worker": args.per_worker, "builtin": args.builtin,
                     "rows": []}
    with Cluster(max(ns), slots=1, prefetch=1) as cluster:
        for length in lengths:
            trio.run(cluster.call, "exclude", {"workers": ids[1:]})
            m1 = 2 * args.per_worker
            t1_row = trio.run(cluster.run_job, job(m1, length, args.builtin))
            per_task = t1_row["seconds"] / m1
            for n in ns:
                trio.run(cluster.call, "exclude", {"workers": ids[n:]})
                m = args.per_worker * n
                row = trio.run(cluster.run_job, job(m, length, args.builtin))
                t1 = per_task * m
                rpe = t1 / (n * row["seconds"])
                results["rows"].append({"n": n, "length": length, "tasks": m, "Tn": row["seconds"], "T1": t1,
                                        "rpe": rpe})
                print(f"L={length:<5g} n={n:<3} tasks={m:<4} Tn={row['seconds']:7.3f}s T1={t1:8.3f}s RPE={rpe:5.3f}",
                      flush=True)
    print(f"\nRPE_n = T1/(n*Tn)   ({'builtin sleep' if args.builtin else 'a process per task'}, "
          f"{args.per_worker} tasks per worker, {os.cpu_count()} cores)")
    print(f"{'n':>4}" + "".join(f"{f'L={L:g}s':>10}" for L in lengths))
    for n in ns:
        cells = {r["length"]: r["rpe"] for r in results["rows"] if r["n"] == n}
        print(f"{n:>4}" + "".join(f"{cells[L]:>10.3f}" for L in lengths))
    one_s = [r for r in results["rows"] if r["length"] == 1.0]
    if one_s:
        top = max(one_s, key=lambda r: r["n"])
        verdict = "met" if top["rpe"] >= 0.9 else "MISSED"
        print(f"target RPE >= 0.9 for 1-s tasks at n={top['n']}: {top['rpe']:.3f} ({verdict})")
        results["target"] = {"n": top["n"], "rpe": top["rpe"], "met": top["rpe"] >= 0.9}
    save(HERE / ("rpe-builtin.json" if args.builtin else "rpe.json"), results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
