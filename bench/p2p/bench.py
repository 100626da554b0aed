"""Peer engine throughput: loopback pairs against libtorrent, and capped swarms.

    .venv/bin/python bench/p2p/bench.py [--size 256] [--swarm-size 16] [--upload-cap 1]
                                        [--n 8,16,32] [--per-process 4] [--profile]

Two measurements, each in one run, each side of a transfer in its own
process, every process talking to one shoal tracker (HTTP, announce interval
5 s, min interval 1 s; a fresh tracker for every measurement so no swarm
inherits dead peers from the one before):

1. **Pairs.** One seeder, one leecher, one file of --size MiB, on loopback
   with no rate limits: shoal->shoal, libtorrent->libtorrent, shoal->libtorrent
   (shoal seeds) and libtorrent->shoal. The seeder runs pinned to CPU 0, the
   leecher to CPU 1 (libtorrent's threads share their process's CPU). The
   seeder has checked its pieces and had a tracker reply before the leecher
   starts; the clock starts when the leecher is told to add the torrent.
   "start-up" is from then to the leecher's first payload byte (announce,
   connect, handshake, first request), "transfer" from the first byte to
   completion (every piece SHA-1 verified); MiB/s is the file size over the
   transfer time, and each pair is also given as a ratio of
   libtorrent->libtorrent's. CPU is utime+stime of each process (all its
   threads, from /proc/<pid>/stat) over the transfer phase, per GiB moved.
   The downloaded file is compared with the original (SHA-1) afterwards.

2. **Swarm.** One shoal seed and N shoal leechers (--n, default 8,16,32),
   a file of --swarm-size MiB, every node (the seed too) capped at
   --upload-cap MiB/s by its session's [limits] upload_rate, no download cap.
   All leechers are told to start at once; the time is until the last
   leecher completes. It is compared with the fluid-model minimum
   max(F/u_s, N*F/(u_s + sum u_i)) (no download limit on loopback) and with
   the client-server time N*F/u_s. The default cap (1 MiB/s) keeps the
   whole swarm's traffic (up to (N+1) * cap) within what two cores can move
   through Python peers (about 40 CPU s per GiB sent and received, see the
   pairs), so the cap, not the CPU, is the bottleneck; "cores busy" in the
   table says whether that held. Leechers run --per-process Sessions to a
   process (each its own listener, 127.0.0.x address, peer_id and upload
   throttle, sharing one trio loop), unpinned: 33 Python processes on a
   2-core machine would measure the scheduler more than the swarm.

With --profile, one more shoal->shoal pair is run with py-spy (if found: PATH
or --py-spy) sampling the leecher, and the top functions by own and by
inclusive CPU samples are printed and saved; without py-spy, cProfile.
Results are printed and saved as JSON beside this file.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import start_daemon  # noqa: E402  (bench/common.py)

HERE = Path(__file__).resolve().parent
NODE = HERE / "node.py"
MiB = 1 << 20
GiB = 1 << 30
SEED_CPU, LEECH_CPU = 0, 1
PAIRS = [("shoal", "shoal"), ("libtorrent", "libtorrent"), ("shoal", "libtorrent"), ("libtorrent", "shoal")]


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


# -- the tracker -------------------------------------------------------------------


class Tracker:
    """The shoal tracker daemon, started with its CLI and awaited with sd_notify."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        cfg = tmp / "tracker.toml"
        cfg.write_text(f"""
[daemon]
log_level = "warning"
metrics_listen = ""
state_directory = "{tmp / 'state'}"
[tracker]
http_listen = "127.0.0.1:0"
udp_listen = ""
announce_interval = 5
min_interval = 1
peer_timeout = 60
[access]
rate_limit = 0.0
""")
        self.proc, addrs = start_daemon("tracker", cfg, tmp)
        host, port = addrs["http"]
        self.url = f"http://{host}:{port}/announce"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# -- node processes ------------------------------------------------------------------


