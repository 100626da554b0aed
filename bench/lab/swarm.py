"""The lab's swarm experiment at N = 8, 16, 32: the last host's time over the seed's P2P bound.

    .venv/bin/python bench/lab/swarm.py [--sizes 8,16,32] [--file-mib 16] [--clients shoal,libtorrent]
        [--upload 2] [--download 8] [--delay 5] [--piece-kib 64] [--out DIR]

Runs as root (the lab makes namespaces). One lab, the shipped
configs/lab/swarm.toml grown to max(sizes) leech hosts: a seed host (tracker
and peer daemon) and the leech hosts (a peer daemon each), every link shaped (default 2 MiB/s up,
8 MiB/s down, 5 ms delay). For each N, shoal's peer daemons and then libtorrent
(one process per host) distribute a fresh F MiB file from the seed to the first N
leech hosts -- the same lab, the same links, one after the other, so the
ratio shoal / libtorrent is measured in one run. The seed's P2P bound is
max(F/u_s, F/d_min, N F/(u_s + sum u_i)); with equal links it is F/u_s (8 s for
16 MiB at 2 MiB/s). Goal: shoal at or below 1.15x the bound and at or below
libtorrent. Every copy is checked byte for byte (sha256) by the experiment.

Prints a table and writes bench/lab/swarm.json (the command, the machine's
load, every host's time) and the experiment's own results in --out. Besides
the times it reports, per client, how busy the seed's uplink and (on average)
the leeches' uplinks were over each distribution, the seed's upload in copies
of the file, and the CPU seconds of the client's processes on all hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import trio

from shoal.lab.experiment import run_scenario
from shoal.lab.scenario import Link, Scenario, load_scenario, replace_params

HERE = Path(__file__).resolve().parent

SHIPPED = HERE.parents[1] / "configs" / "lab" / "swarm.toml"


def bench_scenario(args: argparse.Namespace, sizes: list[int], clients: list[str]) -> Scenario:
    """The shipped swarm scenario with max(sizes) leech hosts, the links and parameters asked for."""
    shipped = load_scenario(SHIPPED)
    link = Link(upload=args.upload, download=args.download, delay=args.delay)
    seed, leech = shipped.host("seed"), shipped.host("leech1")
    hosts = (dataclasses.replace(seed, index=0, link=link),
             *(dataclasses.replace(leech, name=f"leech{i}", index=i, link=link) for i in range(1, max(sizes) + 1)))
    # No monitor host: Prometheus would take CPU from the clients being timed.
    scenario = dataclasses.replace(shipped, source="bench/lab/swarm.py", hosts=hosts,
                                   monitor=dataclasses.replace(shipped.monitor, host=""),
                                   experiment=dataclasses.replace(shipped.experiment, timeout=7200.0))
    return replace_params(scenario, file_mib=args.file_mib, sizes=tuple(sizes), clients=tuple(clients),
                          piece_kib=args.piece_kib, stream=False, timeout=600.0)


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,16,32")
    ap.add_argument("--file-mib", type=float, default=16.0)
    ap.add_argument("--clients", default="shoal,libtorrent")
    ap.add_argument("--upload", type=float, default=2.0)
    ap.add_argument("--download", type=float, default=8.0)
    ap.add_argument("--delay", type=float, default=5.0)
    ap.add_argument("--piece-kib", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="the experiment's results (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=HERE / "swarm.json")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    clients = args.clients.split(",")
    scenario = bench_scenario(args, sizes, clients)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-lab-swarm-"))
    busy0, total0 = cpu_times()
    t0 = time.monotonic()
    result = trio.run(run_scenario, scenario, out)
    seconds = time.monotonic() - t0
    busy1, total1 = cpu_times()
    cores_busy = (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)
    record = json.loads((out / "results.json").read_text())
    dists = {(d["client"], d["n"]): d for d in record["data"]["distributions"]}

    rows = []
    for n in sizes:
        row: dict = {"n": n}
        for c in clients:
            d = dists.get((c, n))
            busy = d.get("uplink_busy", {}) if d else {}
            leech_busy = [v for h, v in busy.items() if h != "seed"]
            row[c] = {"last_s": d["last_s"], "x_bound": d["x_bound"], "bound_s": d["bound_s"],
                      "identical": bool(d["identical"]) and all(d["identical"].values()) and not d["errors"],
                      "seed_copies": d.get("seed_copies"), "cpu_s": d.get("cpu_s"),
                      "seed_uplink_busy": busy.get("seed"),
                      "leech_uplink_busy": sum(leech_busy) / len(leech_busy) if leech_busy else None} if d else None
        sh, lt = row.get("shoal"), row.get("libtorrent")
        row["shoal_over_libtorrent"] = (sh["last_s"] / lt["last_s"] if sh and lt and sh["last_s"] and lt["last_s"]
                                        else None)
        rows.append(row)

    def f(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    print(f"\nSwarm in the lab: one seed -> N hosts, F = {args.file_mib:g} MiB, links {args.upload:g} MiB/s up, "
          f"{args.download:g} MiB/s down, {args.delay:g} ms; last host's time and its ratio to the P2P bound")
    head = f"{'N':>3} {'bound s':>8}"
    for c in clients:
        head += f" {c + ' s':>14} {'x bound':>8}"
    head += f" {'shoal/lt':>9} {'seed copies':>11} {'identical':>9}  uplinks busy (seed, leeches) / CPU s per client"
    print(head)
    for r in rows:
        line = f"{r['n']:>3}"
        bound = next((r[c]["bound_s"] for c in clients if r.get(c)), None)
        line += f" {f(bound):>8}"
        for c in clients:
            x = r.get(c) or {}
            line += f" {f(x.get('last_s')):>14} {f(x.get('x_bound')):>8}"
        sh = r.get("shoal") or {}
        ok = all((r.get(c) or {}).get("identical") for c in clients)
        line += f" {f(r['shoal_over_libtorrent']):>9} {f(sh.get('seed_copies')):>11} {'yes' if ok else 'NO':>9} "
        for c in clients:
            x = r.get(c) or {}
            line += (f" {c}: {f(x.get('seed_uplink_busy'), '.0%')}, {f(x.get('leech_uplink_busy'), '.0%')}"
                     f" / {f(x.get('cpu_s'), '.1f')}")
        print(line)
    print(f"cores busy (machine, whole run): {cores_busy:.2f} of {os.cpu_count()}; run {seconds:.0f}s; "
          f"checks {'all held' if result.ok else 'FAILED'}")

    args.json.write_text(json.dumps({
        "command": " ".join([".venv/bin/python", "bench/lab/swarm.py", *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_after": os.getloadavg()},
        "params": {"sizes": sizes, "file_mib": args.file_mib, "clients": clients, "upload": args.upload,
                   "download": args.download, "delay": args.delay, "piece_kib": args.piece_kib},
        "goal": "shoal <= 1.15x the P2P bound and <= libtorrent",
        "rows": rows, "cores_busy": cores_busy, "seconds": seconds, "checks_held": result.ok,
        "checks": record["checks"], "distributions": record["data"]["distributions"], "results_dir": str(out),
    }, indent=1))
    print(f"wrote {args.json}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
