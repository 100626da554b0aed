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

Anomaly-aware dispatch (``anomaly_host``; :class:`AnomalyPart`). Every worker
host also runs a telemetry daemon with short windows (scenario overrides). The
hosts share one kernel, so /proc/stat is the machine's on every host; what tells
them apart is the host's cgroup (lab/cgroups.py), which the emulated render has
each telemetry daemon read (``[collector] cgroup = "self"``), and the scenario has
them train on those features only (``[training] features = ["cgroup_"]``): a
model on the machine-wide features would see a fault on one host from every host.
First a warm-up, three phases of ``normal_windows`` windows each on every host:
jobs (twice a run's tasks, so some run back to back, as on the hosts left when
one is excluded) on a quiet machine; the same with a CPU hog on the dispatcher's
host (no worker, no model), since the hosts share the cores and the others' tasks
run slower while the fault runs; then idle. So "normal" has idle, working and
working-on-a-busy-machine windows. Then every host trains its own model
(``shoal telemetry train`` inside the host); the training's own CPU is in the
host's cgroup, so the experiment waits until every host scored a window that
started after it and every worker reports its node ``normal`` to the dispatcher
(``trained_at``: the checks look at what follows). Then two runs, ``exclude_anomalous`` off and then on
(the dispatcher's rendered config rewritten and reloaded with SIGHUP, as
``systemctl reload`` does): a CPU hog (``shoal telemetry inject cpu``, every core)
starts on ``anomaly_host``; once the dispatcher's ``workers`` view reports that
node anomalous, a job of ``anomaly_tasks`` tasks is submitted, each a real
process that hashes ``anomaly_cpu_mib`` MiB of zeros (its CPU work: the result
must be the known SHA-256) and then waits ``anomaly_sleep`` seconds. The
makespan is the dispatcher's own submit-to-done time. The dispatcher's view is
polled throughout (every worker's verdict, with the time it was seen); after
the runs every host's telemetry windows are read back with their verdicts.
Checks: every unit done exactly once, every result exact, the faulted host
flagged in both runs, with ``exclude_anomalous`` on no unit of the job started
on it while the dispatcher saw it flagged, and no other host was ever flagged in
the dispatcher's view (the node's verdict: ``[detector] confirm`` anomalous windows
in a row); the other hosts' lone flagged windows are reported as a false-alarm rate.
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
from shoal.protocol.telemetry import Status

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
    anomaly_host: str = setting("", help="anomaly-aware dispatch: the worker host that gets a CPU fault ('' = off)")
    anomaly_tasks: int = setting(12, min=1, max=10_000, help="tasks in each anomaly-aware dispatch job")
    anomaly_cpu_mib: int = setting(64, min=1, max=65_536, help="MiB of zeros each of those tasks hashes (its CPU work)")
    anomaly_sleep: float = setting(0.5, min=0.0, max=3600.0, help="s each of those tasks waits after hashing")
    normal_windows: int = setting(12, min=2, max=100_000,
                                  help="windows each worker host stores with warm-up jobs running, and again idle, "
                                       "before it trains")
    fault_seconds: float = setting(40.0, min=1.0, max=3600.0, help="s the CPU fault lasts in each anomaly run")

    def __post_init__(self) -> None:
        if not self.modes and not self.anomaly_host:
            raise ValueError("modes: nothing to run (no input mode and no anomaly_host)")
        if self.modes and 1 not in self.workers:
            raise ValueError("workers: must include 1 (the one-worker time T1 of RPE)")
        if len(set(self.workers)) != len(self.workers) or min(self.workers) < 1:
            raise ValueError("workers: distinct numbers of at least 1")
        if any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
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

    async def wait_registered(self, ids: list[str]) -> None:
        # as long as the daemons may take to start: [lab] ready_timeout, the knob for a loaded machine
        timeout = self.lab.scenario.ready_timeout
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
        view = await self.client.call("job", JobQuery(id=job_id).encode())
        tasks = await _job_tasks(self.client, job_id)
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


#: An anomaly-part task ($0 its name): hash $1 bytes of zeros (its CPU work), print the SHA-256, wait $2 s.
HASH_SCRIPT = 'head -c "$1" /dev/zero | sha256sum | cut -d" " -f1; sleep "$2"'


