"""Live detection on this machine: HPAS-style faults, shoal's detector against Netdata's.

What it does, in one run:

1. starts Debian's ``netdata`` (loopback only, RAM database, no registry, cloud or
   anonymous statistics) and a ``shoal telemetry run`` with short windows;
2. a *normal period* (``--normal`` s) while a background workload of its own keeps the
   node ordinarily busy (``--load``: busy/idle bursts of random length), then the
   documented ``shoal telemetry train`` (the default recipe, docs/telemetry-model.md);
   Netdata's detector (bench/telemetry/netdata_ml.py) trains on the same period;
3. every fault kind of ``shoal telemetry inject`` at two intensities, ``--reps`` times each,
   in a shuffled order, ``--fault`` s each with ``--gap`` s of normal operation between;
4. scores the windows the shoal daemon closed, after training:
   * a window is a *fault window* if an injection covers at least half of it, *normal* if
     no injection touches it or the window before it (a fault's after-effects, e.g. freed
     memory, are not counted either way), otherwise it is not scored;
   * shoal: the window's stored verdict; and its stored score at a threshold picked on the
     run's own normal windows for 2 % (how well the scores separate, apart from the threshold);
   * Netdata: the mean node anomaly rate over the same window's seconds, flagged above a
     threshold picked on the run's own normal windows to give shoal's false-positive rate
     (the "same false-positive rate" comparison), and also at 2 %.
   Per kind and intensity: window recall, detection delay (windows from an injection's
   first fault window to its first flagged one; missed injections are counted apart).

    sudo .venv/bin/python bench/telemetry/live.py [--normal 240] [--fault 20] [--gap 25] [--reps 3]

Prints the table and writes bench/telemetry/live.json, and every window the daemon stored (its
features too) to live-windows.json.gz, which bench/telemetry/replay.py scores other training
recipes on. Needs root only to read every
/proc file Netdata wants; the faults are the injectors' own bounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netdata_ml import NodeDetector, fetch, window_scores  # noqa: E402

HERE = Path(__file__).resolve().parent
SHOAL = [sys.executable, "-m", "shoal.cli.main"]
CORES = os.cpu_count() or 1
MEM_MIB = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20

#: the HPAS kinds of ``shoal telemetry inject``; two intensities each (its --intensity, a share of
#: the resource it takes: CPU duty or cores, MemTotal, the maximum rate)
KINDS = ("cpuoccupy", "cachecopy", "membw", "memleak", "memeater", "netoccupy", "iobandwidth", "iometadata")
LEVELS = {"low": 0.5, "high": 1.0}
MEM_LEVELS = {"low": 0.1, "high": 0.25}  # memleak/memeater: a share of MemTotal
FAULTS: dict[str, dict[str, list[str]]] = {
    k: {lvl: ["--intensity", f"{(MEM_LEVELS if k.startswith('mem') and k != 'membw' else LEVELS)[lvl]:g}"]
        for lvl in LEVELS} for k in KINDS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def background_load(stop: float, seed: int) -> None:
    """Ordinary work: one process, busy and idle in bursts of 0.2-3 s, about half the time busy."""
    rng = random.Random(seed)
    while time.time() < stop:
        end = time.time() + rng.uniform(0.2, 3.0)
        if rng.random() < 0.5:
            x = 0
            while time.time() < end:
                x += 1
        else:
            time.sleep(max(0.0, end - time.time()))


def start_netdata(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    for d in ("cache", "lib", "log"):
        (tmp / "netdata" / d).mkdir(parents=True)
    conf = tmp / "netdata" / "netdata.conf"
    conf.write_text(f"""[global]
    run as user = root
    update every = 1
    memory mode = ram
    history = 7200
[directories]
    config = {tmp}/netdata
    cache = {tmp}/netdata/cache
    lib = {tmp}/netdata/lib
    log = {tmp}/netdata/log
[web]
    bind to = 127.0.0.1:{port}
