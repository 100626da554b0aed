"""The dispatcher's state machine: jobs, units, workers, leases (sans-IO).

Theory of operation
-------------------
Seed 002 has one queue and workers that pull; seed 004 decides, when a task is
released, which server it goes to. :class:`Core` does both. A *unit* (a task,
or a chain of tasks fused into one invocation, see :mod:`.jobs`) moves through

    waiting --deps done--> ready --policy.choose--> assigned(worker) --pull--> leased(worker)
        leased --report ok--> done          (children whose deps are all done become ready)
        leased --report failed--> ready     (while attempts <= retries) or failed (the job fails)
        assigned/leased --worker silent for lease_seconds--> ready (dispatched again)

*Dispatch* happens when a unit becomes ready: the job's dispatch policy
(:mod:`.policy`) is shown the live workers that admit the unit (memory free and
CPU count, as seed 004's memory admission) and picks one; the unit joins that
worker's queue. A worker's queue holds at most ``ASSIGN_AHEAD`` units not yet
pulled; the rest wait, in order, in ``pending`` until a queue has room. If no
worker admits a unit, it waits in ``waiting`` and is tried again whenever a
worker registers or leaves exclusion, on reports (the oldest few) and every tick. Workers *pull* their
own queue (``pull``), which leases the units; a lease lives as long as the
worker heartbeats (and at most the unit's timeout plus two lease periods). A
worker silent for ``lease_seconds`` is dead: everything assigned or leased to
it goes back to ready and is dispatched again, so execution is at-least-once.

Completion is idempotent. A report is written to the store
first, with a conditional update that only succeeds for a pending unit; only
then does the in-memory state move on. A late duplicate (the first lease
expired and another worker ran the unit too) changes nothing, so every unit is
recorded done exactly once.

After a restart the store's unfinished jobs are loaded again; every unit not
done is ready or waiting, leases start empty and workers re-register when their
heartbeat is refused.

**Anomaly exclusion.** Workers may report their node's telemetry verdict
(``normal``, ``anomalous`` or ``unknown``) with each heartbeat. With
``exclude_anomalous`` on, a worker reported anomalous is treated like one the
operator excluded (``set_excluded``): it gets no new units and its queued ones
are dispatched elsewhere; units it is already running finish there. When it
reports ``normal`` (or ``unknown``: a telemetry daemon that cannot be read does
not keep a node out) it is dispatched to again.

**Shared reward.** Seed 004's scheduling agents (one per worker) share one
reward. Each unit recorded done appends ``(seq, worker, key, response time)``
to a bounded log (:data:`SHARED_LOG`); :meth:`Core.team_rewards` hands a
worker the entries from *other* workers since its last call (at most
:data:`MAX_SHARED_PER_REPLY`, the newest), so its ``marl`` scheduler observes
every task of the team, its own ones locally and the others' through the
dispatcher.

All times are arguments (wall-clock seconds in the daemon, so deadlines and
response times compare across hosts); nothing here does I/O except through the
store (a :class:`JobStore`, passed in), which tests may give a temporary file.

The unit states and their moves are the table of :mod:`.lifecycle`; every
change of ``UnitRec.state`` goes through :meth:`UnitRec.to`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from shoal.core.dispatch.base import DispatchPolicy, ServerState, TaskInfo, admissible
from shoal.core.dispatch.jobs import TASK_INPUT, Job, Unit, task_input, task_payload
from shoal.core.dispatch.lifecycle import (
    ASSIGN,
    ASSIGNED,
    CANCEL,
    CANCELLED,
    DONE,
    FAIL,
    FAILED,
    FINAL,
    LEASE,
    LEASED,
    READY,
    RELEASE,
    REQUEUE,
    RETRY,
    SUCCEED,
    WAITING,
    move,
)
from shoal.protocol.dispatch import VERDICTS, FetchSource, Lease, LeaseFacts, TaskResult, TaskSpec, UnitKey

__all__ = ["Core", "CoreError", "JobStore", "StoredJob", "WorkerRec", "UnitRec", "VERDICTS", "MAX_SHARED_PER_REPLY"]

SHARED_LOG = 4096  # completions kept for the team reward
ASSIGN_AHEAD = 2048  # units queued on one worker beyond what it has pulled (see Core._refill)
RETRY_ON_REPORT = 64  # waiting units retried per report (a tick retries every one)
STALL_GRACE = 1.0  # seconds a tick may come late before the lateness is excused (see Core.tick)
MAX_SHARED_PER_REPLY = 512  # team-reward entries in one pull or heartbeat reply


@dataclass(slots=True)
class StoredJob:
    """An unfinished job as the store gives it back after a restart."""

    id: int
    job: Job
    policy: str
    submitted: float
    state: str
    unit_state: dict[str, str]  # unit id -> a stored state (lifecycle.STORED)
    attempts: dict[str, int]
    lost: dict[str, int] = field(default_factory=dict)  # unit id -> leases lost (worker died, lease expired)


class JobStore(Protocol):
    """What :class:`Core` needs of the durable store (``shoal.daemons.dispatcher.store.Store``)."""

    def add_job(self, job: Job, policy: str, submitted: float, submitted_by: str = "") -> int: ...

    def record(self, outcomes: Sequence[tuple[int, str, str, str, Sequence[TaskResult]]],
               now: float) -> list[bool]: ...

    def finish_job(self, job: int, state: str, now: float, cancel_units: Iterable[str] = (),
                   reason: str = "", leased: dict[str, str] | None = None) -> None: ...

    def record_late(self, rows: Sequence[tuple[int, str, list[TaskResult]]], worker: str, now: float) -> int: ...

    def lost_lease(self, units: Sequence[tuple[int, str]]) -> None: ...

    def task_outputs(self, job_id: int, task: str) -> tuple[list[list[Any]], dict[str, Any] | None]: ...

    def unfinished_jobs(self) -> list[StoredJob]: ...


class CoreError(Exception):
    """A request the core refuses; ``code`` becomes the RPC error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True, eq=False)