def _zeros_sha256(size: int) -> str:
    h = hashlib.sha256()
    block = bytes(1 << 20)
    while size:
        h.update(block[:min(size, len(block))])
        size -= min(size, len(block))
    return h.hexdigest()


@dataclass
class AnomalyRun:
    exclude: bool  # the dispatcher's exclude_anomalous in this run
    job: int
    seconds: float  # makespan: the dispatcher's submit-to-done time
    tasks: list[dict[str, Any]]
    fault: tuple[float, float]  # wall-clock start of the CPU fault, and when the injector exited
    flagged: tuple[float, float]  # wall clock: first and last poll of the dispatcher's view with the host anomalous
    submitted: float


class AnomalyPart:
    """Anomaly-aware dispatch: telemetry flags a host with a CPU fault, the dispatcher stops using it."""

    def __init__(self, lab: Lab, params: Params, client: RpcClient, workers: list[str]) -> None:
        self.lab = lab
        self.p = params
        self.client = client
        self.workers = workers
        self.host = params.anomaly_host
        self.size = params.anomaly_cpu_mib * MIB
        self.want = _zeros_sha256(self.size)
        #: (wall-clock time, {worker: verdict}) from every look at the dispatcher's ``workers`` view
        self.timeline: list[tuple[float, dict[str, str | None]]] = []
        head = lab.scenario.running("dispatcher")[0].name
        self.dispatcher = lab.daemons[(head, "dispatcher")]
        self.dispatcher_config = lab.bundle.plan(head, "dispatcher").config
        self.jobs = 0
        self.trained_at = 0.0
        self.thresholds: dict[str, float] = {}  # each worker host's model threshold
        self.window = load_config(lab.bundle.plan(self.host, "telemetry").config,
                                  DAEMONS["telemetry"].load_schema()).collector.window

    def socket(self, host: str) -> str:
        return str(Path(self.lab.daemons[(host, "telemetry")].env["STATE_DIRECTORY"]) / "control.sock")

    async def telemetry(self, host: str, method: str, params: Any = None) -> Any:
        from shoal.daemons.runtime.rpc import connect_unix

        async with await connect_unix(self.socket(host)) as c:
            return await c.call(method, None if params is None else params.encode(), timeout=60.0)

    async def verdicts(self) -> dict[str, str | None]:
        seen = {w["id"]: w.get("verdict") for w in await self.client.call("workers")}
        self.timeline.append((time.time(), seen))
        return seen

    def flagged_around(self, host: str, t: float) -> bool:
        """The dispatcher's views just before and just after ``t`` both had ``host`` anomalous."""
        before = [v for at, v in self.timeline if at <= t]
        after = [v for at, v in self.timeline if at >= t]
        return bool(before and after) and before[-1].get(host) == after[0].get(host) == "anomalous"

    def spec(self, name: str, n: int = 0) -> dict[str, Any]:
        tasks = [{"name": f"a{k}", "command": ["sh", "-c", HASH_SCRIPT, f"a{k}", str(self.size),
                                                f"{self.p.anomaly_sleep:g}"],
                  "timeout": self.p.task_timeout} for k in range(n or self.p.anomaly_tasks)]
        return {"name": name, "policy": "least-load", "tasks": tasks}

    async def submit(self, name: str, n: int = 0) -> int:
        reply = await self.client.call("submit", Submit(spec=json.dumps(self.spec(name, n)).encode()).encode())
        return int(reply["job"])

    async def wait_job(self, job: int, what: str) -> dict[str, Any]:
        limit = self.p.anomaly_tasks * (self.p.task_timeout + 30) + 60
        with trio.move_on_after(limit):
            while (view := await self.client.call("job", JobQuery(id=job).encode()))["state"] == "running":
                await self.verdicts()
                await trio.sleep(POLL)
            return view
        raise LabError(f"{what}: job {job} not finished after {limit:g}s")

    async def wait_verdict(self, host: str, verdict: str, timeout: float, what: str) -> float:
        with trio.move_on_after(timeout):
            while (await self.verdicts()).get(host) != verdict:  # noqa: ASYNC110 - another process's state
                await trio.sleep(POLL)
            return time.time()
        raise LabError(f"{what}: the dispatcher did not see {host} {verdict} within {timeout:g}s "
                       f"(last: {self.timeline[-1][1].get(host) if self.timeline else '-'})")

    async def stored(self) -> dict[str, int]:
        out = {}
        for w in self.workers:
            out[w] = (await self.telemetry(w, "status", Status(windows=0)))["stored"]
        return out

    async def warm_up(self, start: dict[str, int]) -> dict[str, int]:
        """Jobs of the anomaly tasks until every worker host stored ``normal_windows`` windows past ``start``."""
        while True:
            # twice the tasks of a run: with the faulted host excluded the others run more
            # of them back to back, and that is normal too
            job = await self.submit(f"warm-up-{self.jobs}", 2 * self.p.anomaly_tasks)
            self.jobs += 1
            await self.wait_job(job, "warm-up")
            now = await self.stored()
            if all(now[w] - start[w] >= self.p.normal_windows for w in self.workers):
                return now

    async def scored_since(self, t: float) -> bool:
        """Every worker host's newest window started at or after ``t`` and was scored."""
        for w in self.workers:
            ws = (await self.telemetry(w, "status", Status(windows=1)))["windows"]
            if not ws or ws[0]["start"] < t or ws[0]["score"] is None:
                return False
        return True

    async def train(self) -> dict[str, Any]:
        """Warm up (jobs on every worker while windows accumulate), then every host trains its own model."""
        lab = self.lab
        start = await self.stored()
        lab.progress(f"anomaly: warm-up jobs until every worker host stored {self.p.normal_windows} more "
                     f"windows (now {min(start.values())}..{max(start.values())}), then as many idle ones")
        now = await self.warm_up(start)
        # The hosts share the machine's cores: while the CPU fault runs on one host, the
        # others' tasks run slower, and their own cgroups' CPU looks unlike a quiet
        # machine's. That is normal for them, so it is in "normal": as many warm-up
        # windows again with the same hog on the dispatcher's host (no worker, no model).
        head = self.lab.scenario.running("dispatcher")[0].name
        busy = self.p.normal_windows * self.window + 5  # s
        hog = await lab.spawn(head, [*lab.shoal, "telemetry", "inject", "cpu", "--duration", f"{busy:g}"],
                              name="warm-up-cpu")
        lab.progress(f"anomaly: {self.p.normal_windows} more warm-up windows with a CPU hog on {head} for {busy:g}s")
        now = await self.warm_up(now)
        with trio.move_on_after(busy + 60):
            await hog.wait()  # its own deadline (killing the injector would orphan its busy processes)
        if hog.returncode is None:
            raise LabError(f"the warm-up CPU hog on {head} still runs {busy + 60:g}s after it started")
        # as many idle windows: a model that saw only working windows flags an idle node
        with trio.move_on_after(self.p.normal_windows * self.window + 60):
            while not all(n - now[w] >= self.p.normal_windows  # noqa: ASYNC110 - other processes' state
                          for w, n in (await self.stored()).items()):
                await trio.sleep(POLL)
        trained: dict[str, Any] = {}

        async def one(host: str) -> None:
            done = await lab.exec(host, [*lab.shoal, "telemetry", "train", "--socket", self.socket(host)],
                                  timeout=300)
            trained[host] = done.stdout.decode(errors="replace").strip()
            model = (await self.telemetry(host, "status", Status(windows=0)))["model"]
            self.thresholds[host] = float(model["threshold"])

        async with trio.open_nursery() as nursery:
            for w in self.workers:
                nursery.start_soon(one, w)
        lab.progress(f"anomaly: trained {len(trained)} hosts on their own windows: {trained[self.workers[0]]}")
        # The training ran in each host's cgroup (the daemon's fit, the CLI's start-up): the
        # window holding it is the experiment's doing. From here on it is the workload's:
        # once every host scored a window that started after the training, and is normal.
        done = time.time()
        with trio.move_on_after(60.0):
            while not await self.scored_since(done):  # noqa: ASYNC110 - other processes' state
                await trio.sleep(POLL)
        for w in self.workers:
            await self.wait_verdict(w, "normal", 60.0, "after training")
        self.trained_at = time.time()
        return trained

    async def set_exclude(self, on: bool) -> None:
        """Rewrite the dispatcher's rendered config with ``exclude_anomalous`` and reload it (SIGHUP)."""
        import signal
        import tomllib

        from shoal.lab.render import toml_dumps

        doc = tomllib.loads(self.dispatcher_config.read_text())
        doc.setdefault("dispatcher", {})["exclude_anomalous"] = on
        self.dispatcher_config.write_text(toml_dumps(doc, "rewritten by the dispatch experiment (anomaly part)"))
        log = self.dispatcher.log
        mark = log.stat().st_size
        assert self.dispatcher.process is not None
        self.dispatcher.process.send_signal(signal.SIGHUP)
        line = f"exclude_anomalous is now {on}"
        with trio.move_on_after(30):
            while line not in log.read_bytes()[mark:].decode(errors="replace"):  # noqa: ASYNC110
                await trio.sleep(POLL)
            return
        raise LabError(f"the dispatcher did not log {line!r} within 30s of SIGHUP")

    async def run_one(self, exclude: bool) -> AnomalyRun:
        lab = self.lab
        if exclude:
            await self.set_exclude(True)
        fault_start = time.time()
        # `shoal telemetry inject cpu --duration S` inside the host: a busy process per core, S seconds
        await lab.apply(Fault(at=lab.now(), kind="inject", host=self.host, inject="cpu",
                              duration=self.p.fault_seconds))
        try:
            flag_seen = await self.wait_verdict(self.host, "anomalous", self.p.fault_seconds, "CPU fault")
            lab.progress(f"anomaly: {self.host} flagged {flag_seen - fault_start:.1f}s into its CPU fault; "
                         f"submitting {self.p.anomaly_tasks} tasks (exclude_anomalous = {str(exclude).lower()})")
        except LabError as exc:  # a failed check (with the windows' scores), not the end of the experiment
            lab.progress(f"anomaly: {exc}; submitting the job all the same")
        submitted = time.time()
        job = await self.submit(f"anomaly-exclude-{int(exclude)}")
        view = await self.wait_job(job, "anomaly run")
        while time.time() < fault_start + self.p.fault_seconds:  # the injector's own deadline
            await self.verdicts()
            await trio.sleep(POLL)
        fault_end = fault_start + self.p.fault_seconds
        await self.wait_verdict(self.host, "normal", 60.0, "after the CPU fault")
        tasks = await _job_tasks(self.client, job)
        flagged = [t for t, v in self.timeline if t >= fault_start and v.get(self.host) == "anomalous"] or [0.0]
        seconds = float(view["finished"] - view["submitted"]) if view["state"] == "done" else float("nan")
        lab.progress(f"anomaly: job {job} {view['state']} in {seconds:.2f}s with exclude_anomalous = "
                     f"{str(exclude).lower()}; {sum(t['worker'] == self.host for t in tasks)} of its units ran on "
                     f"{self.host}")
        rows = [{"task": t["task"], "unit": t["unit"], "state": t["state"], "worker": t["worker"],
                 "exit_code": t["exit_code"], "started": t["started"] or 0.0, "finished": t["finished"] or 0.0,
                 "got": (t.get("stdout") or b"").decode(errors="replace").strip(), "want": self.want,
                 "error": t.get("error", "")} for t in tasks]
        return AnomalyRun(exclude, job, seconds, rows, (fault_start, fault_end), (flagged[0], flagged[-1]), submitted)

    async def windows(self) -> dict[str, list[dict[str, Any]]]:
        """Every worker host's recent windows with the verdicts its own detector gave them."""
        return {w: (await self.telemetry(w, "status", Status(windows=1000)))["windows"] for w in self.workers}


