"""The worker daemon: register, pull, run up to K tasks at once, report, heartbeat.

Theory of operation
-------------------
Seed 002's engines pull invocations from one queue; seed 004's servers order
their own queue. A worker here does both:

* a *session* with the dispatcher (the runtime RPC, HMAC token when not on
  loopback): measure the RTT (best of a few pings), ``register`` the capacity,
  then three loops share one connection —
  **pull** (long poll for up to ``slots + prefetch`` units held locally),
  **report** (finished units, in batches) and **heartbeat** (every
  ``heartbeat_interval``; keeps the leases alive). Any connection failure ends
  the session; a new one starts after ``reconnect_interval``. ``unknown_worker``
  (the dispatcher restarted, or declared us dead) also re-registers, and the
  units we had pulled but not started are dropped: the dispatcher has
  requeued them.
* *slots*: ``K`` (``slots``, default the core count) units run at once. When a
  slot is free the queue policy (FCFS, SJF, EDF or seed 004's multi-agent
  scheduler ``marl``, see :mod:`~shoal.core.dispatch.schedulers`) picks
  which queued unit runs next. A unit's tasks run one after another in that
  slot (a fused chain is one invocation), each in its own process
  (:mod:`.runner`). Running tasks do not depend on the session: results wait
  in ``unreported`` until a report goes through, so a dispatcher restart loses
  nothing that finished.

The marl scheduler learns from every unit's response time (one shared reward,
seed 004): its own units as they finish, and the units of every other worker,
which the dispatcher returns in pull and heartbeat replies when asked
(``rewards: true``; :func:`.telemetry.feed_team_rewards`). Its weights are
saved to ``queue-policy.msgpack`` in the state directory periodically and at
stop (the runtime's ``StateSaver``; :mod:`shoal.core.dispatch.persist`).

Every message to and from the dispatcher is a contract of
:mod:`shoal.protocol.dispatch`; a pull reply that does not fit ends the
session like any other RPC failure.

**Cancellation.** Every heartbeat and report lists the units this worker holds
(running, then queued); the reply's ``cancel`` names those whose job has ended
(``shoal cancel``, a failed job, or a unit already recorded from a duplicate
run). A queued one is dropped; a running one is killed, its whole process group
(and its cgroup) at once, and reported with the task it was in marked
:data:`~shoal.protocol.dispatch.KILLED`, so the dispatcher records how far it got.
A unit that fails holds back the other units of its job on this worker until
the report of the failure is answered: the answer says whether the job failed,
and then they are dropped instead of started.

With ``telemetry_metrics`` set, a loop reads the node's anomaly verdict from
the telemetry daemon's /metrics every ``heartbeat_interval``
(:mod:`.telemetry`); every heartbeat carries it, and a change is sent at once
(the heartbeat loop wakes up), so the dispatcher can stop dispatching to an
anomalous node (its ``exclude_anomalous``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import trio

from shoal.core.dispatch.persist import pack_states, restore, unpack_states
from shoal.core.dispatch.policy import ServerState, TaskInfo, make_queue_policy
from shoal.daemons.runtime.config import ConfigError, read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcConnectionError, RpcError, connect_tcp
from shoal.daemons.runtime.state import StateSaver
from shoal.daemons.worker.config import WorkerConfig, WorkerSection
from shoal.daemons.worker.isolation import (
    CgroupTree,
    Isolation,
    IsolationError,
    Reaper,
    TaskUser,
    can_switch_users,
    check_reachable,
    own_v1_cgroups,
    own_v2_cgroup,
    resolve_user,
)
from shoal.daemons.worker.metrics import WorkerMetrics
from shoal.daemons.worker.outputs import OutputServer
from shoal.daemons.worker.runner import RunLimits, SwarmHook, run_task
from shoal.daemons.worker.telemetry import feed_team_rewards, read_verdict
from shoal.protocol.contract import BadParams
from shoal.protocol.dispatch import (
    KILLED,
    MAX_HELD,
    Heartbeat,
    HeartbeatReply,
    Lease,
    Pull,
    PullReply,
    Register,
    Report,
    ReportReply,
    TaskResult,
    UnitKey,
)

log = logging.getLogger("shoal.worker")

POLICY_FILE = "queue-policy.msgpack"
OUTPUTS_FILE = "outputs.json"  # what this worker publishes, secrets included (outputs.py)
TOKEN_KEY = "worker.token_file"
PULL_WAIT = 5.0  # seconds one long poll waits for work
RTT_PINGS = 3
MAX_REPORT = 512  # units per report call
REPORT_BYTES = 512 * 1024  # logs per report call, well inside the 1 MiB RPC frame
UNIT_LOG_BYTES = 384 * 1024  # logs kept per unit (a fused chain of chatty tasks is trimmed to this)


def _entry_size(entry: list[Any]) -> int:
    return 256 + sum(len(r[5]) + len(r[6]) + 100 * len(r[7]) for r in entry[1])


def _trim_logs(results: list[TaskResult], budget: int) -> None:
    """Cut each task's stdout/stderr so that one unit's logs fit ``budget`` bytes."""
    total = sum(len(r.stdout) + len(r.stderr) for r in results)
    if total <= budget:
        return
    share = budget // (2 * len(results))
    for r in results:
        r.stdout, r.stderr = r.stdout[:share], r.stderr[:share]


def _failed(results: list[TaskResult]) -> bool:
    """The unit failed on its own (not killed by us): its job may have failed with it."""
    return bool(results) and not results[-1].ok and results[-1].error != KILLED


def mem_total() -> int:
    """Physical memory in bytes (sysconf: works without /proc, which the unit hides)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 30


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class _Restart(Exception):
    """End this session and register again."""


class WorkerApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: WorkerConfig = ctx.config
        w = cfg.worker
        self.ctx = ctx
        self.section = w
        self.id = w.id or socket.gethostname()
        self.slots = w.slots or os.cpu_count() or 1
        self.prefetch = w.prefetch or self.slots
        self.token = read_token(w.token_file, TOKEN_KEY)
        self.limits = RunLimits(w.work_dir or ctx.state_dir / "work", w.max_log_bytes, w.max_input_bytes)
        self.limits.work_dir.mkdir(parents=True, exist_ok=True)
        self.isolation = make_isolation(w, self.limits.work_dir, str(ctx.config_path or "worker"))
        self.swarm = SwarmHook(w.peer_socket)
        self.outputs = OutputServer(self.limits.work_dir, retention=w.output_retention, public_url=w.outputs_url,
                                    tracker=w.publish_tracker, swarm=self.swarm,
                                    state_file=ctx.state_dir / OUTPUTS_FILE, daemon_metrics=ctx.metrics)
        self.policy = make_queue_policy(w.queue_policy)
        self.policy_file = ctx.state_dir / POLICY_FILE
        self._load_policy()
        self.saver = StateSaver("queue_policy", self.policy_file, self._policy_snapshot,
                                w.policy_save_interval, metrics=ctx.metrics, log=log)
        self.capacity = {
            "cpus": w.cpus or float(self.slots), "memory": w.memory or mem_total(),
            "cpu_speed": w.cpu_speed, "bandwidth": w.bandwidth, "rtt": 0.0,
        }
        self.queue: list[tuple[Lease, TaskInfo]] = []
        self.running: dict[str, TaskInfo] = {}
        self.scopes: dict[str, trio.CancelScope] = {}  # running unit -> its scope (cancel kills it)
        self.held: dict[int, int] = {}  # job -> its failed units not yet reported (see "Cancellation")
        # jobs whose failure was answered, until a reply covered their queued units: job -> the
        # answer's number (self.answers), so that only a reply to a call sent after it counts
        self.suspect: dict[int, int] = {}
        self.answers = 0
        self.unreported: list[list[Any]] = []
        self.changed = trio.Event()  # queue, slots or unreported changed
        self.team_reward = self.policy.name == "marl"  # ask the dispatcher for the others' results
        # the node's telemetry verdict (None: not reading telemetry)
        self.verdict: str | None = "unknown" if w.telemetry_metrics else None
        self.beat_now = trio.Event()
        self.metrics = WorkerMetrics(ctx.registry, lambda: (
            len(self.running), self.slots, len(self.queue), len(self.unreported)))
        self.metrics.set_verdict(self.verdict)
        self.outputs.metrics = self.metrics

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cg = self.isolation.cgroups
        dirs = [] if cg is None else [d for d in (cg.base, cg.cpu_base) if d is not None]
        reaper = self.isolation.reaper = await Reaper.start(dirs)
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(self.outputs.serve, self.section.outputs_listen)
                ctx.announce(outputs=addr)
                nursery.start_soon(self._slots)
                nursery.start_soon(self._sessions)
                nursery.start_soon(self.saver.run)
                if self.section.telemetry_metrics:
                    nursery.start_soon(self._telemetry_loop)
                log.info("worker %s: %d slots, queue policy %s, dispatcher %s", self.id, self.slots,
                         self.policy.name, self.section.dispatcher)
                task_status.started()
        finally:
            self.saver.save_now()  # the saver logs and counts a failure
            await reaper.stop()

    def reload(self, new: WorkerConfig) -> None:
        log.warning("worker settings take effect at the next restart")

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- the session with the dispatcher ------------------------------------------------

    async def _sessions(self) -> None:
        while True:
            try:
                async with await connect_tcp(self.section.dispatcher, token=self.token) as rpc:
                    await self._session(rpc)
            except (OSError, RpcError, _Restart) as exc:
                self.metrics.dispatcher_errors.inc()
                log.info("dispatcher session ended: %s", exc)
            await trio.sleep(self.section.reconnect_interval)

    async def _session(self, rpc) -> None:
        rtts = []
        for _ in range(RTT_PINGS):
            start = time.perf_counter()
            await rpc.call("ping")
            rtts.append(time.perf_counter() - start)
        self.capacity["rtt"] = min(rtts)
        await rpc.call("register", Register(worker=self.id, verdict=self.verdict, **self.capacity).encode())
        self.queue.clear()  # the dispatcher requeued whatever we had pulled
        self._poke()
        log.info("registered with %s (rtt %.2f ms)", self.section.dispatcher, self.capacity["rtt"] * 1000)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pull_loop, rpc)
                nursery.start_soon(self._report_loop, rpc)
                nursery.start_soon(self._heartbeat_loop, rpc)
        except BaseExceptionGroup as group:
            # One loop's RPC failed (the others were cancelled): end the session with it.
            lost, rest = group.split((OSError, RpcError))
            if lost is None or rest is not None:
                raise
            first = _leaves(lost)[0]
            if isinstance(first, RpcError) and first.code == "unknown_worker":
                raise _Restart("the dispatcher does not know us; registering again") from None
            raise first from None

    async def _pull_loop(self, rpc) -> None:
        window = self.slots + self.prefetch
        batch = max(1, window // 4)  # pull in chunks: one round trip per several units
        while True:
            want = window - len(self.queue) - len(self.running)
            if want < batch and (self.queue or want <= 0):
                await self.changed.wait()
                continue
            raw = await rpc.call("pull", Pull(worker=self.id, max=want, wait=PULL_WAIT,
                                              rewards=self.team_reward).encode(), timeout=PULL_WAIT + 15)
            try:
                reply = PullReply.decode(raw)
            except BadParams as exc:
                raise RpcError("bad_reply", f"pull: {exc}") from None
            self._team_rewards(reply.rewards)
            for lease in reply.units:
                f, key = lease.facts(), lease.unit_key
                self.queue.append((lease, TaskInfo(lease.key, str(key.job), f.work, f.data_size, f.mem, f.cpus,
                                                   f.deadline, f.submitted, f.depth)))
            if reply.units:
                self._poke()

    async def _report_loop(self, rpc) -> None:
        while True:
            if not self.unreported:
                await self.changed.wait()
                continue
            batch: list[list[Any]] = []
            size = 0
            for entry in self.unreported[:MAX_REPORT]:  # a report must fit one RPC frame
                size += _entry_size(entry)
                if batch and size > REPORT_BYTES:
                    break
                batch.append(entry)
            sent = self._holding()
            reply = await rpc.call("report", Report(worker=self.id, results=batch, units=sent).encode())
            del self.unreported[:len(batch)]
            for key, rows in batch:  # answered: the job's fate is known to the dispatcher
                if _failed([TaskResult(r[0], r[1], error=r[4]) for r in rows]):
                    self._unhold(UnitKey.parse(key).job)
            try:
                # reports go one at a time, after every answer so far: this reply knows them all
                self._cancel(ReportReply.decode(reply).cancel or [], sent, self.answers)
            except BadParams as exc:
                raise RpcError("bad_reply", f"report: {exc}") from None
            self._poke()

    async def _heartbeat_loop(self, rpc) -> None:
        while True:
            changed = self.beat_now
            sent, seen = self._holding(), self.answers
            reply = await rpc.call("heartbeat", Heartbeat(worker=self.id, running=len(self.running),
                                                          verdict=self.verdict, rewards=self.team_reward,
                                                          units=sent, jobs=self.outputs.jobs()[:MAX_HELD]).encode())
            try:
                hb = HeartbeatReply.decode(reply)
            except BadParams as exc:
                raise RpcError("bad_reply", f"heartbeat: {exc}") from None
            self._team_rewards(hb.rewards)
            self._cancel(hb.cancel or [], sent, seen)
            self.outputs.ended(hb.ended or [], time.time())
            await self.outputs.sweep(time.time())
            with trio.move_on_after(self.section.heartbeat_interval):
                await changed.wait()  # a new verdict goes out at once

    def _holding(self) -> list[str]:
        """The units this worker holds: running, then queued ones of held jobs, then the rest
        (at most MAX_HELD: the rest go next time)."""
        waiting = {str(j) for j in self.held.keys() | self.suspect.keys()}
        first = [lease.key for lease, i in self.queue if i.job in waiting]
        rest = [lease.key for lease, i in self.queue if i.job not in waiting]
        return (list(self.running) + first + rest)[:MAX_HELD]

    def _cancel(self, keys: list[str], sent: list[str], seen: int) -> None:
        """A reply to a heartbeat or report that listed ``sent``: the dispatcher ended the jobs of
        ``keys``: drop the queued ones, kill the running ones. A held job whose queued units were
        all in ``sent`` may start them again; one with units pulled since is asked about at once."""
        if keys:
            self._drop_and_kill(set(keys))
        self._confirm(set(sent) - set(keys), seen)

    def _drop_and_kill(self, gone: set[str]) -> None:
        kept = [(lease, i) for lease, i in self.queue if lease.key not in gone]
        if len(kept) != len(self.queue):
            self.metrics.dropped.inc(len(self.queue) - len(kept))
            log.info("dropped %d queued units: their job ended", len(self.queue) - len(kept))
            self.queue[:] = kept
        for key in gone:
            scope = self.scopes.get(key)
            if scope is not None and not scope.cancel_called:
                log.info("%s: killing it, its job ended", key)
                self.metrics.killed.inc()
                scope.cancel()
        self._poke()

    def _unhold(self, job: int) -> None:
        n = self.held.get(job, 0) - 1
        if n > 0:
            self.held[job] = n
        else:
            self.held.pop(job, None)
            self.answers += 1
            self.suspect[job] = self.answers  # until a reply covers its queued units (_confirm)

    def _confirm(self, alive: set[str], seen: int) -> None:
        """Jobs in ``suspect`` whose every queued unit the dispatcher has just said is alive start again.

        ``seen``: the answers (``self.answers``) given before the call was sent. A heartbeat sent
        before a failure's answer may have been replied to before the dispatcher knew of the
        failure: its "alive" is stale, and it started a unit of a failed job (in a CI run)."""
        if not self.suspect:
            return
        for job, since in list(self.suspect.items()):
            if job in self.held or since > seen:
                continue
            if all(lease.key in alive for lease, i in self.queue if i.job == str(job)):
                del self.suspect[job]
            else:  # units pulled since the last list: ask now
                self._wake_heartbeat()
        self._poke()

    def _wake_heartbeat(self) -> None:
        self.beat_now.set()
        self.beat_now = trio.Event()

    def _team_rewards(self, rows: Any) -> None:
        if self.team_reward and rows:
            self.metrics.team_rewards.inc(feed_team_rewards(self.policy, rows, time.time()))

    # -- the node's telemetry verdict --------------------------------------------------

    async def _telemetry_loop(self) -> None:
        url = self.section.telemetry_metrics
        interval = self.section.heartbeat_interval
        while True:
            try:
                verdict = await read_verdict(url, timeout=max(interval, 1.0))
                failure = None
            except (OSError, ValueError) as exc:
                verdict, failure = "unknown", str(exc)
                self.metrics.telemetry_errors.inc()
            if verdict != self.verdict:
                if failure is not None:
                    log.warning("cannot read the node's telemetry verdict from %s: %s", url, failure)
                log.log(logging.WARNING if verdict == "anomalous" else logging.INFO,
                        "node telemetry verdict: %s (was %s)", verdict, self.verdict)
                self.verdict = verdict
                self.metrics.set_verdict(verdict)
                self._wake_heartbeat()
            await trio.sleep(interval)

    # -- running -------------------------------------------------------------------

    def server_state(self) -> ServerState:
        return ServerState(
            id=self.id, cpus=self.capacity["cpus"], cpu_speed=self.capacity["cpu_speed"],
            mem_total=self.capacity["memory"], mem_free=self.capacity["memory"], bandwidth=self.capacity["bandwidth"],
            rtt=self.capacity["rtt"], queue_len=len(self.queue), running=len(self.running),
            queued_work=sum(i.work for _p, i in self.queue) + sum(i.work for i in self.running.values()),
        )

    async def _slots(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                if not self.queue or len(self.running) >= self.slots:
                    await self.changed.wait()
                    continue
                if self.held or self.suspect:  # units of a job whose failure is not answered yet wait
                    waiting = self.held.keys() | self.suspect.keys()
                    free = [n for n, (_lease, i) in enumerate(self.queue) if int(i.job) not in waiting]
                    if not free:
                        await self.changed.wait()
                        continue
                    idx = free[self.policy.pick([self.queue[n][1] for n in free], self.server_state(), time.time())]
                else:
                    idx = self.policy.pick([i for _p, i in self.queue], self.server_state(), time.time())
                lease, info = self.queue.pop(idx)
                self.running[lease.key] = info
                nursery.start_soon(self._run_unit, lease, info)
                self._poke()

    async def _run_unit(self, lease: Lease, info: TaskInfo) -> None:
        key = lease.key
        facts = lease.facts()
        results: list[TaskResult] = []
        scope = self.scopes[key] = trio.CancelScope()
        began = [time.time()]  # when the task in progress started
        try:
            with scope:
                await self._run_tasks(lease, facts, results, began)
            if scope.cancelled_caught:  # _cancel: the task in progress was killed, with its process group
                task = lease.tasks[len(results)] if len(results) < len(lease.tasks) else None
                if task is not None and not (results and not results[-1].ok):
                    results.append(TaskResult(task.name, None, began[0], time.time(), error=KILLED))
        finally:
            del self.scopes[key]
            del self.running[key]
            if _failed(results):
                job = lease.unit_key.job
                self.held[job] = self.held.get(job, 0) + 1  # until its report is answered
            now = time.time()
            self.policy.observe(info, self.id, now - info.submitted, now)
            _trim_logs(results, UNIT_LOG_BYTES)
            self.unreported.append([key, [r.to_row() for r in results]])
            self._poke()

    async def _run_tasks(self, lease: Lease, facts: Any, results: list[TaskResult], began: list[float]) -> None:
        key = lease.key
        for task in lease.tasks:
            self.metrics.started.inc()
            began[0] = time.time()
            # A fused chain's limits are its largest task's (the unit's facts).
            r = await run_task(task, key, lease.attempt, self.limits, self.swarm, self.metrics,
                               isolation=self.isolation, cpus=facts.cpus, memory=int(facts.mem),
                               publisher=self.outputs)
            self.metrics.duration.observe(r.finished - r.started)
            outcome = "ok" if r.ok else "timeout" if r.error.startswith("timeout") else (
                "failed" if r.exit_code is not None else "error")
            self.metrics.finished_by[outcome].inc()
            if not r.ok:
                log.info("%s: task %s %s (exit %s) %s", key, r.task, outcome, r.exit_code, r.error)
            results.append(r)
            if not r.ok:
                break

    # -- learned scheduler state ------------------------------------------------------

    def _load_policy(self) -> None:
        try:
            if restore(self.policy, unpack_states(self.policy_file.read_bytes())):
                log.info("restored the %s scheduler from %s", self.policy.name, self.policy_file)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("cannot restore %s (%s); the scheduler starts fresh", self.policy_file, exc)

    def _policy_snapshot(self) -> bytes:
        return pack_states({self.policy.name: self.policy.state_dict()})


def make_isolation(w: WorkerSection, work_dir: Path, source: str) -> Isolation:
    """The worker's task isolation (see :mod:`.isolation`); each fallback is said once, here."""
    try:
        user: TaskUser | None = resolve_user(w.task_user, w.task_group)
        assert user is not None
        if user.uid == os.geteuid():
            log.warning("task_user %s is the worker's own user: tasks can signal the worker and every daemon "
                        "of that user", user.name)
            user = None
        elif not can_switch_users():
            if w.when_unprivileged == "refuse":
                raise ConfigError(source, "worker.task_user",
                                  f"this worker (uid {os.geteuid()}) may not run tasks as {user.name}: it is not root "
                                  "and lacks CAP_SETUID/CAP_SETGID (or set when_unprivileged = \"self\")")
            log.warning("cannot switch to the task user %s (not root, no CAP_SETUID/CAP_SETGID): tasks run as the "
                        "worker's own user (when_unprivileged = \"self\")", user.name)
            user = None
        if user is not None:
            os.chmod(work_dir, 0o711)  # task users enter their own task directory, list nothing
            check_reachable(work_dir, user)
        cgroups = None
        if w.cgroup == "auto":
            base = own_v2_cgroup()
            v1 = own_v1_cgroups() if base is None else None
            cgroups = CgroupTree(base) if base is not None else CgroupTree(*v1) if v1 is not None else None
            why = "no writable cgroup of its own (not under systemd with Delegate=yes)"
        elif w.cgroup != "off":
            cgroups = CgroupTree(Path(w.cgroup), w.cgroup_cpu)
        else:
            why = "cgroup = \"off\""
        if cgroups is None:
            log.warning("tasks run in process groups (%s): their cpus and memory are not enforced", why)
        else:
            cgroups.prepare()
            log.info("tasks run in cgroups under %s (cgroup %s)%s", cgroups.base, "v2" if cgroups.v2 else "v1",
                     f" and {cgroups.cpu_base}" if cgroups.cpu_base else "")
        if user is not None:
            log.info("tasks run as %s (uid %d, gid %d)", user.name, user.uid, user.gid)
    except IsolationError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ConfigError(source, f"worker.{key}", reason) from None
    except OSError as exc:
        raise ConfigError(source, "worker.cgroup", f"{exc.filename}: {exc.strerror}") from None
    return Isolation(user, cgroups)


def make_app(ctx: DaemonContext) -> WorkerApp:
    return WorkerApp(ctx)


def check_config(cfg: WorkerConfig) -> None:
    read_token(cfg.worker.token_file, TOKEN_KEY)
    try:
        resolve_user(cfg.worker.task_user, cfg.worker.task_group)
    except IsolationError as exc:
        key, _, reason = str(exc).partition(": ")
        raise ConfigError("worker", f"worker.{key}", reason) from None


__all__ = ["WorkerApp", "make_app", "check_config", "RpcConnectionError"]
