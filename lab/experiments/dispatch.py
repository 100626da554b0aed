"""The dispatch experiment (seeds 002 and 004): task inputs from one central store versus the swarm.

Theory of operation
-------------------
Seed 002 (e-Science Central) scaled to about 200 workers and no further: every
workflow invocation read its data from one central repository, whose VM then
became the bottleneck; moving the data to a scalable blob store raised the limit.
Here the central repository is one lab host serving every input over HTTP (its
upload link is the bottleneck), and the scalable store is the swarm: each
worker host also runs a ``shoal-peer``, tasks name their input as
``swarm:FILE.torrent``, and the worker's swarm hook fetches it through its own
peer, which goes on seeding it to the other workers (docs/dispatch.md).

The hosts: the dispatcher (and a tracker) on one host, the store host
(``store``: an HTTP server and the initial seed, its ``shoal-peer``), and the
worker hosts (``worker`` + ``peer`` each). For each input mode (``store``,
``swarm``) and each number of workers n, a job is run on n workers (the others
excluded through the dispatcher's operator hook, ``exclude``, as
bench/dispatch/rpe.py does): ``rounds * n`` independent tasks, where the n
tasks of round r read dataset r, a fresh ``input_mib`` MiB file of random bytes
made for this run only (so no run is helped by a copy an earlier one left). Each
task is a real process: it computes the SHA-256 of its staged input, fails
unless it is the dataset's, prints it, then works ``work`` seconds (a sleep:
the 2-core machine cannot run 16 CPU-bound tasks at once, and what is measured
is the data path). The dispatcher's least-load policy gives each worker
``rounds`` tasks, one of each dataset (``fetches`` in the results counts the
distinct (worker, dataset) pairs, to show it).

Tn is the dispatcher's own time from submission to the job recorded done.
RPE_n = T1 / (n * Tn) (seed 002, Fig. 7), where T1 is the time one worker needs
for the n-worker workload. One worker running ``rounds`` tasks (the n = 1 run,
which must be in ``workers``) reads every dataset once, as each of the n
workers does, so T1 = n * T1(rounds tasks) and RPE_n = T1(rounds) / Tn: a
system without a bottleneck keeps Tn at the one-worker time. T1 is measured per
mode, on that mode's own data path.

Correctness, from the dispatcher's own records: every unit recorded done exactly
once in its completions log (``jobs.db``), every task exited 0 having printed
the SHA-256 of its dataset, and, when ``kill_worker`` names a worker, its daemon
is killed with SIGKILL (the lab restarts it, as systemd would) in the first run
while a task process runs under it (seen in /proc), and each task it was running
must be recorded done once by a run that started after the kill (the killed
attempt never reports). The bytes the store host uploaded in each run are read from
its link's counters: the bottleneck made visible.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from shoal.daemons.runtime.config import ListenAddr, load_config, read_token, setting
from shoal.daemons.runtime.registry import DAEMONS
from shoal.daemons.runtime.rpc import RpcClient, open_client
from shoal.daemons.worker.runner import SwarmHook
from shoal.lab.experiment import Result
from shoal.lab.lab import Lab, LabError
from shoal.lab.net import MIB
from shoal.lab.scenario import Fault
from shoal.protocol.dispatch import Exclude, JobQuery, Submit

__all__ = ["Params", "run"]

MODES = ("store", "swarm")
POLL = 0.2  # s between looks at the dispatcher's state (a condition polled under a deadline)
#: A task ($0 its name): check the staged input's SHA-256 ($1) against the dataset's ($2), print it, work $3 s.
TASK_SCRIPT = ('h=$(sha256sum -- "$1" | cut -d" " -f1); '
               '[ "$h" = "$2" ] || { echo "sha256 of $1 is $h, not $2" >&2; exit 3; }; '
               'echo "$h"; sleep "$3"')


@dataclass(frozen=True, slots=True)
class Params:
    input_mib: float = setting(4.0, min=0.001, max=4096.0, help="MiB of each dataset a task reads")
    rounds: int = setting(2, min=1, max=64, help="tasks per worker in each run; round r's tasks read dataset r")
    work: float = setting(1.0, min=0.0, max=3600.0, help="s each task works after checking its input")
    workers: tuple[int, ...] = setting((1, 4), help="the numbers of workers n to run (1 is needed, for T1)")
    modes: tuple[str, ...] = setting(MODES, help="input modes to run: store (HTTP), swarm (peers)")
    store: str = setting("store", help="the host that serves every input over HTTP and seeds the swarm")
    http_port: int = setting(8080, min=1, max=65535, help="the store's HTTP port")
    kill_worker: str = setting("", help="kill -9 this worker's daemon in the first run, while it runs a task")
    task_timeout: float = setting(300.0, min=1.0, max=86_400.0, help="s; a task (its input fetch included)")

    def __post_init__(self) -> None:
        if 1 not in self.workers:
            raise ValueError("workers: must include 1 (the one-worker time T1 of RPE)")
        if len(set(self.workers)) != len(self.workers) or min(self.workers) < 1:
            raise ValueError("workers: distinct numbers of at least 1")
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes: distinct values among {', '.join(MODES)}")


@dataclass
class Dataset:
    path: Path
    sha256: str
    source: str = ""  # the task's input: an http:// URL or swarm:FILE.torrent


@dataclass
class RunRecord:
    mode: str
    n: int
    job: int
    seconds: float
    tasks: list[dict[str, Any]]
    store_upload: int  # bytes the store host sent during the run
    killed: list[str]  # tasks running under the worker daemon killed in this run
    killed_at: float  # wall-clock time of the kill


def _peer_socket(lab: Lab, host: str) -> Path:
    """The control socket of ``host``'s peer daemon, as its rendered config and the lab's state say."""
    cfg = load_config(lab.bundle.plan(host, "peer").config, DAEMONS["peer"].load_schema())
    if cfg.peer.control_socket:
        return Path(cfg.peer.control_socket)
    return Path(lab.daemons[(host, "peer")].env["STATE_DIRECTORY"]) / "control.sock"


def _task_children(pid: int) -> list[str]:
    """The names of this experiment's task processes whose parent is ``pid`` (from /proc)."""
    names = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == pid and len(argv) > 3 and argv[:3] == [b"sh", b"-c", TASK_SCRIPT.encode()]:
            names.append(argv[3].decode())
    return sorted(names)