async def _job_tasks(client: RpcClient, job: int) -> list[dict[str, Any]]:
    view = await client.call("job", JobQuery(id=job, logs=True).encode())
    tasks = view["tasks"]
    while len(tasks) < view["total"]:
        more = await client.call("job", JobQuery(id=job, logs=True, offset=len(tasks)).encode())
        if not more["tasks"]:
            break
        tasks += more["tasks"]
    return list(tasks)


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
    if params.modes and max(params.workers) > len(workers):
        raise LabError(f"{where}.workers: {max(params.workers)} workers asked for, {len(workers)} hosts run one")
    names = {h.name for h in s.hosts}
    if params.modes and params.store not in names:
        raise LabError(f"{where}.store: no host is named {params.store!r}")
    if params.kill_worker and params.kill_worker not in workers[:max(params.workers)]:
        raise LabError(f"{where}.kill_worker: {params.kill_worker!r} is not among the first "
                       f"{max(params.workers)} worker hosts")
    if params.anomaly_host:
        if params.anomaly_host not in workers:
            raise LabError(f"{where}.anomaly_host: {params.anomaly_host!r} is not a worker host")
        lacking = [w for w in workers if "telemetry" not in s.host(w).daemons]
        if lacking:
            raise LabError(f"{where}.anomaly_host: anomaly-aware dispatch needs telemetry on every worker host "
                           f"(none on {', '.join(lacking)})")
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
        await exp.wait_registered(workers[:max(params.workers)] if params.modes else workers)
        for mode in params.modes:
            for n in sorted(params.workers, reverse=True):
                records.append(await exp.run_one(mode, n))
        await client.call("exclude", Exclude(workers=[]).encode())
        anomaly: AnomalyPart | None = None
        runs: list[AnomalyRun] = []
        if params.anomaly_host:
            anomaly = AnomalyPart(lab, params, client, workers)
            trained = await anomaly.train()
            for exclude in (False, True):
                runs.append(await anomaly.run_one(exclude))
            windows = await anomaly.windows()
    _report(lab, params, records, result)
    if anomaly is not None:
        _report_anomaly(lab, anomaly, runs, trained, windows, result)
    return result