class UnitRec:
    key: str  # "<job>/<unit>"
    job: int
    unit: Unit
    info: TaskInfo
    state: str = WAITING
    missing: int = 0  # dependencies not done yet
    attempts: int = 0  # reported attempts (failures count against retries)
    lost: int = 0  # leases lost to a dead worker or an expired lease: runs that may have started
    worker: str | None = None
    lease_until: float = 0.0
    lease_hard: float = 0.0
    counts: dict[str, int] | None = None  # its job's tasks by state (JobRec.counts), kept by to()

    def to(self, event: str) -> None:
        """Move along the life cycle (:func:`.lifecycle.move` raises on an illegal event)."""
        new = move(self.state, event)
        if self.counts is not None:
            n = len(self.unit.tasks)
            self.counts[self.state] -= n
            self.counts[new] = self.counts.get(new, 0) + n
        self.state = new


@dataclass(slots=True, eq=False)
class JobRec:
    id: int
    job: Job
    policy: str
    submitted: float
    units: dict[str, UnitRec]
    children: dict[str, list[str]]
    left: int  # units not done
    counts: dict[str, int] = field(default_factory=dict)  # tasks by unit state (progress, at no cost per call)


@dataclass(slots=True, eq=False)
class WorkerRec:
    id: str
    cpus: float
    cpu_speed: float
    mem_total: float
    bandwidth: float
    rtt: float
    last_seen: float
    assigned: deque[UnitRec] = field(default_factory=deque)
    leased: dict[str, UnitRec] = field(default_factory=dict)
    mem_reserved: float = 0.0
    work_reserved: float = 0.0
    running: int = 0
    excluded: bool = False  # by the operator (``exclude``)
    verdict: str | None = None  # the node's telemetry verdict, if the worker reports one
    reward_seq: int = 0  # the last shared-log entry this worker has been given

    def state(self) -> ServerState:
        running = min(self.running, len(self.leased))
        return ServerState(
            id=self.id, cpus=self.cpus, cpu_speed=self.cpu_speed, mem_total=self.mem_total,
            mem_free=self.mem_total - self.mem_reserved, bandwidth=self.bandwidth, rtt=self.rtt,
            queue_len=len(self.assigned) + len(self.leased) - running, running=running,
            queued_work=self.work_reserved,
        )


