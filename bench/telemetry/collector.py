"""Collector cost: CPU per sample, and the share of one core at 1 Hz, with and without node_exporter.

Measurements on this machine's real /proc and /sys:

1. ``sample``: the collector alone (every present source read once, counters
   turned into rates, the sample added to a window), N times in a loop;
   CPU time (process_time) per sample. With node_exporter present, once more
   with the ``node_exporter`` source scraping it (``sample_node_exporter``).
2. ``daemon``: a real ``shoal telemetry run`` at the default 1 Hz for D
   seconds (60 s windows so some close, are stored and scored); its CPU time
   (utime + stime from /proc/PID/stat, children excluded) over the wall time,
   after its start-up. This includes the trio loop, SQLite and /metrics.
3. ``daemon_node_exporter``: the same daemon with ``[collector]
   node_exporter_url`` scraping a node_exporter started here on 127.0.0.1
   (Debian's prometheus-node-exporter, default collectors), and in the same
   window node_exporter's own CPU: the ratio is measured in one run.

Target (issues 4 and 15): collection costs under 1% of one core at 1 Hz, with
the node_exporter source too.

    .venv/bin/python bench/telemetry/collector.py [--samples 2000] [--daemon-seconds 60]

Prints a table and writes bench/telemetry/collector.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from shoal.core.telemetry.windows import WindowAccumulator
from shoal.daemons.telemetry.sources import Collector, default_sources

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def bench_sample(n: int, node_exporter_url: str = "") -> dict:
    col = Collector(default_sources(Path("/"), gpu=True, node_exporter_url=node_exporter_url,
                                    node_exporter_prefixes=("node_",)))
    acc = WindowAccumulator(900.0)
    col.sample(time.time())
    metrics = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        now = time.time()
        s = col.sample(now)
        acc.add(now, s)
        metrics = len(s)
    cpu = time.process_time() - c0
    wall = time.perf_counter() - t0
    return {"samples": n, "metrics_per_sample": metrics, "sources": [s.name for s in col.sources],
            "absent": col.absent, "cpu_us_per_sample": cpu / n * 1e6, "wall_us_per_sample": wall / n * 1e6,
            "core_percent_at_1hz": cpu / n * 100.0}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node_exporter(exe: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit(f"{exe} did not start") from None
            time.sleep(0.2)


def bench_daemon(seconds: float, node_exporter_url: str = "", other_pid: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-tel-") as tmp:
        cfg = Path(tmp) / "t.toml"
        ne = f'node_exporter_url = "{node_exporter_url}"\n' if node_exporter_url else ""
        cfg.write_text(f'[daemon]\nmetrics_listen = "127.0.0.1:0"\nstate_directory = "{tmp}/state"\n'
                       f'[collector]\nwindow = 60.0\n{ne}[control]\nsocket = "{tmp}/c.sock"\n')
        proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "telemetry", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while not (Path(tmp) / "c.sock").exists():  # start-up (imports) is not collection
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit("the telemetry daemon did not start")
                time.sleep(0.2)
            time.sleep(2.0)
            o0 = cpu_seconds(other_pid) if other_pid else 0.0
            c0, t0 = cpu_seconds(proc.pid), time.time()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(proc.pid), time.time()
            o1 = cpu_seconds(other_pid) if other_pid else 0.0
        finally:
            proc.terminate()
            proc.wait(30)
    out = {"seconds": t1 - t0, "cpu_seconds": c1 - c0, "core_percent_at_1hz": (c1 - c0) / (t1 - t0) * 100.0}
    if other_pid:
        out["node_exporter_cpu_seconds"] = o1 - o0
        out["node_exporter_core_percent"] = (o1 - o0) / (t1 - t0) * 100.0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--daemon-seconds", type=float, default=60.0)
    ap.add_argument("--node-exporter", default=shutil.which("prometheus-node-exporter") or
                    shutil.which("node_exporter") or "",
                    help="node_exporter binary for the node_exporter-source runs ('' skips them)")
    args = ap.parse_args()
    s = bench_sample(args.samples)
    d = bench_daemon(args.daemon_seconds)
    sn = dn = None
    if args.node_exporter:
        ne, url = start_node_exporter(args.node_exporter)
        try:
            sn = bench_sample(max(1, args.samples // 4), url)
            dn = bench_daemon(args.daemon_seconds, url, ne.pid)
        finally:
            ne.terminate()
            ne.wait(30)
    w = 44
    print(f"{'measurement':<{w}} {'value':>12}")
    print(f"{'metrics per sample':<{w}} {s['metrics_per_sample']:>12}")
    print(f"{'collector CPU per sample (us)':<{w}} {s['cpu_us_per_sample']:>12.1f}")
    print(f"{'collector: % of a core at 1 Hz':<{w}} {s['core_percent_at_1hz']:>12.3f}")
    print(f"{'whole daemon: % of a core at 1 Hz':<{w}} {d['core_percent_at_1hz']:>12.3f}")
    worst = d["core_percent_at_1hz"]
    if sn is not None and dn is not None:
        print(f"{'with node_exporter source: metrics per sample':<{w}} {sn['metrics_per_sample']:>12}")
        print(f"{'  collector CPU per sample (us)':<{w}} {sn['cpu_us_per_sample']:>12.1f}")
        print(f"{'  whole daemon: % of a core at 1 Hz':<{w}} {dn['core_percent_at_1hz']:>12.3f}")
        print(f"{'  node_exporter itself, same window: %':<{w}} {dn['node_exporter_core_percent']:>12.3f}")
        ratio = dn["core_percent_at_1hz"] / max(dn["node_exporter_core_percent"], 1e-9)
        print(f"{'  daemon / node_exporter':<{w}} {ratio:>12.2f}")
        worst = max(worst, dn["core_percent_at_1hz"])
    else:
        print("node_exporter not installed: the node_exporter-source runs were skipped")
    verdict = "met" if worst < 1.0 else "MISSED"
    print(f"target < 1% of a core at 1 Hz: {verdict}")
    out = {"sample": s, "daemon": d, "sample_node_exporter": sn, "daemon_node_exporter": dn,
           "target_percent": 1.0, "target_met": worst < 1.0,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "loadavg_at_end": os.getloadavg()},
           "command": "python bench/telemetry/collector.py "
                      f"--samples {args.samples} --daemon-seconds {args.daemon_seconds:g}"}
    (HERE / "collector.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