[registry]
    enabled = no
[health]
    enabled = no
[plugins]
    python.d = no
    charts.d = no
    go.d = no
    ebpf = no
    cups = no
    nfacct = no
    statsd = no
""")
    # The opt-out file and DO_NOT_TRACK: no anonymous statistics leave this machine.
    (tmp / "netdata" / ".opt-out-from-anonymous-statistics").touch()
    env = dict(os.environ, DO_NOT_TRACK="1", DISABLE_TELEMETRY="1")
    proc = subprocess.Popen(["netdata", "-D", "-c", str(conf)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/v1/info", timeout=2) as r:  # noqa: S310 - loopback
                json.load(r)
            return proc, base
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit("netdata did not start") from None
            time.sleep(0.5)


def start_shoal(tmp: Path, window: float, interval: float,
                exclude: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """``exclude``: [training] exclude_features instead of the default."""
    sock = tmp / "telemetry.sock"
    cfg = tmp / "telemetry.toml"
    training = "" if exclude is None else f"[training]\nexclude_features = {json.dumps(exclude)}\n"
    cfg.write_text(f'[daemon]\nmetrics_listen = "127.0.0.1:0"\nstate_directory = "{tmp}/state"\n'
                   f'[collector]\nwindow = {window}\ninterval = {interval}\n{training}'
                   f'[control]\nsocket = "{sock}"\n')
    with open(tmp / "telemetry.log", "w") as log:
        proc = subprocess.Popen([*SHOAL, "telemetry", "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)
    deadline = time.time() + 60
    while not sock.exists():
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit(f"the telemetry daemon did not start (see {tmp}/telemetry.log)")
        time.sleep(0.2)
    return proc, str(sock)


def shoal_cli(sock: str, *args: str, timeout: float = 600.0) -> str:
    out = subprocess.run([*SHOAL, "telemetry", *args, "--socket", sock], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"shoal telemetry {args[0]} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def shoal_windows(sock: str) -> list[dict]:
    import trio

    from shoal.daemons.runtime.rpc import connect_unix
    from shoal.protocol.telemetry import Status

    async def go() -> dict:
        async with await connect_unix(sock) as c:
            return await c.call("status", Status(windows=1000).encode(), timeout=60.0)

    return trio.run(go)["windows"]


@dataclass
class Injection:
    kind: str
    intensity: str
    start: float
    end: float


@dataclass
class Scored:
    windows: list[tuple[float, float]] = field(default_factory=list)
    truth: list[Injection | None] = field(default_factory=list)  # None: normal


def classify(windows: list[tuple[float, float]], injections: list[Injection]) -> Scored:
    out = Scored()
    width = np.median([e - s for s, e in windows]) if windows else 0.0
    for s, e in windows:
        cover = [(min(e, i.end) - max(s, i.start), i) for i in injections]
        best = max(cover, key=lambda c: c[0], default=(0.0, None))
        if best[1] is not None and best[0] >= 0.5 * (e - s):
            out.windows.append((s, e))
            out.truth.append(best[1])
        elif all(i.end <= s - width or i.start >= e for i in injections):
            out.windows.append((s, e))
            out.truth.append(None)
    return out


def evaluate(flags: list[bool], sc: Scored, injections: list[Injection]) -> dict:
    normal = [f for f, t in zip(flags, sc.truth, strict=True) if t is None]
    rows: dict[str, dict] = {}
    for kind in FAULTS:
        for level in ("low", "high"):
            mine = [i for i in injections if i.kind == kind and i.intensity == level]
            if not mine:
                continue
            hit = [f for f, t in zip(flags, sc.truth, strict=True) if t in mine]
            delays, missed = [], 0
            for inj in mine:
                seq = [f for f, t in zip(flags, sc.truth, strict=True) if t is inj]
                if True in seq:
                    delays.append(seq.index(True))
                else:
                    missed += 1
            rows[f"{kind}/{level}"] = {"windows": len(hit), "recall": float(np.mean(hit)) if hit else None,
                                       "delay_windows": float(np.mean(delays)) if delays else None,
                                       "injections": len(mine), "missed": missed}
    return {"fpr": float(np.mean(normal)) if normal else None, "normal_windows": len(normal), "kinds": rows}


def threshold_at(scores: np.ndarray, normal: np.ndarray, fpr: float) -> float:
    """The lowest threshold whose false-positive rate on ``normal`` is at most ``fpr``."""
    s = np.sort(scores[normal])[::-1]
    if not len(s):
        return float("inf")  # no normal window scored: nothing to pick it on, nothing flagged
    k = int(np.floor(fpr * len(s)))  # windows allowed above the threshold
    return float(s[k]) if k < len(s) else float(s[-1]) - 1e-12


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--normal", type=float, default=240.0, help="normal period before training, s")
    ap.add_argument("--fault", type=float, default=20.0, help="each injection, s")
    ap.add_argument("--gap", type=float, default=25.0, help="normal operation between injections, s")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--kinds", default=",".join(FAULTS), help="comma-separated fault kinds")
    ap.add_argument("--no-load", action="store_true", help="no background workload")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--exclude", default=None,
                    help="comma-separated feature prefixes for [training] exclude_features (default: the daemon's)")
    ap.add_argument("--out", default=str(HERE / "live.json"))
    args = ap.parse_args()
    if shutil.which("netdata") is None:
        raise SystemExit("netdata is not installed (apt-get install netdata)")
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown fault kind(s): {', '.join(sorted(unknown))}")
    rng = random.Random(args.seed)
    plan = [(k, lvl) for k in kinds for lvl in ("low", "high") for _ in range(args.reps)]
    rng.shuffle(plan)
    total = args.normal + len(plan) * (args.fault + args.gap) + 120
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-live-"))
    procs: list[subprocess.Popen] = []
    load = None
    try:
        nd, base = start_netdata(tmp)
        procs.append(nd)
        exclude = None if args.exclude is None else [p for p in args.exclude.split(",") if p]
        tel, sock = start_shoal(tmp, args.window, args.interval, exclude)
        procs.append(tel)
        if not args.no_load:
            load = mp.Process(target=background_load, args=(time.time() + total, args.seed), daemon=True)
            load.start()
        t0 = time.time()
        print(f"normal period {args.normal:g} s (windows {args.window:g} s) ...", flush=True)
        time.sleep(args.normal)
        train_start = time.time()
        print(shoal_cli(sock, "train").strip(), flush=True)
        train_end = time.time()
        # Netdata's detector trains on the same normal period.
        times, series = fetch(base, int(t0) + 10, int(train_start))
        nd_model = NodeDetector(series, seed=args.seed)
        print(f"netdata: {len(nd_model.models)} dimensions modelled", flush=True)
        injections = []
        for n, (kind, level) in enumerate(plan, 1):
            time.sleep(args.gap)
            print(f"[{n}/{len(plan)}] inject {kind} {level}", flush=True)
            start = time.time()
            shoal_cli(sock, "inject", kind, "--duration", f"{args.fault:g}", *FAULTS[kind][level],
                      timeout=args.fault + 120)
            injections.append(Injection(kind, level, start, time.time()))
        time.sleep(args.gap)
        end = time.time()
        rows = [w for w in shoal_windows(sock) if w["start"] >= train_end and w["anomalous"] is not None]
        sc = classify([(w["start"], w["end"]) for w in rows], injections)
        by_start = {w["start"]: bool(w["anomalous"]) for w in rows}
        by_score = {w["start"]: float(w["score"]) for w in rows}
        shoal_flags = [by_start[s] for s, _ in sc.windows]
        shoal_eval = evaluate(shoal_flags, sc, injections)
        # Netdata: the node anomaly rate per second, averaged over each scored window.
        ntimes, nseries = fetch(base, int(train_end) - 20, int(end))
        rate = nd_model.rate(nseries)
        scores = np.nan_to_num(window_scores(ntimes[len(ntimes) - len(rate):], rate, sc.windows))
        normal = np.array([t is None for t in sc.truth])
        results = {"shoal": shoal_eval}
        # The same detector's scores at a threshold picked on this run's normal windows for 2 %
        # (as Netdata's below): how well its scores separate, apart from its own threshold.
        own = np.array([by_score[s] for s, _ in sc.windows])
        thr = threshold_at(own, normal, 0.02)
        results["shoal_at_2pct"] = {**evaluate(list(own > thr), sc, injections), "threshold_score": thr}
        for name, target in (("netdata_at_shoal_fpr", shoal_eval["fpr"] or 0.0), ("netdata_at_2pct", 0.02)):
            thr = threshold_at(scores, normal, target)
            results[name] = {**evaluate(list(scores > thr), sc, injections), "threshold_rate": thr}
        out = {"machine": {"cores": CORES, "mem_mib": MEM_MIB}, "args": vars(args),
               "netdata_version": subprocess.run(["netdata", "-v"], capture_output=True, text=True).stdout.strip(),
               "netdata_dimensions": len(nd_model.models), "scored_windows": len(sc.windows),
               "train_seconds": train_end - train_start, "results": results,
               # what the figures were computed from, for a replay of other thresholds
               "injections": [{"kind": i.kind, "intensity": i.intensity, "start": i.start, "end": i.end}
                              for i in injections],
               "windows": [{"start": s, "end": e, "score": by_score[s], "anomalous": by_start[s],
                            "netdata_rate": float(r), "truth": None if t is None else f"{t.kind}/{t.intensity}"}
                           for (s, e), t, r in zip(sc.windows, sc.truth, scores, strict=True)]}
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        keep_store(tmp / "state" / "windows.db", windows_file(Path(args.out)),
                   {"normal_start": t0, "train_start": train_start, "train_end": train_end})
        print_table(results)
        return 0
    finally:
        if load is not None:
            load.terminate()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


def windows_file(out: Path) -> Path:
    """Where the run's every window (with its features) is kept beside ``out``."""
    return out.with_name(out.stem + "-windows.json.gz")


