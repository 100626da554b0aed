"""RPE with a central HTTP store vs swarm: inputs, at 8 and 16 workers (the lab's dispatch experiment).

    sudo .venv/bin/python bench/lab/dispatch.py [--workers 8,16] [--input-mib 4] [--rounds 2] [--work 1]

One lab (configs/lab/dispatch.toml, with as many worker hosts as the largest n
and no kill) runs the experiment of lab/experiments/dispatch.py: for each input
mode and each n in 1 and --workers, a job of rounds * n tasks on n workers, each
task reading an --input-mib MiB dataset (fresh per run) and checking its SHA-256
before --work seconds of work. Every link is 4 MiB/s up and down, so the store
host's upload is shared by all n workers with the central store, while with
swarm: inputs the workers' peers also upload to each other. RPE_n = T1/(n Tn)
(seed 002), T1 measured per mode with one worker. The experiment's correctness
checks (every unit done exactly once per the dispatcher's completions log,
every input's SHA-256 exact) must hold, or the figures are not saved.

Prints a table (n, Tn and RPE for each mode, MiB the store host sent) and
writes dispatch.json next to this file; the lab's own results (JSON, plot) go to
--out (default a temporary directory, kept).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import trio

from shoal.lab.experiment import run_scenario
from shoal.lab.scenario import load_scenario

HERE = Path(__file__).resolve().parent
SCENARIO = HERE.parent.parent / "configs" / "lab" / "dispatch.toml"


def scenario_text(n_max: int, input_mib: float, rounds: int, work: float, ns: list[int]) -> str:
    """The shipped scenario with the bench's sizes, each line it changes checked to be there once."""
    text = SCENARIO.read_text()
    changes = {
        r"^count = \d+": f"count = {n_max}",
        r"^input_mib = .*$": f"input_mib = {input_mib}",
        r"^rounds = .*$": f"rounds = {rounds}",
        r"^work = .*$": f"work = {work}",
        r"^workers = .*$": f"workers = {sorted({1, *ns})}",
        r"^kill_worker = .*$": "",  # a kill would be measured as well
        r"^timeout = .*$": "timeout = 3600.0",
    }
    for pattern, line in changes.items():
        text, found = re.subn(pattern, line, text, flags=re.MULTILINE)
        if found != 1:
            raise SystemExit(f"{SCENARIO}: expected one line matching {pattern!r}, found {found}")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="8,16", help="comma-separated n (1 is always run: T1)")
    p.add_argument("--input-mib", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=2, help="tasks per worker per run")
    p.add_argument("--work", type=float, default=1.0, help="s of work per task")
    p.add_argument("--out", help="the lab's results directory")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("the lab makes network namespaces: run as root", file=sys.stderr)
        return 2
    ns = sorted({int(x) for x in args.workers.split(",")})
    out = Path(args.out or tempfile.mkdtemp(prefix="shoal-bench-dispatch-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.toml"
    path.write_text(scenario_text(max(ns), args.input_mib, args.rounds, args.work, ns))
    started = time.monotonic()
    result = trio.run(run_scenario, load_scenario(path), out)
    if not result.ok:
        print("the experiment's checks did not all hold: no figures saved", file=sys.stderr)
        return 1
    rows = result.rows
    by = {(r["inputs"], r["n"]): r for r in rows}
    print(f"\nRPE_n = T1/(n Tn): {args.input_mib:g} MiB input, {args.work:g} s work, {args.rounds} tasks per worker, "
          f"4 MiB/s links, {os.cpu_count()} cores")
    print(f"{'n':>4} {'store Tn':>9} {'store RPE':>10} {'store MiB':>10} {'swarm Tn':>9} {'swarm RPE':>10} "
          f"{'store MiB':>10} {'speed-up':>9}")
    table = []
    for n in sorted({r["n"] for r in rows}):
        s, w = by[("store", n)], by[("swarm", n)]
        table.append({"n": n, "store_Tn": s["Tn_s"], "store_rpe": s["RPE"], "store_sent_mib": s["store_sent_MiB"],
                      "swarm_Tn": w["Tn_s"], "swarm_rpe": w["RPE"], "swarm_store_sent_mib": w["store_sent_MiB"],
                      "speedup": s["Tn_s"] / w["Tn_s"]})
        t = table[-1]
        print(f"{n:>4} {t['store_Tn']:>8.2f}s {t['store_rpe']:>10.3f} {t['store_sent_mib']:>10.1f} "
              f"{t['swarm_Tn']:>8.2f}s {t['swarm_rpe']:>10.3f} {t['swarm_store_sent_mib']:>10.1f} "
              f"{t['speedup']:>8.2f}x")
    record = {"command": " ".join(["bench/lab/dispatch.py", *sys.argv[1:]]), "cores": os.cpu_count(),
              "input_mib": args.input_mib, "rounds": args.rounds, "work": args.work, "link_mib_s": 4.0,
              "seconds": time.monotonic() - started, "rows": table,
              "checks": [{"name": c.name, "held": c.held, "detail": c.detail} for c in result.checks],
              "plot": [str(x) for x in result.plots]}
    (HERE / "dispatch.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {HERE / 'dispatch.json'}; lab results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