def _completions(lab: Lab, jobs: list[int]) -> dict[int, dict[str, int]]:
    """job -> unit -> times recorded done, from the dispatcher's own completions log."""
    from shoal.daemons.dispatcher.daemon import STORE_FILE
    from shoal.daemons.dispatcher.store import Store

    head = lab.scenario.running("dispatcher")[0].name
    store = Store(Path(lab.daemons[(head, "dispatcher")].env["STATE_DIRECTORY"]) / STORE_FILE)
    try:
        return {j: store.completion_counts(j) for j in jobs}
    finally:
        store.close()


def _report(lab: Lab, params: Params, records: list[RunRecord], result: Result) -> None:
    if not records:
        return
    counts = _completions(lab, [r.job for r in records])
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


def _report_anomaly(lab: Lab, a: AnomalyPart, runs: list[AnomalyRun], trained: dict[str, Any],
                    windows: dict[str, list[dict[str, Any]]], result: Result) -> None:
    host = a.host
    counts = _completions(lab, [r.job for r in runs])
    bad_once = [f"job {r.job} unit {u}: {counts[r.job].get(u, 0)}x" for r in runs
                for u in sorted({t["unit"] for t in r.tasks} | set(counts[r.job])) if counts[r.job].get(u, 0) != 1]
    result.check("anomaly runs: every task recorded done exactly once", not bad_once and all(
        len(r.tasks) == a.p.anomaly_tasks for r in runs),
        f"{sum(len(r.tasks) for r in runs)} units in {len(runs)} jobs, per the dispatcher's completions log"
        + (f"; wrong: {', '.join(bad_once[:5])}" if bad_once else ""))
    wrong = [f"job {r.job}/{t['task']}: {t['state']} exit {t['exit_code']} {t['error'] or t['got'][:16]}"
             for r in runs for t in r.tasks if t["state"] != "done" or t["exit_code"] != 0 or t["got"] != a.want]
    result.check("anomaly runs: every task's result is exact", not wrong,
                 f"every task printed the SHA-256 of {a.p.anomaly_cpu_mib} MiB of zeros ({a.want[:16]}...)"
                 if not wrong else "; ".join(wrong[:5]))
    threshold = a.thresholds.get(host, float("nan"))
    for r in runs:
        during = [x["score"] for x in windows[host] if x["score"] is not None and r.fault[0] <= x["start"] < r.fault[1]]
        result.check(f"{host} flagged by its telemetry, seen by the dispatcher (exclude_anomalous = "
                     f"{str(r.exclude).lower()})", r.flagged[0] > 0,
                     f"{r.flagged[0] - r.fault[0]:.1f}s into the fault; flagged until "
                     f"{r.flagged[1] - r.fault[0]:.1f}s, the fault ended at {r.fault[1] - r.fault[0]:.1f}s"
                     if r.flagged[0] > 0 else
                     f"never seen anomalous; its windows during the fault scored "
                     f"{', '.join(f'{x:.3g}' for x in during) or '-'} against a threshold of {threshold:.3g}")
    ex = next(r for r in runs if r.exclude)
    during = [t for t in ex.tasks if t["worker"] == host and a.flagged_around(host, t["started"])]
    result.check(f"with exclude_anomalous, {host} got no new unit while flagged", not during,
                 f"{sum(t['worker'] == host for t in ex.tasks)} of {len(ex.tasks)} units ran on {host}, none "
                 "started while the dispatcher's views before and after said it was anomalous"
                 if not during else f"started there while flagged: {', '.join(t['task'] for t in during)}")
    others_seen = sorted({w for t, v in a.timeline for w, verdict in v.items()
                          if t >= a.trained_at and w != host and verdict == "anomalous"})
    others_windows = {w: sum(1 for x in ws if x["anomalous"] and x["start"] >= a.trained_at)
                      for w, ws in windows.items() if w != host}
    scored = {w: sum(1 for x in ws if x["score"] is not None) for w, ws in windows.items()}
    flagged_own = sum(1 for x in windows[host] if x["anomalous"])
    # What the dispatcher acts on is the node's verdict (telemetry's [detector] confirm windows
    # in a row); a lone flagged window on another host is the detector's false-alarm rate,
    # reported, not a failure.
    other_scored = sum(scored.values()) - scored[host]
    odd = sum(others_windows.values())
    result.check("no other host was flagged", not others_seen,
                 f"the dispatcher's view ({len(a.timeline)} looks) never had another host anomalous; their "
                 f"{other_scored} windows had {odd} lone false alarm(s) ({odd / max(other_scored, 1):.1%}); "
                 f"{host} flagged {flagged_own} of its {scored[host]} windows" if not others_seen else
                 f"also flagged: {', '.join(others_seen)} (dispatcher); lone windows: "
                 f"{', '.join(f'{w} {n}' for w, n in others_windows.items() if n) or '-'}")
    result.data["other_hosts_window_false_alarms"] = {"windows": other_scored, "flagged": odd}
    for r in runs:
        on_host = sum(t["worker"] == host for t in r.tasks)
        result.rows.append({"run": f"anomaly, exclude_anomalous = {str(r.exclude).lower()}", "tasks": len(r.tasks),
                            "makespan_s": r.seconds, f"units_on_{host}": on_host,
                            "flagged_after_s": r.flagged[0] - r.fault[0]})
    _square(result.rows)
    if lab.out is not None:
        result.plots.append(_plot_anomaly(lab.out / "dispatch-anomaly.png", a, runs))
    result.data["anomaly"] = {
        "host": host, "separated_by": "the host's cgroup ([collector] cgroup = \"self\"; the hosts share one "
        "kernel, so /proc/stat is the same on every host)",
        "trained": trained, "want_sha256": a.want,
        "runs": [{"exclude_anomalous": r.exclude, "job": r.job, "makespan": r.seconds, "fault": r.fault,
                  "flagged": r.flagged, "submitted": r.submitted, "tasks": r.tasks} for r in runs],
        "dispatcher_view": [{"t": t, "verdicts": v} for t, v in a.timeline],
        "windows": windows,
    }