class Node:
    """A node.py process: JSON events on its stdout, commands on its stdin."""

    def __init__(self, spec: dict, log: Path, cpu: int | None = None, wrap: list[str] | None = None) -> None:
        self.spec = spec
        self.log = log
        pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        argv = [*(wrap or []), sys.executable, str(NODE), json.dumps(spec)]
        with open(log, "wb") as err:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, preexec_fn=pin, bufsize=0)
        self.pid = self.proc.pid
        self._buf = b""
        self.events: list[dict] = []

    def read_event(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            sel = selectors.DefaultSelector()
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"node {self.pid} silent for {timeout} s; see {self.log}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"node {self.pid} exited ({self.proc.wait()}); see {self.log}:\n"
                                   + self.log.read_text()[-2000:])
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        ev = json.loads(line)
        self.events.append(ev)
        return ev

    def expect(self, kind: str, timeout: float) -> dict:
        while True:
            ev = self.read_event(timeout)
            if ev["ev"] == kind:
                return ev

    def say(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")

    def quit(self) -> dict | None:
        """Ask for the final stats and wait for the exit."""
        try:
            self.say("quit")
            stats = self.expect("stats", 30)
        except (OSError, RuntimeError, TimeoutError):
            stats = None
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return stats

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def sha1_of(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


# -- 1. pairs ----------------------------------------------------------------------------


def run_pair(tmp: Path, shared, seed_impl: str, leech_impl: str, timeout: float,
             profiler: dict[str, list[str]] | None = None) -> dict:
    """One seeder, one leecher; ``profiler`` maps "seed"/"leech" to a sampler's argv (pid appended)."""
    name = f"{seed_impl}->{leech_impl}"
    work = tmp / (name.replace("->", "_to_") + ("_profiled" if profiler else ""))
    work.mkdir()
    tracker = Tracker(work / "tracker")
    nodes: list[Node] = []
    try:
        torrent = shared.torrent_for(tracker.url, work / "pair.torrent")
        seed = Node({"impl": seed_impl, "role": "seed", "torrent": str(torrent),
                     "nodes": [{"ip": "127.0.0.2", "dir": str(shared.path.parent),
                                "resume": str(work / "seed.resume")}]},
                    work / "seed.log", cpu=SEED_CPU)
        nodes.append(seed)
        seeding = seed.expect("seeding", timeout)
        leech = Node({"impl": leech_impl, "role": "leech", "torrent": str(torrent),
                      "nodes": [{"ip": "127.0.0.3", "dir": str(work / "leech")}]},
                     work / "leech.log", cpu=LEECH_CPU)
        nodes.append(leech)
        leech.expect("ready", timeout)
        profs = []
        for side, argv in (profiler or {}).items():
            pid = {"seed": seed.pid, "leech": leech.pid}[side]
            with open(work / f"{side}.prof.log", "wb") as err:  # the child keeps its own copy
                profs.append(subprocess.Popen([*argv, "--pid", str(pid)], stdout=subprocess.DEVNULL,
                                              stdin=subprocess.DEVNULL, stderr=err))
        if profs:
            time.sleep(1.0)  # let the samplers attach
        cpu0 = {"seed": cpu_split(seed.pid), "leech": cpu_split(leech.pid)}
        go = time.monotonic()
        leech.say("go")
        first = leech.expect("first", timeout)
        cpu1 = {"seed": cpu_split(seed.pid), "leech": cpu_split(leech.pid)}
        done = leech.expect("done", timeout)
        cpu2 = {"seed": cpu_split(seed.pid), "leech": cpu_split(leech.pid)}
        for prof in profs:
            prof.send_signal(signal.SIGINT)
        for prof in profs:
            prof.wait(60)
        added = leech.expect("added", 1) if not any(e["ev"] == "added" for e in leech.events) else \
            next(e for e in leech.events if e["ev"] == "added")
        stats = {"seed": seed.quit(), "leech": leech.quit()}
        size = shared.size
        transfer = done["t"] - first["t"]
        ok = sha1_of(work / "leech" / shared.path.name) == sha1_of(shared.path)
        gib = size / GiB
        row = {
            "pair": name, "seed": seed_impl, "leech": leech_impl, "bytes": size,
            "seed_ready_s": seeding["t"] - seed.events[0]["t"],  # process start to checked + announced
            "startup_s": first["t"] - go, "add_s": added["t"] - go, "transfer_s": transfer,
            "total_s": done["t"] - go,
            "transfer_MiB_per_s": size / MiB / transfer, "total_MiB_per_s": size / MiB / (done["t"] - go),
            "cpu_s_per_GiB_transfer": {k: (sum(cpu2[k]) - sum(cpu1[k])) / gib for k in cpu2},
            "user_s_per_GiB_transfer": {k: (cpu2[k][0] - cpu1[k][0]) / gib for k in cpu2},
            "sys_s_per_GiB_transfer": {k: (cpu2[k][1] - cpu1[k][1]) / gib for k in cpu2},
            "cpu_s_per_GiB_total": {k: (sum(cpu2[k]) - sum(cpu0[k])) / gib for k in cpu2},
            "core_utilisation_transfer": {k: (sum(cpu2[k]) - sum(cpu1[k])) / transfer for k in cpu2},
            "sha1_ok": ok, "stats": stats,
        }
        return row
    finally:
        for n in nodes:
            n.kill()
        tracker.stop()
        shutil.rmtree(work / "leech", ignore_errors=True)


# -- 2. swarms ---------------------------------------------------------------------------


def run_swarm(tmp: Path, shared, n: int, cap: int, per_process: int, timeout: float,
              super_seed: bool = False, impl: str = "shoal") -> dict:
    """One seed and ``n`` leechers, all of ``impl``; libtorrent runs one node per process."""
    if impl == "libtorrent":
        per_process = 1
    work = tmp / f"swarm{n}-{impl}{'-super' if super_seed else ''}"
    work.mkdir()
    tracker = Tracker(work / "tracker")
    nodes: list[Node] = []
    try:
        torrent = shared.torrent_for(tracker.url, work / "swarm.torrent")
        seed = Node({"impl": impl, "role": "seed", "torrent": str(torrent), "upload_rate": cap,
                     "super_seed": super_seed,
                     "nodes": [{"ip": "127.0.0.10", "dir": str(shared.path.parent),
                                "resume": str(work / "seed.resume")}]}, work / "seed.log")
        nodes.append(seed)
        seed.expect("seeding", timeout)
        groups: list[Node] = []
        for g, first in enumerate(range(0, n, per_process)):
            members = [{"ip": f"127.0.{1 + (11 + i) // 250}.{(11 + i) % 250}", "dir": str(work / f"l{i}")}
                       for i in range(first, min(n, first + per_process))]
            groups.append(Node({"impl": impl, "role": "leech", "torrent": str(torrent), "upload_rate": cap,
                                "nodes": members}, work / f"group{g}.log"))
        nodes += groups
        for grp in groups:
            grp.expect("ready", timeout)
        pids = [nd.pid for nd in nodes]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        go = time.monotonic()
        for grp in groups:
            grp.say("go")
        done_t, first_t = [], []
        for grp in groups:
            grp.expect("all_done", timeout)
            done_t += [e["t"] - go for e in grp.events if e["ev"] == "done"]
            first_t += [e["t"] - go for e in grp.events if e["ev"] == "first"]
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        seed_stats = seed.quit()
        group_stats = [grp.quit() for grp in groups]
        F = shared.size
        makespan = max(done_t)
        minimum = max(F / cap, n * F / (cap + n * cap))
        uploaded_by_leechers = sum(s["uploaded"] for gs in group_stats if gs for s in gs["nodes"])
        seed_up = seed_stats["nodes"][0]["uploaded"] if seed_stats else None
        return {
            "impl": impl, "n": n, "super_seed": super_seed, "file_bytes": F, "upload_cap_bytes_per_s": cap,
            "processes": 1 + len(groups),
            "per_process": per_process,
            "last_done_s": makespan, "first_done_s": min(done_t), "median_done_s": sorted(done_t)[len(done_t) // 2],
            "first_byte_s": min(first_t), "last_first_byte_s": max(first_t),
            "done_s": sorted(done_t),
            "theoretical_min_s": minimum, "client_server_s": n * F / cap,
            "ratio_to_min": makespan / minimum, "ratio_to_client_server": makespan / (n * F / cap),
            "seed_uploaded_bytes": seed_up, "seed_uploaded_copies": seed_up / F if seed_up else None,
            "leechers_uploaded_bytes": uploaded_by_leechers,
            "cpu_s_all_processes": cpu, "cores_busy": cpu / makespan,
            # More than ~80% of the machine busy: the swarm is measuring the CPU, not the protocol.
            "cpu_bound": cpu / makespan > 0.8 * len(os.sched_getaffinity(0)),
        }
    finally:
        for nd in nodes:
            nd.kill()
        tracker.stop()


# -- profile -------------------------------------------------------------------------------


def summarise_collapsed(path: Path, top: int) -> dict:
    """Top functions by own samples and by inclusive samples, from py-spy's raw output."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        total += c
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        own[names[-1]] += c
        for name in {n for n in names if not n.startswith(ROOT_FRAMES)}:
            incl[name] += c
    return {
        "samples": total,
        "own": [(name, c / total) for name, c in own.most_common(top)],
        "inclusive": [(name, c / total) for name, c in incl.most_common(top * 3)],
    }


# Frames every sample passes through: left out of the inclusive list.
ROOT_FRAMES = ("<module> (", "main (", "run_shoal (", "run (trio/", "unrolled_run (", "Thread._bootstrap",
               "Thread.run (")


def _frame_name(frame: str) -> str:
    # py-spy: "function (path/to/file.py:line)"; keep function and file, not the line.
    fn, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("/work/main/", "site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{fn} ({file})"


def run_profile(tmp: Path, shared, timeout: float, py_spy: str | None, top: int) -> dict:
    """One more shoal->shoal pair with both sides sampled; the leecher is the one that matters."""
    if py_spy:
        outs = {side: tmp / f"{side}.pyspy.txt" for side in ("seed", "leech")}
        prof = {side: [py_spy, "record", "--gil", "--format", "raw", "--rate", "500", "--output", str(out)]
                for side, out in outs.items()}
        row = run_pair(tmp, shared, "shoal", "shoal", timeout, profiler=prof)
        summary = {side: summarise_collapsed(out, top) for side, out in outs.items()}
        summary["tool"] = "py-spy record --gil --rate 500: samples of the thread holding the GIL"
    else:  # cProfile inside the leecher: deterministic, slower, main thread only
        out = tmp / "leech.pstats"
        row = _run_cprofile_pair(tmp, shared, timeout, out)
        summary = {"leech": _summarise_pstats(out, top)}
        summary["tool"] = "cProfile (main thread only)"
    summary["run"] = {k: row[k] for k in ("transfer_s", "transfer_MiB_per_s", "cpu_s_per_GiB_transfer",
                                          "user_s_per_GiB_transfer", "sys_s_per_GiB_transfer",
                                          "core_utilisation_transfer")}
    return summary


def _run_cprofile_pair(tmp: Path, shared, timeout: float, out: Path) -> dict:
    # node.py under cProfile: the leecher writes stats when it exits.
    global NODE
    real = NODE
    tmp = tmp / "cprofile"
    tmp.mkdir()
    wrapper = tmp / "cprofile_node.py"
    wrapper.write_text(
        "import cProfile, runpy, sys\n"
        f"sys.argv = [{str(real)!r}] + sys.argv[1:]\n"
        "spec = sys.argv[1]\n"
        "if '\"leech\"' in spec:\n"
        "    prof = cProfile.Profile()\n"
        "    prof.enable()\n"
        "    try:\n"
        f"        runpy.run_path({str(real)!r}, run_name='__main__')\n"
        "    finally:\n"
        "        prof.disable()\n"
        f"        prof.dump_stats({str(out)!r})\n"
        "else:\n"
        f"    runpy.run_path({str(real)!r}, run_name='__main__')\n")
    NODE = wrapper
    try:
        return run_pair(tmp, shared, "shoal", "shoal", timeout)
    finally:
        NODE = real


def _summarise_pstats(path: Path, top: int) -> dict:
    import pstats
    st = pstats.Stats(str(path))
    rows = [(f"{fn} ({file.split('/work/main/')[-1]}:{line})", tt, ct)
            for (file, line, fn), (cc, nc, tt, ct, callers) in st.stats.items()]
    total = sum(r[1] for r in rows)
    return {"samples": None,
            "own": [(r[0], r[1] / total) for r in sorted(rows, key=lambda r: -r[1])[:top]],
            "inclusive": [(r[0], r[2] / total) for r in sorted(rows, key=lambda r: -r[2])[:top * 3]]}


# -- the run ------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="pair file size, MiB")
    ap.add_argument("--pairs", default=",".join(f"{s}->{le}" for s, le in PAIRS),
                    help="comma-separated seed->leech pairs, or 'none'")
    ap.add_argument("--swarm-size", type=int, default=16, help="swarm file size F, MiB")
    ap.add_argument("--upload-cap", type=float, default=1.0, help="per-node upload cap, MiB/s (seed too)")
    ap.add_argument("--n", default="8,16,32", help="comma-separated swarm sizes (leechers), or 'none'")
    ap.add_argument("--per-process", type=int, default=4, help="shoal leecher Sessions per process in swarms")
    ap.add_argument("--super-seed", choices=["off", "on", "both"], default="both",
                    help="shoal's swarm seed with BEP 16 super-seeding: off, on, or both, one after the other "
                         "(default)")
    ap.add_argument("--swarm-impls", default="shoal,libtorrent",
                    help="comma-separated implementations to run each swarm size with (libtorrent: plain seed, "
                         "one node per process)")
    ap.add_argument("--profile", action="store_true", help="profile the shoal leecher in an extra shoal->shoal pair")
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary (else cProfile)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds any one step may take")
    ap.add_argument("--workdir", type=Path, default=None, help="where files go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("needs 2 CPUs: one per side of a pair", file=sys.stderr)
        return 2
    pairs = [] if args.pairs == "none" else [tuple(p.split("->")) for p in args.pairs.split(",")]
    ns = [] if args.n == "none" else [int(x) for x in args.n.split(",")]
    cap = int(args.upload_cap * MiB)

    from shoal.demo.realclients import make_shared_file

    result: dict = {"command": " ".join(["bench/p2p/bench.py", *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                    "pair_file_MiB": args.size, "swarm_file_MiB": args.swarm_size,
                    "upload_cap_MiB_per_s": args.upload_cap, "per_process": args.per_process}
    try:
        import libtorrent
        result["machine"]["libtorrent"] = libtorrent.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="shoal-p2p-", dir=args.workdir) as tmpname:
        tmp = Path(tmpname)
        rows = []
        if pairs or args.profile:
            shared = make_shared_file(tmp / "pairfile", "data.bin", args.size * MiB, "http://127.0.0.1:1/announce")
            for s, le in pairs:
                print(f"pair {s}->{le} ...", file=sys.stderr, flush=True)
                rows.append(run_pair(tmp, shared, s, le, args.timeout))
            base = next((r for r in rows if r["pair"] == "libtorrent->libtorrent"), None)
            for r in rows:
                r["transfer_ratio_to_lt"] = r["transfer_MiB_per_s"] / base["transfer_MiB_per_s"] if base else None
                r["total_ratio_to_lt"] = r["total_MiB_per_s"] / base["total_MiB_per_s"] if base else None
            result["pairs"] = rows
        swarms = []
        if ns:
            shared_s = make_shared_file(tmp / "swarmfile", "swarm.bin", args.swarm_size * MiB,
                                        "http://127.0.0.1:1/announce", seed=2)
            impls = args.swarm_impls.split(",")
            for n in ns:
                for impl in impls:
                    sups = ((False, True) if args.super_seed == "both" else (args.super_seed == "on",)) \
                        if impl == "shoal" else (False,)
                    for sup in sups:
                        print(f"swarm {impl} n={n}{' super-seed' if sup else ''} ...", file=sys.stderr, flush=True)
                        swarms.append(run_swarm(tmp, shared_s, n, cap, args.per_process, args.timeout, sup, impl))
            for w in swarms:  # the anchor: libtorrent's swarm of the same size, same caps, same run
                lt_row = next((x for x in swarms if x["impl"] == "libtorrent" and x["n"] == w["n"]), None)
                w["ratio_to_libtorrent"] = w["last_done_s"] / lt_row["last_done_s"] if lt_row else None
            result["swarms"] = swarms
        if args.profile:
            print("profiling the shoal leecher ...", file=sys.stderr, flush=True)
            result["profile"] = run_profile(tmp, shared, args.timeout, args.py_spy, args.top)

    if rows:
        print(f"\nPairs, {args.size} MiB on loopback (seeder on CPU {SEED_CPU}, leecher on CPU {LEECH_CPU}); "
              "transfer = leecher's first byte to complete")
        print(f"{'seed -> leech':<26} {'start-up s':>10} {'transfer s':>10} {'MiB/s':>8} {'x lt':>6} "
              f"{'total s':>8} {'CPU s/GiB seed':>15} {'leech':>6} {'sha1':>5}")
        for r in rows:
            ratio = f"{r['transfer_ratio_to_lt']:.2f}" if r["transfer_ratio_to_lt"] else "-"
            print(f"{r['pair']:<26} {r['startup_s']:>10.3f} {r['transfer_s']:>10.3f} "
                  f"{r['transfer_MiB_per_s']:>8.1f} {ratio:>6} {r['total_s']:>8.3f} "
                  f"{r['cpu_s_per_GiB_transfer']['seed']:>15.2f} {r['cpu_s_per_GiB_transfer']['leech']:>6.2f} "
                  f"{'ok' if r['sha1_ok'] else 'BAD':>5}")
    if swarms:
        print(f"\nSwarms: 1 seed + N leechers, F = {args.swarm_size} MiB, "
              f"every node's upload capped at {args.upload_cap:g} MiB/s")
        print(f"{'impl':<10} {'N':>3} {'super':>5} {'procs':>5} {'last done s':>11} {'min s':>6} {'x min':>6} "
              f"{'x lt':>5} {'client-server s':>15} {'x c-s':>6} {'first byte s':>12} {'seed copies':>11} "
              f"{'cores busy':>10}")
        for w in swarms:
            xlt = f"{w['ratio_to_libtorrent']:.2f}" if w.get("ratio_to_libtorrent") else "-"
            print(f"{w['impl']:<10} {w['n']:>3} {'yes' if w['super_seed'] else 'no':>5} {w['processes']:>5} "
                  f"{w['last_done_s']:>11.2f} {w['theoretical_min_s']:>6.2f} "
                  f"{w['ratio_to_min']:>6.2f} {xlt:>5} {w['client_server_s']:>15.1f} "
                  f"{w['ratio_to_client_server']:>6.2f} "
                  f"{w['first_byte_s']:>12.2f} {w['seed_uploaded_copies'] or 0:>11.2f} {w['cores_busy']:>10.2f}")
    if "profile" in result:
        p = result["profile"]
        run = p["run"]
        print(f"\nProfile of an extra shoal->shoal pair ({p['tool']}); under the profiler "
              f"{run['transfer_MiB_per_s']:.1f} MiB/s, leecher {run['user_s_per_GiB_transfer']['leech']:.1f} user + "
              f"{run['sys_s_per_GiB_transfer']['leech']:.1f} system CPU s/GiB")
        for side in ("leech", "seed"):
            if side not in p:
                continue
            print(f"  {side}, own samples:")
            for name, share in p[side]["own"]:
                print(f"    {share * 100:5.1f}%  {name}")
            print(f"  {side}, inclusive:")
            for name, share in p[side]["inclusive"][:args.top + 5]:
                print(f"    {share * 100:5.1f}%  {name}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