def _write_dataset(path: Path, size: int, seed: str) -> str:
    rng = random.Random(seed)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = rng.randbytes(min(left, 1 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


class Experiment:
    def __init__(self, lab: Lab, params: Params, client: RpcClient, workers: list[str]) -> None:
        self.lab = lab
        self.p = params
        self.client = client
        self.workers = workers
        self.store = params.store
        self.data = lab.workdir / "dispatch-data"
        self.seed_socket = _peer_socket(lab, self.store) if "swarm" in params.modes else None
        tracker = lab.scenario.running("tracker")
        self.announce = (f"http://{lab.bundle.plan(tracker[0].name, 'tracker').ports['http']}/announce"
                         if tracker else "")
        self.kill_pending = bool(params.kill_worker)
        self.killed_at = 0.0

    async def datasets(self, mode: str, n: int) -> list[Dataset]:
        """Fresh datasets for one run, on the store host: served over HTTP, and seeded for ``swarm``."""
        out = []
        for r in range(self.p.rounds):
            path = self.data / f"{mode}-n{n}-r{r}.bin"
            digest = await trio.to_thread.run_sync(_write_dataset, path, round(self.p.input_mib * MIB),
                                                   f"{self.lab.scenario.seed}/{mode}/{n}/{r}")
            ds = Dataset(path, digest)
            if mode == "store":
                ds.source = f"http://{self.lab.address(self.store)}:{self.p.http_port}/{path.name}"
            else:
                torrent = path.with_suffix(".torrent")
                await self.lab.exec(self.store, [*self.lab.shoal, "peer", "create", str(path), "--tracker",
                                                 self.announce, "-o", str(torrent)])
                # The store's peer adds it over its own files: a hash check, then it seeds.
                assert self.seed_socket is not None
                await SwarmHook(self.seed_socket).fetch(torrent, self.data, 1 << 40)
                ds.source = f"swarm:{torrent}"
            out.append(ds)
        return out

    def spec(self, mode: str, n: int, data: list[Dataset]) -> dict[str, Any]:
        tasks = []
        for r, ds in enumerate(data):
            for i in range(n):
                tasks.append({"name": f"r{r}-{i}", "command": ["sh", "-c", TASK_SCRIPT, f"r{r}-{i}", ds.path.name,
                                                               ds.sha256, f"{self.p.work:g}"],
                              "inputs": [ds.source], "timeout": self.p.task_timeout})
        return {"name": f"{mode}-n{n}", "policy": "least-load", "tasks": tasks}

    async def live_workers(self) -> dict[str, dict[str, Any]]:
        return {w["id"]: w for w in await self.client.call("workers")}

    async def wait_registered(self, ids: list[str], timeout: float = 60.0) -> None:
        with trio.move_on_after(timeout):
            while not set(ids) <= (await self.live_workers()).keys():  # noqa: ASYNC110 - another process's state
                await trio.sleep(POLL)
            return
        missing = sorted(set(ids) - (await self.live_workers()).keys())
        raise LabError(f"workers not registered with the dispatcher after {timeout:g}s: {', '.join(missing)}")

    async def kill_if_running(self) -> list[str]:
        """SIGKILL ``kill_worker``'s daemon if a task process of this job runs under it; the tasks it ran."""
        proc = self.lab.daemons[(self.p.kill_worker, "worker")]
        pid = proc.pid
        running = _task_children(pid) if pid is not None else []
        if not running:
            return []
        self.killed_at = time.time()
        await self.lab.apply(Fault(at=self.lab.now(), kind="kill", host=self.p.kill_worker, daemon="worker"))
        self.kill_pending = False
        return running

    async def run_one(self, mode: str, n: int) -> RunRecord:
        lab = self.lab
        chosen = self.workers[:n]
        data = await self.datasets(mode, n)
        await self.wait_registered(chosen)
        await self.client.call("exclude", Exclude(workers=[w for w in self.workers if w not in chosen]).encode())
        spec = self.spec(mode, n, data)
        before = (await trio.to_thread.run_sync(lab.net.counters))[self.store][0]
        reply = await self.client.call("submit", Submit(spec=json.dumps(spec).encode()).encode())
        job_id = reply["job"]
        lab.progress(f"{mode} n={n}: job {job_id}, {len(spec['tasks'])} tasks reading "
                     f"{self.p.input_mib:g} MiB each")
        killed: list[str] = []
        limit = self.p.rounds * (self.p.task_timeout + 30) + 60
        with trio.move_on_after(limit) as scope:
            while True:
                view = await self.client.call("job", JobQuery(id=job_id).encode())
                if view["state"] != "running":
                    break
                if self.kill_pending and self.p.kill_worker in chosen:
                    killed = await self.kill_if_running()
                await trio.sleep(POLL)
        if scope.cancelled_caught:
            raise LabError(f"{mode} n={n}: job {job_id} not finished after {limit:g}s")
        store_upload = (await trio.to_thread.run_sync(lab.net.counters))[self.store][0] - before
        view = await self.client.call("job", JobQuery(id=job_id, logs=True).encode())
        tasks = view["tasks"]
        while len(tasks) < view["total"]:
            more = await self.client.call("job", JobQuery(id=job_id, logs=True, offset=len(tasks)).encode())
            if not more["tasks"]:
                break
            tasks += more["tasks"]
        want = {f"r{r}-{i}": ds.sha256 for r, ds in enumerate(data) for i in range(n)}
        rows = [{"task": t["task"], "unit": t["unit"], "state": t["state"], "worker": t["worker"],
                 "exit_code": t["exit_code"], "attempts": t["attempts"], "want": want.get(t["task"], ""),
                 "started": t["started"] or 0.0, "finished": t["finished"] or 0.0,
                 "got": (t.get("stdout") or b"").decode(errors="replace").strip(),
                 "error": t.get("error", "")} for t in tasks]
        seconds = float(view["finished"] - view["submitted"]) if view["finished"] else float("nan")
        lab.progress(f"{mode} n={n}: job {job_id} {view['state']} in {seconds:.2f}s; the store sent "
                     f"{store_upload / MIB:.1f} MiB")
        for ds in data:  # the next runs have their own datasets; the peers keep their copies until the end
            await trio.to_thread.run_sync(ds.path.unlink)
        return RunRecord(mode, n, job_id, seconds if view["state"] == "done" else float("nan"), rows,
                         store_upload, killed, self.killed_at if killed else 0.0)


async def _dispatcher(lab: Lab) -> RpcClient:
    hosts = lab.scenario.running("dispatcher")
    if not hosts:
        raise LabError(f"{lab.scenario.source}: the dispatch experiment needs a host running the dispatcher")
    head = hosts[0].name
    addr = ListenAddr.parse(lab.bundle.plan(head, "dispatcher").ports["rpc"])
    token = read_token(lab.bundle.token("dispatcher", head), "dispatcher.token_file")
    stream = await lab.connect(head, addr.host, addr.port)
    return await open_client(stream, token=token)


def _check_scenario(lab: Lab, params: Params) -> list[str]:
    s = lab.scenario
    workers = [h.name for h in s.running("worker")]
    where = f"{s.source}: experiment.params"
    if max(params.workers) > len(workers):
        raise LabError(f"{where}.workers: {max(params.workers)} workers asked for, {len(workers)} hosts run one")
    names = {h.name for h in s.hosts}
    if params.store not in names:
        raise LabError(f"{where}.store: no host is named {params.store!r}")
    if params.kill_worker and params.kill_worker not in workers[:max(params.workers)]:
        raise LabError(f"{where}.kill_worker: {params.kill_worker!r} is not among the first "
                       f"{max(params.workers)} worker hosts")
    if "swarm" in params.modes:
        if not s.running("tracker"):
            raise LabError(f"{where}.modes: swarm inputs need a host running the tracker")
        lacking = [h for h in [params.store, *workers] if "peer" not in s.host(h).daemons]
        if lacking:
            raise LabError(f"{where}.modes: swarm inputs need a peer on the store and every worker host "
                           f"(none on {', '.join(lacking)})")
    return workers


async def _http_store(lab: Lab, params: Params, data: Path) -> None:
    """A plain HTTP file server on the store host, bound to its lab address; returns once it answers."""
    addr = lab.address(params.store)
    probe = data / "probe"
    probe.write_bytes(b"ok")  # noqa: ASYNC240 -- two bytes into the lab's own directory
    await lab.spawn(params.store, [sys.executable, "-m", "http.server", str(params.http_port), "--bind", addr,
                                   "--directory", str(data)], name="http-store")
    client = next(h.name for h in lab.scenario.hosts if h.name != params.store)
    with trio.move_on_after(30):
        while True:
            try:
                if await lab.http_get(client, addr, params.http_port, "/probe", timeout=2) == b"ok":
                    return
            except (OSError, LabError, trio.TooSlowError):
                pass
            await trio.sleep(POLL)
    raise LabError(f"the HTTP store on {params.store} ({addr}:{params.http_port}) did not answer in 30s")


async def run(lab: Lab, params: Params) -> Result:
    workers = _check_scenario(lab, params)
    result = Result()
    data = lab.workdir / "dispatch-data"
    data.mkdir(mode=0o755)  # noqa: ASYNC240 -- the lab's own directory
    if "store" in params.modes:
        await _http_store(lab, params, data)
    client = await _dispatcher(lab)
    records: list[RunRecord] = []
    async with client:
        exp = Experiment(lab, params, client, workers)
        await exp.wait_registered(workers[:max(params.workers)])
        for mode in params.modes:
            for n in sorted(params.workers, reverse=True):
                records.append(await exp.run_one(mode, n))
        await client.call("exclude", Exclude(workers=[]).encode())
    _report(lab, params, records, result)
    return result


def _report(lab: Lab, params: Params, records: list[RunRecord], result: Result) -> None:
    from shoal.daemons.dispatcher.daemon import STORE_FILE
    from shoal.daemons.dispatcher.store import Store

    head = lab.scenario.running("dispatcher")[0].name
    store = Store(Path(lab.daemons[(head, "dispatcher")].env["STATE_DIRECTORY"]) / STORE_FILE)
    try:
        counts = {r.job: store.completion_counts(r.job) for r in records}
    finally:
        store.close()
    t1 = {r.mode: r.seconds for r in records if r.n == 1}
    for r in records:
        fetches = len({(t["worker"], t["task"].split("-")[0]) for t in r.tasks})
        rpe = t1[r.mode] / r.seconds if r.seconds == r.seconds and r.seconds > 0 else float("nan")
        result.rows.append({"inputs": r.mode, "n": r.n, "tasks": len(r.tasks), "Tn_s": r.seconds,
                            "tasks_per_s": len(r.tasks) / r.seconds if r.seconds > 0 else float("nan"),
                            "RPE": rpe, "store_sent_MiB": r.store_upload / MIB, "fetches": fetches,
                            "note": f"killed {params.kill_worker}" if r.killed else ""})

    units = {r.job: {t["unit"] for t in r.tasks} for r in records}
    bad_once = [f"job {j} unit {u}: {c.get(u, 0)}x" for j, c in counts.items() for u in sorted(units[j] | set(c))
                if c.get(u, 0) != 1]
    n_units = sum(len(u) for u in units.values())
    result.check("every task recorded done exactly once", not bad_once,
                 f"{n_units} units in {len(records)} jobs, per the dispatcher's completions log"
                 + (f"; wrong: {', '.join(bad_once[:5])}" if bad_once else ""))
    wrong = [f"{r.mode}-n{r.n}/{t['task']}: {t['state']} exit {t['exit_code']} {t['error'] or t['got'][:16]}"
             for r in records for t in r.tasks
             if t["state"] != "done" or t["exit_code"] != 0 or t["got"] != t["want"]]
    n_tasks = sum(len(r.tasks) for r in records)
    result.check("every task read its exact input", not wrong,
                 f"{n_tasks} tasks exited 0 after checking their input's SHA-256 and printed it"
                 if not wrong else "; ".join(wrong[:5]))
    if params.kill_worker:
        # The killed attempt never reported; a result recorded for one of its tasks
        # started after the kill, so it is the run that replaced it.
        hit = next((r for r in records if r.killed), None)
        again = [t for t in hit.tasks if t["task"] in hit.killed] if hit else []
        at = hit.killed_at if hit else 0.0
        ok = bool(again) and all(t["state"] == "done" and t["started"] >= at for t in again)
        result.check(f"the tasks the killed worker ({params.kill_worker}) was running ran again", ok,
                     "the worker was never seen running a task, so it was not killed" if hit is None else
                     f"killed in {hit.mode} n={hit.n} while running {', '.join(hit.killed)}; "
                     + "; ".join(f"{t['task']} recorded done once, run again on {t['worker']} "
                                 f"{t['started'] - at:+.2f}s after the kill" for t in again))

    result.data = {"params": {"input_mib": params.input_mib, "rounds": params.rounds, "work": params.work},
                   "runs": [{"mode": r.mode, "n": r.n, "job": r.job, "seconds": r.seconds,
                             "store_upload_bytes": r.store_upload, "killed": r.killed, "killed_at": r.killed_at,
                             "tasks": r.tasks}
                            for r in records],
                   "t1": t1}
    result.series = {"worker_tasks_finished": "sum by (host) (shoal_worker_tasks_finished_total)",
                     "dispatcher_queue_depth": "shoal_dispatcher_queue_depth"}
    if lab.out is not None:
        result.plots.append(_plot(lab.out / "dispatch.png", result.rows, params))


def _plot(path: Path, rows: list[dict[str, Any]], params: Params) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("store", "o-"), ("swarm", "s-")):
        pts = sorted((r["n"], r["tasks_per_s"], r["RPE"]) for r in rows if r["inputs"] == mode)
        if not pts:
            continue
        label = "central HTTP store" if mode == "store" else "swarm: inputs"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    ns = sorted({r["n"] for r in rows})
    ax2.plot(ns, [1.0] * len(ns), "k:", label="ideal")
    ax1.set_xlabel("workers n")
    ax1.set_ylabel("tasks per second")
    ax1.set_title(f"throughput ({params.input_mib:g} MiB input, {params.work:g} s work per task)")
    ax2.set_xlabel("workers n")
    ax2.set_ylabel("RPE_n = T1 / (n Tn)")
    ax2.set_ylim(0, 1.2)
    ax2.set_title("relative processing effectiveness (seed 002)")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