def _failure_reason(u: UnitRec, results: list[TaskResult]) -> str:
    bad = next((r for r in results if not r.ok), None)
    if bad is None:
        return f"job failed: unit {u.unit.id} did not finish"
    why = bad.error or f"exit {bad.exit_code}"
    return f"job failed: task {bad.task} {why}"[:200]


def _by_priority(priority: Callable[[TaskInfo], float], u: UnitRec) -> float:
    """Sort key: highest policy priority first."""
    return -priority(u.info)


class Core:
    def __init__(
        self,
        store: JobStore,
        policy_for: Callable[[str], DispatchPolicy],
        *,
        default_policy: str = "least-load",
        lease_seconds: float = 15.0,
        max_pending_units: int = 1_000_000,
        exclude_anomalous: bool = False,
        metrics: Any = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.policy_for = policy_for
        self.default_policy = default_policy
        self.lease_seconds = lease_seconds
        self.max_pending_units = max_pending_units
        self.metrics = metrics
        self.timer = timer
        self.jobs: dict[int, JobRec] = {}
        self.workers: dict[str, WorkerRec] = {}
        self.pending: deque[UnitRec] = deque()  # ready, in dispatch order, until a worker has room
        self.waiting: deque[UnitRec] = deque()  # ready, but no live worker admits them yet
        self.unfinished_units = 0
        self.excluded: set[str] = set()
        self.exclude_anomalous = exclude_anomalous
        #: the team reward log: (seq, worker id, unit key, response time), oldest first
        self.shared: deque[tuple[int, str, str, float]] = deque(maxlen=SHARED_LOG)
        self.shared_seq = 0
        self.last_tick: float | None = None
        self.stalled_seconds = 0.0  # the dispatcher's own deaf time, excused (see tick)
        #: called with a worker id when its queue grows (wakes its long poll)
        self.on_assign: Callable[[str], None] = lambda worker_id: None
        #: called with (job id, state) when a job finishes
        self.on_job_done: Callable[[int, str], None] = lambda job_id, state: None

    # -- jobs --------------------------------------------------------------------

    def submit(self, job: Job, now: float, policy: str | None = None, submitted_by: str = "") -> int:
        """Store the job (durably), then release its root units."""
        name = policy or job.policy or self.default_policy
        pol = self.policy_for(name)  # ValueError for an unknown name, before storing
        if self.unfinished_units + len(job.units) > self.max_pending_units:
            raise CoreError("busy", f"the dispatcher holds {self.unfinished_units} unfinished units; "
                                    f"the limit is {self.max_pending_units}")
        job_id = self.store.add_job(job, name, now, submitted_by)
        rec = self._load(job_id, job, name, now, {}, {})
        infos = [u.info for u in rec.units.values()]
        pol.plan(infos, [(f"{job_id}/{a}", f"{job_id}/{b}") for a, b in job.edges()],
                 [w.state() for w in self._live()], now)
        if self.metrics is not None:
            self.metrics.submitted(len(job.tasks))
        self._release([u for u in rec.units.values() if u.state == READY], now)
        return job_id

    def restore(self, now: float) -> int:
        """Load unfinished jobs from the store after a restart; returns how many."""
        stored = self.store.unfinished_jobs()
        for s in stored:
            rec = self._load(s.id, s.job, s.policy, s.submitted, s.unit_state, s.attempts, s.lost)
            self.policy_for(s.policy).plan([u.info for u in rec.units.values()],
                                           [(f"{s.id}/{a}", f"{s.id}/{b}") for a, b in s.job.edges()], [], now)
            if rec.left == 0:  # killed between the last unit and the job row
                self._finish_job(rec, DONE, now)
            else:
                self._release([u for u in rec.units.values() if u.state == READY], now)
        return len(stored)

    def _load(self, job_id: int, job: Job, policy: str, submitted: float,
              states: dict[str, str], attempts: dict[str, int], lost: dict[str, int] | None = None) -> JobRec:
        units: dict[str, UnitRec] = {}
        children: dict[str, list[str]] = {u: [] for u in job.units}
        for u in job.units.values():
            info = TaskInfo(
                id=f"{job_id}/{u.id}", job=str(job_id), work=u.work, data_size=float(u.data_size),
                mem=float(u.memory), cpus=u.cpus,
                deadline=None if u.deadline is None else submitted + u.deadline,
                submitted=submitted, depth=job.depth[u.id],
            )
            stored = states.get(u.id, "pending")
            rec = UnitRec(f"{job_id}/{u.id}", job_id, u, info, attempts=attempts.get(u.id, 0),
                          lost=(lost or {}).get(u.id, 0))
            if stored in FINAL:  # the store's names are the life cycle's
                rec.state = stored
            units[u.id] = rec
            for d in u.deps:
                children[d].append(u.id)
        for rec in units.values():
            if rec.state == WAITING:
                rec.missing = sum(1 for d in rec.unit.deps if units[d].state != DONE)
                if rec.missing == 0:
                    rec.to(RELEASE)
        left = sum(1 for r in units.values() if r.state != DONE)
        jr = JobRec(job_id, job, policy, submitted, units, children, left)
        for rec in units.values():
            jr.counts[rec.state] = jr.counts.get(rec.state, 0) + len(rec.unit.tasks)
            rec.counts = jr.counts
        self.jobs[job_id] = jr
        self.unfinished_units += left
        return jr

    # -- workers -----------------------------------------------------------------

    def register(self, worker_id: str, capacity: dict[str, Any], now: float, verdict: str | None = None) -> None:
        """A worker (re)joins; whatever an earlier incarnation held is dispatched again."""
        if verdict is not None and verdict not in VERDICTS:
            raise CoreError("bad_params", f"verdict: expected one of {', '.join(VERDICTS)}")
        old = self.workers.pop(worker_id, None)
        if old is not None:
            self._requeue_worker(old, now)
        self.workers[worker_id] = WorkerRec(
            id=worker_id,
            cpus=float(capacity["cpus"]),
            cpu_speed=float(capacity.get("cpu_speed", 1.0)),
            mem_total=float(capacity["memory"]),
            bandwidth=float(capacity.get("bandwidth", 1e9)),
            rtt=float(capacity.get("rtt", 0.0)),
            last_seen=now,
            excluded=worker_id in self.excluded,
            verdict=verdict,
            reward_seq=self.shared_seq,  # the team reward starts now, not with history
        )
        w = self.workers[worker_id]
        if not self.dispatchable(w) and not w.excluded and self.metrics is not None:
            self.metrics.anomaly_excluded()  # registered while its node is flagged
        self._retry_pending(now)

    def heartbeat(self, worker_id: str, running: int, now: float, verdict: str | None = None) -> None:
        w = self._worker(worker_id)
        w.last_seen = now
        w.running = running
        for u in w.leased.values():
            u.lease_until = now + self.lease_seconds
        if verdict is not None:
            self.set_verdict(worker_id, verdict, now)

    def set_verdict(self, worker_id: str, verdict: str, now: float) -> None:
        """A worker's node changed its telemetry verdict (see the module docstring)."""
        if verdict not in VERDICTS:
            raise CoreError("bad_params", f"verdict: expected one of {', '.join(VERDICTS)}")
        w = self._worker(worker_id)
        was = self.dispatchable(w)
        w.verdict = verdict
        self._apply_exclusion(w, was, now)

    def set_exclude_anomalous(self, on: bool, now: float) -> None:
        """Turn the telemetry exclusion on or off (config reload)."""
        before = {w.id: self.dispatchable(w) for w in self.workers.values()}
        self.exclude_anomalous = on
        for w in list(self.workers.values()):
            self._apply_exclusion(w, before[w.id], now)

    def dispatchable(self, w: WorkerRec) -> bool:
        return not w.excluded and not (self.exclude_anomalous and w.verdict == "anomalous")

    def _apply_exclusion(self, w: WorkerRec, was: bool, now: float) -> None:
        """After ``w`` stopped or started being dispatchable: move its queue, or retry pending units."""
        now_ok = self.dispatchable(w)
        if was and not now_ok:
            if self.metrics is not None and not w.excluded:
                self.metrics.anomaly_excluded()
            self._evict_queue(w, now)
        elif now_ok and not was:
            self._retry_pending(now)

    def team_rewards(self, worker_id: str) -> list[list[Any]]:
        """Units recorded done on other workers since this worker last asked: ``[[key, worker, response], ...]``."""
        w = self._worker(worker_id)
        out: list[list[Any]] = []
        for seq, wid, key, response in reversed(self.shared):
            if seq <= w.reward_seq or len(out) >= MAX_SHARED_PER_REPLY:
                break
            if wid != worker_id:
                out.append([key, wid, response])
        w.reward_seq = self.shared_seq
        out.reverse()
        return out

    def pull(self, worker_id: str, max_units: int, now: float) -> list[dict[str, Any]]:
        """Lease up to ``max_units`` of the worker's queue; returns what it needs to run them."""
        w = self._worker(worker_id)
        w.last_seen = now
        if len(w.assigned) < max_units:
            self._refill(now)
        out: list[dict[str, Any]] = []
        while w.assigned and len(out) < max_units:
            u = w.assigned.popleft()
            u.to(LEASE)
            u.lease_until = now + self.lease_seconds
            u.lease_hard = now + u.unit.timeout + 2 * self.lease_seconds
            w.leased[u.key] = u
            out.append(self._payload(u))
        if out and self.metrics is not None:
            self.metrics.started(sum(len(p["tasks"]) for p in out))
        self._refill(now)  # its queue has room again: the next pull finds it stocked
        return out

    def has_work(self, worker_id: str) -> bool:
        w = self.workers.get(worker_id)
        return w is None or bool(w.assigned)

    def set_excluded(self, worker_ids: Iterable[str], now: float) -> None:
        """The anomaly hook: these workers get no new units; their queued ones move."""
        self.excluded = set(worker_ids)
        for w in self.workers.values():
            w.excluded = w.id in self.excluded
            if not self.dispatchable(w):
                self._evict_queue(w, now)
        self._retry_pending(now)

    def _evict_queue(self, w: WorkerRec, now: float) -> None:
        """Dispatch ``w``'s queued (not yet pulled) units elsewhere."""
        if not w.assigned:
            return
        moved = list(w.assigned)
        w.assigned.clear()
        for u in moved:
            self._unreserve(w, u)
            u.to(REQUEUE)
            u.worker = None
        self._release(moved, now, front=True)

    # -- reports -----------------------------------------------------------------

    def report(self, worker_id: str, batch: Sequence[tuple[str, list[TaskResult]]], now: float) -> int:
        """Apply a batch of unit outcomes; returns how many changed the state (the rest were duplicates)."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.last_seen = now
        writes: list[tuple[int, str, str, str, list[TaskResult]]] = []
        recs: list[tuple[UnitRec, str, list[TaskResult]]] = []
        found: list[tuple[UnitRec | None, list[TaskResult]]] = []
        late: list[tuple[int, str, list[TaskResult]]] = []  # units of jobs that have ended
        for key, results in batch:
            k = key if isinstance(key, UnitKey) else UnitKey.parse(key)
            jr = self.jobs.get(k.job)
            u = jr.units.get(k.unit) if jr is not None else None
            if u is not None and [r.task for r in results] != list(u.unit.tasks[:len(results)]):
                raise CoreError("bad_params", f"{k}: results must name the unit's tasks in order")
            if jr is None:
                late.append((k.job, k.unit, results))
            found.append((u, results))
        if late:  # a killed unit's own account of its run (the store checks the unit and its tasks)
            self.store.record_late(late, worker_id, now)
        for u, results in found:
            if u is None or u.state in FINAL:
                if self.metrics is not None:
                    self.metrics.duplicate()
                continue
            ok = len(results) == len(u.unit.tasks) and all(r.ok for r in results)
            if ok:
                outcome = DONE
            elif u.attempts + 1 <= u.unit.retries:
                outcome = RETRY
            else:
                outcome = FAILED
            writes.append((u.job, u.unit.id, worker_id, outcome, results))
            recs.append((u, outcome, results))
        if not writes:
            return 0
        changed = self.store.record(writes, now)
        applied = 0
        released: list[UnitRec] = []
        for (u, outcome, results), did in zip(recs, changed, strict=True):
            if not did:
                continue
            applied += 1
            if u.state in FINAL:  # an earlier unit of this batch ended the job: the store has the result
                continue
            self._drop_lease(u)
            u.attempts += 1
            jr = self.jobs[u.job]
            if outcome == DONE:
                self._done(jr, u, worker_id, results, now, released)
            elif outcome == RETRY:
                if self.metrics is not None:
                    self.metrics.retried()
                u.to(RETRY)
                released.append(u)
            else:
                if self.metrics is not None:
                    self.metrics.failed(len(u.unit.tasks))
                u.to(FAIL)
                self.unfinished_units -= 1
                self._finish_job(jr, FAILED, now, _failure_reason(u, results))
        self._release([u for u in released if u.state == READY], now)
        self._retry_pending(now, limit=RETRY_ON_REPORT)  # memory was freed; tick retries them all
        return applied

    def _done(self, jr: JobRec, u: UnitRec, worker_id: str, results: list[TaskResult], now: float,
              released: list[UnitRec]) -> None:
        u.to(SUCCEED)
        jr.left -= 1
        self.unfinished_units -= 1
        response = now - u.info.submitted
        self.policy_for(jr.policy).observe(u.info, worker_id, response, now)
        self.shared_seq += 1
        self.shared.append((self.shared_seq, worker_id, u.key, response))
        if self.metrics is not None:
            misses = sum(
                1 for r in results
                if (d := jr.job.tasks[r.task].deadline) is not None and r.finished > jr.submitted + d
            )
            self.metrics.finished(len(u.unit.tasks), response, misses)
        for c in jr.children[u.unit.id]:
            child = jr.units[c]
            child.missing -= 1
            if child.missing == 0 and child.state == WAITING:
                child.to(RELEASE)
                child.info.submitted = now  # released now: response time counts from here
                released.append(child)
        if jr.left == 0:
            self._finish_job(jr, DONE, now)

    def _finish_job(self, jr: JobRec, state: str, now: float, reason: str = "") -> None:
        """End a job: its open units are cancelled. Those leased to a worker are named in the
        record and killed there: the worker's next heartbeat or report is answered with their
        keys (:meth:`to_cancel`), and its kill report fills in their records (:meth:`report`)."""
        cancel = []
        leased: dict[str, str] = {}
        for u in jr.units.values():
            if u.state not in FINAL:
                cancel.append(u.unit.id)
                if u.state == LEASED and u.worker is not None:
                    leased[u.unit.id] = u.worker
                self._drop_lease(u)
                u.to(CANCEL)  # if it sits in self.pending, _release skips it
        self.unfinished_units -= len(cancel)
        self.store.finish_job(jr.id, state, now, cancel, reason, leased)
        del self.jobs[jr.id]
        if self.metrics is not None and cancel:
            self.metrics.cancelled(len(cancel), len(leased))
        self.on_job_done(jr.id, state)

    def cancel(self, job_id: int, now: float, who: str) -> dict[str, int]:
        """``shoal cancel``: end a running job; its running units are killed on their workers."""
        jr = self.jobs.get(job_id)
        if jr is None:
            raise CoreError("not_running", f"job {job_id} is not running (unknown, or already finished)")
        leased = sum(1 for u in jr.units.values() if u.state == LEASED)
        open_units = sum(1 for u in jr.units.values() if u.state not in FINAL)
        self._finish_job(jr, CANCELLED, now, f"job cancelled by {who}")
        return {"cancelled": open_units, "killing": leased}

    def to_cancel(self, keys: Iterable[str]) -> list[str]:
        """Of the units a worker holds (queued or running), those it must drop or kill: their job
        has ended, or the unit was already recorded (a duplicate run after a lost lease).
        Stateless, so it holds across a dispatcher restart and a lost reply."""
        out = []
        for key in keys:
            k = UnitKey.parse(key)
            jr = self.jobs.get(k.job)
            u = jr.units.get(k.unit) if jr is not None else None
            if u is None or u.state in FINAL:
                out.append(key)
        return out

    # -- time --------------------------------------------------------------------

    def tick(self, now: float, period: float | None = None) -> list[str]:
        """Declare silent workers dead and expire leases; returns the dead workers' ids.

        ``period`` is the gap the caller meant between ticks. A longer gap means the
        dispatcher itself could not listen (its loop was busy, e.g. storing a million-task
        job, or the host was suspended): silence in that time is not the workers', so every
        worker's last sighting and every lease move on by the excess before anyone is judged.
        """
        if period is not None and self.last_tick is not None:
            stalled = now - self.last_tick - period
            if stalled > STALL_GRACE:
                self.excuse(stalled)
        self.last_tick = now
        dead = [w for w in self.workers.values() if now - w.last_seen > self.lease_seconds]
        for w in dead:
            del self.workers[w.id]
            self._requeue_worker(w, now)
        expired: list[UnitRec] = []
        for w in self.workers.values():
            for u in list(w.leased.values()):
                if now > u.lease_hard or now > u.lease_until:
                    self._drop_lease(u)
                    u.to(REQUEUE)
                    expired.append(u)
        if expired:
            if self.metrics is not None:
                self.metrics.requeued(len(expired))
            self._lost(expired)
            self._release(expired, now, front=True)
        self._retry_pending(now)
        return [w.id for w in dead]

    def excuse(self, seconds: float) -> None:
        """The dispatcher was deaf for ``seconds``: shift every sighting and lease by that much."""
        self.stalled_seconds += seconds
        for w in self.workers.values():
            w.last_seen += seconds
            for u in w.leased.values():
                u.lease_until += seconds
                u.lease_hard += seconds

    # -- internals -----------------------------------------------------------------

    def _worker(self, worker_id: str) -> WorkerRec:
        w = self.workers.get(worker_id)
        if w is None:
            raise CoreError("unknown_worker", f"worker {worker_id!r} is not registered (register again)")
        return w

    def _live(self) -> list[WorkerRec]:
        return [w for w in self.workers.values() if self.dispatchable(w)]

    def _requeue_worker(self, w: WorkerRec, now: float) -> None:
        units = list(w.assigned) + list(w.leased.values())
        self._lost(list(w.leased.values()))
        w.assigned.clear()
        w.leased.clear()
        for u in units:
            u.to(REQUEUE)
            u.worker = None
        if units:
            if self.metrics is not None:
                self.metrics.requeued(len(units))
            self._release(units, now, front=True)

    def _lost(self, units: list[UnitRec]) -> None:
        """Leased units taken back: each may have started, so its next run is a later attempt."""
        if units:
            self.store.lost_lease([(u.job, u.unit.id) for u in units])
            for u in units:
                u.lost += 1

    def _drop_lease(self, u: UnitRec) -> None:
        """Take the unit off whichever worker holds it (queued or leased)."""
        w = self.workers.get(u.worker) if u.worker else None
        if w is not None:
            if u.state == ASSIGNED:
                try:
                    w.assigned.remove(u)
                except ValueError:
                    pass
                else:
                    self._unreserve(w, u)
            elif w.leased.pop(u.key, None) is not None:
                self._unreserve(w, u)
        u.worker = None

    def _unreserve(self, w: WorkerRec, u: UnitRec) -> None:
        w.mem_reserved -= u.info.mem
        w.work_reserved -= u.info.work

    def _retry_pending(self, now: float, limit: int | None = None) -> None:
        """Try again the units no live worker admitted (all, or the ``limit`` oldest): a worker
        came, left exclusion or (on a report) freed memory."""
        if self.waiting and self._live():
            n = len(self.waiting) if limit is None else min(limit, len(self.waiting))
            again = [self.waiting.popleft() for _ in range(n)]
            self.pending.extendleft(reversed(again))
        self._refill(now)

    def _release(self, units: list[UnitRec], now: float, front: bool = False) -> None:
        """Queue ready units for dispatch, highest policy priority first (``front``: ahead of
        those already queued, for units taken back from a worker), then dispatch what fits."""
        units = [u for u in units if u.state == READY]  # pending may hold units of jobs ended since
        if not units:
            return
        by_policy: dict[str, list[UnitRec]] = {}
        for u in units:
            by_policy.setdefault(self.jobs[u.job].policy, []).append(u)
        ordered: list[UnitRec] = []
        for name, group in by_policy.items():
            prio = getattr(self.policy_for(name), "priority", None)
            if prio is not None and len(group) > 1:
                group.sort(key=partial(_by_priority, prio))
            ordered.extend(group)
        if front:
            self.pending.extendleft(reversed(ordered))
        else:
            self.pending.extend(ordered)
        self._refill(now)

    def _refill(self, now: float) -> None:
        """Dispatch queued units, oldest first, while a worker that admits them has room.

        A worker's queue holds at most ``ASSIGN_AHEAD`` units it has not pulled yet, so the
        policy decides with current loads and a million-unit job costs nothing per unit until
        workers can take it (and a worker that leaves hands back a bounded queue). A unit no
        live worker admits waits in ``waiting`` and does not hold up the rest."""
        live = self._live()
        while self.pending and live:
            room = [w for w in live if len(w.assigned) < ASSIGN_AHEAD]
            if not room:
                return
            u = self.pending.popleft()
            if u.state != READY:
                continue  # its job ended while it waited
            start = self.timer()
            states = [w.state() for w in room]
            fits = admissible(u.info, states)
            if not fits:
                if len(room) < len(live) and admissible(u.info, [w.state() for w in live]):
                    self.pending.appendleft(u)  # it fits a worker that is full: wait for room
                    return
                self.waiting.append(u)
                continue
            name = self.jobs[u.job].policy
            pol = self.policy_for(name)
            w = room[fits[pol.choose(u.info, [states[i] for i in fits], now)]]
            u.to(ASSIGN)
            u.worker = w.id
            w.assigned.append(u)
            w.mem_reserved += u.info.mem
            w.work_reserved += u.info.work
            if self.metrics is not None:
                self.metrics.decision(name, self.timer() - start)
            self.on_assign(w.id)

    def _payload(self, u: UnitRec) -> dict[str, Any]:
        """The unit's lease as it travels (:class:`shoal.protocol.dispatch.Lease`)."""
        i = u.info
        tasks = self.jobs[u.job].job.tasks
        specs = []
        for t in u.unit.tasks:
            payload = task_payload(tasks[t])
            refs = [ref for ref in tasks[t].inputs if ref.startswith(TASK_INPUT)]
            if refs:
                payload["sources"] = [self._source(u, ref).to_row() for ref in refs]
            specs.append(TaskSpec(**payload))
        return Lease.make(
            UnitKey(u.job, u.unit.id), u.attempts + u.lost + 1, u.unit.timeout, specs,
            LeaseFacts(i.work, i.data_size, i.mem, i.cpus, i.deadline, i.submitted, i.depth),
        ).encode()

    def _source(self, u: UnitRec, ref: str) -> FetchSource:
        """Where a ``task:NAME/PATH`` input is: the producer's record (it is done: a dependency),
        or nowhere yet when the producer runs earlier in the same unit (a fused chain)."""
        prod, path = task_input(ref)
        if prod in u.unit.tasks:
            return FetchSource(ref, 0, "")
        outputs, source = self.store.task_outputs(u.job, prod)
        row = next((o for o in outputs if o and o[0] == path), None)
        if row is None or len(row) < 3:  # done without it: the worker fails the task, loudly
            return FetchSource(ref, 0, "")
        src = source or {}
        return FetchSource(ref, int(row[1]), str(row[2]), str(src.get("url", "")), str(src.get("secret", "")),
                           str((src.get("magnets") or {}).get(path, "")))

    # -- views -------------------------------------------------------------------

    def queue_depth(self) -> int:
        return len(self.pending) + len(self.waiting) + sum(len(w.assigned) for w in self.workers.values())

    def running_units(self) -> int:
        return sum(len(w.leased) for w in self.workers.values())

    def workers_view(self) -> list[dict[str, Any]]:
        return [
            {"id": w.id, "cpus": w.cpus, "memory": w.mem_total, "rtt": w.rtt, "queued": len(w.assigned),
             "leased": len(w.leased), "running": w.running, "excluded": not self.dispatchable(w),
             "verdict": w.verdict}
            for w in self.workers.values()
        ]

    def progress(self, job_id: int) -> dict[str, int] | None:
        jr = self.jobs.get(job_id)
        if jr is None:
            return None
        return {st: n for st, n in jr.counts.items() if n}