def keep_store(db: Path, path: Path, times: dict[str, float]) -> None:
    """Every window of the daemon's store, features and labels included, as gzipped JSON: what
    bench/telemetry/replay.py trains and scores other recipes on, without a new live run."""
    import gzip
    import sqlite3

    import msgpack

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT start, end, n_samples, features, label FROM windows ORDER BY start").fetchall()
    finally:
        con.close()
    data = {**times, "windows": [{"start": s, "end": e, "n_samples": n, "label": lab,
                                  "features": msgpack.unpackb(f)} for s, e, n, f, lab in rows]}
    with gzip.open(path, "wt") as f:
        json.dump(data, f)


def print_table(results: dict) -> None:
    names = list(results)
    print(f"\n{'kind':<14}" + "".join(f"{n:>26}" for n in names))
    print(f"{'':<14}" + "".join(f"{'recall  delay  missed':>26}" for _ in names))
    keys = list(results["shoal"]["kinds"])
    for k in keys:
        cells = []
        for n in names:
            r = results[n]["kinds"].get(k, {})
            rec = "-" if r.get("recall") is None else f"{r['recall']:.2f}"
            dl = "-" if r.get("delay_windows") is None else f"{r['delay_windows']:.1f}"
            cells.append(f"{rec:>10} {dl:>6} {r.get('missed', 0):>3}/{r.get('injections', 0):<3}")
        print(f"{k:<14}" + "".join(f"{c:>26}" for c in cells))
    print(f"{'FPR':<14}" + "".join(f"{results[n]['fpr']:>26.3f}" for n in names))


if __name__ == "__main__":
    sys.exit(main())
