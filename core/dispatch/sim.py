"""Discrete-event simulator of seed 004's system (DAMD, section II.B).

Theory of operation
-------------------
*The system.* An access point (AP) receives jobs, each a DAG of tasks, and
dispatches every task to one of ``m`` servers. A server has ``cpus`` CPU slots
of speed ``cpu_speed`` (work units per second per CPU), ``mem_total`` memory,
a ``bandwidth`` from the AP and a propagation delay ``k`` (``rtt``) to it.

*Time of a task* (all from the seed):

* ``D1 = k + data_size / bandwidth`` — from the AP to the server;
* waiting in the server's queue until the server schedules it; it can only be
  scheduled once every predecessor has finished *and its result has arrived*:
  ``D3 = k`` of the predecessor's server if that is another server, else 0;
* processing ``work / (cpu_speed * cpus)``;
* ``D2 = k`` to bring the result back to the AP.

The response time is ``T = finish + D2 - submitted`` (submitted = the job's
arrival at the AP); a task misses its deadline when ``finish + D2 > deadline``.

*Dispatch.* Following the seed, the AP dispatches tasks as soon as they arrive,
without waiting for their predecessors to finish, subject to **memory
admission**: a server admits a task only if ``task.mem <= mem_free``; the memory
stays reserved from dispatch until the task finishes. Tasks no server admits wait
at the AP and are retried whenever memory is freed. To rule out deadlock
(memory full of tasks whose predecessors cannot be admitted) a task is only
dispatched once all its predecessors have been dispatched: the set of dispatched
unfinished tasks is then closed under "predecessor of", so its earliest member is
always runnable. Released tasks are offered to the dispatch policy in arrival
order, and within a job in decreasing ``policy.priority`` (HEFT's upward rank)
then topological order.

*Scheduling.* Whenever a server has free CPUs and ready tasks that fit, its queue
policy picks one (``QueuePolicy.pick``) and it starts.

*Events* are ``(time, seq, kind, payload)`` in a heap; ``seq`` makes the order
deterministic. Kinds: job arrival, task arrival at a server, task ready (its
inputs are in), task finish. The policies are the ones the live daemons use
(:mod:`.policy`); they get the simulated time as ``now``, and ``observe`` is
called once per task with its response time.

Everything is deterministic given the workload seed and the policies' seeds.
:func:`generate_workload` draws random servers and random DAG jobs the way seed
004's experiments describe ("we randomly generate the dependency graph between
tasks ... the memory size and CPU of the edge server"); the parameter ranges are
ours and documented in ``docs/dispatch-policies.md``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.core.dispatch.base import DispatchPolicy, QueuePolicy, ServerState, TaskInfo, admissible

# ----------------------------------------------------------------------------- model


@dataclass(slots=True)
class SimServer:
    id: str
    cpus: int
    cpu_speed: float
    mem_total: float
    bandwidth: float
    rtt: float


@dataclass(slots=True)
class SimTask:
    id: str
    work: float
    data_size: float
    mem: float
    cpus: int
    deadline: float | None  # relative to the job's arrival
    preds: tuple[str, ...] = ()


@dataclass(slots=True)
class SimJob:
    id: str
    arrival: float
    tasks: list[SimTask]  # in a topological order


@dataclass(slots=True)
class Workload:
    servers: list[SimServer]
    jobs: list[SimJob]

    @property
    def n_tasks(self) -> int:
        return sum(len(j.tasks) for j in self.jobs)


@dataclass(slots=True)
class TaskRecord:
    """What happened to one task; the tests check the invariants on these."""

    id: str
    job: str
    server: str = ""
    dispatched: float = math.nan
    arrived: float = math.nan
    ready: float = math.nan
    started: float = math.nan
    finished: float = math.nan
    response: float = math.nan
    deadline: float | None = None
    missed: bool = False
    finish_count: int = 0


@dataclass(slots=True)
class SimResult:
    records: dict[str, TaskRecord]
    mean_response: float
    miss_rate: float
    makespan: float
    decisions: int
    decision_seconds: float  # wall time spent in choose() + pick()
    max_ap_queue: int
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        return {
            "mean_response_s": self.mean_response,
            "miss_rate": self.miss_rate,
            "makespan_s": self.makespan,
            "decision_us": 1e6 * self.decision_seconds / max(self.decisions, 1),
        }


# ----------------------------------------------------------------------------- workload


def generate_workload(
    *,
    n_tasks: int = 500,
    density: float = 8.0,
    n_servers: int = 10,
    seed: int = 0,
    max_job_tasks: int = 8,
    edge_prob: float = 0.3,
    slack: tuple[float, float] = (1.5, 3.0),
) -> Workload:
    """Random servers and a Poisson stream of random DAG jobs.

    ``density`` is the mean number of tasks arriving per second (seed 004's
    "task arrival density"); jobs of 1..``max_job_tasks`` tasks arrive as a
    Poisson process at ``density / mean job size`` jobs per second until
    ``n_tasks`` tasks are generated. In a job, task ``j`` depends on each earlier
    task with probability ``edge_prob`` (at most 3 predecessors). A task's
    deadline is its job's arrival plus ``slack`` (uniform) times the work on the
    longest chain ending at it, at speed 1, plus one second of network allowance.
    """
    if n_tasks < 1 or n_servers < 1 or not density > 0:
        raise ValueError("need n_tasks >= 1, n_servers >= 1 and density > 0")
    rng = np.random.default_rng(seed)
    servers = [
        SimServer(
            id=f"s{i}",
            cpus=int(rng.choice([1, 2, 4])),
            cpu_speed=float(rng.uniform(0.5, 2.0)),
            mem_total=float(rng.uniform(4.0, 16.0)),  # GB
            bandwidth=float(rng.uniform(5e6, 50e6)),  # bytes/s
            rtt=float(rng.uniform(0.005, 0.1)),  # s
        )
        for i in range(n_servers)
    ]
    mean_job = (1 + max_job_tasks) / 2
    jobs: list[SimJob] = []
    t = 0.0
    made = 0
    while made < n_tasks:
        t += float(rng.exponential(mean_job / density))
        size = min(int(rng.integers(1, max_job_tasks + 1)), n_tasks - made)
        jid = f"j{len(jobs)}"
        tasks: list[SimTask] = []
        chain: list[float] = []
        for k in range(size):
            cands = [p for p in range(k) if rng.random() < edge_prob]
            if len(cands) > 3:
                cands = sorted(rng.choice(cands, 3, replace=False).tolist())
            work = float(rng.uniform(0.5, 4.0))
            chain.append(work + max((chain[p] for p in cands), default=0.0))
            tasks.append(
                SimTask(
                    id=f"{jid}.t{k}",
                    work=work,
                    data_size=float(rng.uniform(0.5e6, 5e6)),
                    mem=float(rng.uniform(0.2, 2.0)),
                    cpus=1,
                    deadline=float(rng.uniform(*slack)) * chain[k] + 1.0,
                    preds=tuple(f"{jid}.t{p}" for p in cands),
                )
            )
        jobs.append(SimJob(jid, t, tasks))
        made += size
    return Workload(servers, jobs)


def validate(workload: Workload) -> None:
    """Refuse a workload that cannot run: unknown or forward dependencies, a task too big."""
    max_mem = max(s.mem_total for s in workload.servers)
    max_cpus = max(s.cpus for s in workload.servers)
    seen: set[str] = set()
    for job in workload.jobs:
        local: set[str] = set()
        for t in job.tasks:
            if t.id in seen:
                raise ValueError(f"duplicate task id {t.id}")
            for p in t.preds:
                if p not in local:
                    raise ValueError(f"task {t.id}: predecessor {p} is not an earlier task of {job.id}")
            if t.mem > max_mem or t.cpus > max_cpus:
                raise ValueError(f"task {t.id} fits on no server (mem {t.mem}, cpus {t.cpus})")
            local.add(t.id)
            seen.add(t.id)


# ----------------------------------------------------------------------------- engine

_JOB, _ARRIVE, _READY, _FINISH = 0, 1, 2, 3


class _Srv:
    __slots__ = ("spec", "free_cpus", "mem_free", "not_started", "pending_work", "ready", "running")

    def __init__(self, spec: SimServer) -> None:
        self.spec = spec
        self.free_cpus = spec.cpus
        self.mem_free = spec.mem_total
        self.not_started = 0  # dispatched (in flight or queued), not started
        self.pending_work = 0.0  # their work
        self.ready: list[str] = []  # ready tasks in the order they became ready
        self.running: dict[str, tuple[float, float, float]] = {}  # id -> (start, end, work)

    def state(self, now: float) -> ServerState:
        rest = sum(w * max(end - now, 0.0) / max(end - start, 1e-12)
                   for start, end, w in self.running.values())
        s = self.spec
        return ServerState(
            id=s.id, cpus=float(s.cpus), cpu_speed=s.cpu_speed, mem_total=s.mem_total,
            mem_free=self.mem_free, bandwidth=s.bandwidth, rtt=s.rtt,
            queue_len=self.not_started, running=len(self.running),
            queued_work=self.pending_work + rest,
        )


def simulate(workload: Workload, dispatch: DispatchPolicy, queue: QueuePolicy) -> SimResult:
    """Run ``workload`` to completion under the two policies; return per-task records."""
    validate(workload)
    servers = [_Srv(s) for s in workload.servers]
    by_sid = {s.spec.id: s for s in servers}
    spec: dict[str, SimTask] = {}
    info: dict[str, TaskInfo] = {}
    succs: dict[str, list[str]] = {}
    records: dict[str, TaskRecord] = {}
    preds_left: dict[str, int] = {}
    undispatched_preds: dict[str, int] = {}
    ready_scheduled: set[str] = set()
    ap_queue: list[str] = []
    events: list[tuple[float, int, int, str]] = []
    seq = 0
    decisions = 0
    decision_seconds = 0.0
    max_ap = 0

    def push(t: float, kind: int, payload: str) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    jobs = {j.id: j for j in workload.jobs}
    for j in workload.jobs:
        push(j.arrival, _JOB, j.id)

    def result_at(pred: str, server_id: str) -> float:
        r = records[pred]
        return r.finished + (0.0 if r.server == server_id else by_sid[r.server].spec.rtt)

    def maybe_ready(tid: str) -> None:
        r = records[tid]
        if not r.server or preds_left[tid] or tid in ready_scheduled:
            return
        t_ready = max([r.arrived] + [result_at(p, r.server) for p in spec[tid].preds])
        ready_scheduled.add(tid)
        push(t_ready, _READY, tid)

    def try_dispatch(now: float) -> None:
        nonlocal decisions, decision_seconds
        if not ap_queue:
            return
        keep: list[str] = []
        for tid in ap_queue:
            if undispatched_preds[tid]:
                keep.append(tid)
                continue
            task = info[tid]
            states = [s.state(now) for s in servers]
            ok = admissible(task, states)
            if not ok:
                keep.append(tid)
                continue
            cands = [states[i] for i in ok]
            t0 = time.perf_counter()
            i = dispatch.choose(task, cands, now)
            decision_seconds += time.perf_counter() - t0
            decisions += 1
            srv = by_sid[cands[i].id]
            st = spec[tid]
            srv.mem_free -= st.mem
            srv.not_started += 1
            srv.pending_work += st.work
            r = records[tid]
            r.server = srv.spec.id
            r.dispatched = now
            r.arrived = now + srv.spec.rtt + st.data_size / srv.spec.bandwidth
            for s in succs[tid]:
                undispatched_preds[s] -= 1
            push(r.arrived, _ARRIVE, tid)
        ap_queue[:] = keep

    def try_schedule(srv: _Srv, now: float) -> None:
        nonlocal decisions, decision_seconds
        while srv.ready and srv.free_cpus > 0:
            fits = [tid for tid in srv.ready if spec[tid].cpus <= srv.free_cpus]
            if not fits:
                return
            t0 = time.perf_counter()
            k = queue.pick([info[t] for t in fits], srv.state(now), now)
            decision_seconds += time.perf_counter() - t0
            decisions += 1
            tid = fits[k]
            srv.ready.remove(tid)
            st = spec[tid]
            srv.free_cpus -= st.cpus
            srv.not_started -= 1
            srv.pending_work -= st.work
            end = now + st.work / (srv.spec.cpu_speed * st.cpus)
            srv.running[tid] = (now, end, st.work)
            records[tid].started = now
            push(end, _FINISH, tid)

    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == _JOB:
            job = jobs[payload]
            edges = []
            infos = []
            depth: dict[str, int] = {}
            for t in job.tasks:
                spec[t.id] = t
                succs[t.id] = []
                depth[t.id] = 1 + max((depth[p] for p in t.preds), default=-1)
                for p in t.preds:
                    succs[p].append(t.id)
                    edges.append((p, t.id))
                preds_left[t.id] = len(t.preds)
                undispatched_preds[t.id] = len(t.preds)
                dl = None if t.deadline is None else job.arrival + t.deadline
                info[t.id] = TaskInfo(t.id, job.id, t.work, t.data_size, t.mem, float(t.cpus),
                                      dl, job.arrival, depth[t.id])
                infos.append(info[t.id])
                records[t.id] = TaskRecord(t.id, job.id, deadline=dl)
            dispatch.plan(infos, edges, [s.state(now) for s in servers], now)
            order = {t.id: i for i, t in enumerate(job.tasks)}
            ap_queue.extend(sorted(order, key=lambda tid: (-dispatch.priority(info[tid]), order[tid])))
            try_dispatch(now)
        elif kind == _ARRIVE:
            maybe_ready(payload)
        elif kind == _READY:
            r = records[payload]
            r.ready = now
            srv = by_sid[r.server]
            srv.ready.append(payload)
            try_schedule(srv, now)
        else:  # _FINISH
            r = records[payload]
            srv = by_sid[r.server]
            st = spec[payload]
            del srv.running[payload]
            srv.free_cpus += st.cpus
            srv.mem_free += st.mem
            r.finished = now
            r.finish_count += 1
            back = now + srv.spec.rtt
            r.response = back - info[payload].submitted
            r.missed = r.deadline is not None and back > r.deadline
            dispatch.observe(info[payload], srv.spec.id, r.response, now)
            queue.observe(info[payload], srv.spec.id, r.response, now)
            for s in succs[payload]:
                preds_left[s] -= 1
                maybe_ready(s)
            try_schedule(srv, now)
            try_dispatch(now)
        max_ap = max(max_ap, len(ap_queue))

    unfinished = [tid for tid, r in records.items() if r.finish_count != 1]
    if unfinished or ap_queue:
        raise RuntimeError(f"simulation ended with {len(unfinished)} tasks not finished once")
    resp = [r.response for r in records.values()]
    with_dl = [r for r in records.values() if r.deadline is not None]
    return SimResult(
        records=records,
        mean_response=float(np.mean(resp)) if resp else 0.0,
        miss_rate=(sum(r.missed for r in with_dl) / len(with_dl)) if with_dl else 0.0,
        makespan=max((r.finished + by_sid[r.server].spec.rtt for r in records.values()), default=0.0),
        decisions=decisions,
        decision_seconds=decision_seconds,
        max_ap_queue=max_ap,
    )


# ----------------------------------------------------------------------------- experiments

# Seed 004's baseline pairings, plus HEFT and the learned policies.
PAIRINGS: dict[str, tuple[str, str]] = {
    "NF": ("nearest", "fcfs"),
    "RS": ("random", "sjf"),
    "LS": ("least-load", "edf"),
    "HEFT+EDF": ("heft", "edf"),
    "DQN+EDF": ("dqn", "edf"),
    "DAMD": ("dqn", "marl"),  # DQN dispatcher + multi-agent scheduler
}


def learned(pairing: tuple[str, str]) -> bool:
    return pairing[0] == "dqn" or pairing[1] == "marl"