def _plot_anomaly(path: Path, a: AnomalyPart, runs: list[AnomalyRun]) -> Path:
    """Per run: each worker's units as bars in time, the fault and the span the dispatcher saw it flagged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2 + 0.4 * len(a.workers) * len(runs)), squeeze=False)
    for ax, r in zip(axes[:, 0], runs, strict=True):
        t0 = r.submitted
        for i, w in enumerate(a.workers):
            spans = [(t["started"] - t0, t["finished"] - t["started"]) for t in r.tasks if t["worker"] == w]
            ax.broken_barh(spans, (i - 0.35, 0.7), color="tab:red" if w == a.host else "tab:blue")
        ax.axvspan(r.fault[0] - t0, r.fault[1] - t0, color="orange", alpha=0.15, label=f"CPU fault on {a.host}")
        ax.axvspan(r.flagged[0] - t0, r.flagged[1] - t0, ymin=0.0, ymax=0.04, color="red",
                   label="dispatcher sees it anomalous")
        ax.set_yticks(range(len(a.workers)), a.workers)
        ax.set_xlim(min(-1.0, r.fault[0] - t0), max(r.seconds, 0) + 2)
        ax.set_title(f"exclude_anomalous = {str(r.exclude).lower()}: makespan {r.seconds:.1f}s")
        ax.set_xlabel("s since the job was submitted")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _square(rows: list[dict[str, Any]]) -> None:
    """Give every row every key (rows of the RPE part and the anomaly part differ): "" where it has none."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    for i, r in enumerate(rows):
        rows[i] = {k: r.get(k, "") for k in keys}


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
