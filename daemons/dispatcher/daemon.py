"""The dispatcher daemon: the runtime's RPC around the dispatch state machine and the store.

Theory of operation
-------------------
One trio task per RPC request (the runtime's :class:`RpcServer`), all sharing
one :class:`~shoal.core.dispatch.machine.Core` whose store writes are synchronous SQLite calls, so
every request sees a consistent state without locks. Methods:

==============  ===========================================================
``submit``      ``{spec: bytes, policy?}`` → ``{job, tasks, units}`` after the commit
``jobs``        ``{limit?, before?, state?}`` → a page of jobs, newest first, with task
                counts (``before``: the last id of the previous page)
``job``         ``{id, logs?, offset?, states?, summary?}`` → one job, counts by state,
                and a page of its tasks (only those in ``states``; with logs: their
                output) that fits one RPC frame; ``summary``: the first failed tasks only
``register``    a worker's capacity ``{worker, cpus, memory, cpu_speed, bandwidth, rtt,
                verdict?}``
``ping``        nothing; workers time it to measure their RTT
``heartbeat``   ``{worker, running, verdict?, rewards?, units?, jobs?}``: keeps the worker's
                leases alive → ``{rewards, cancel, ended}`` (``ended``: those of ``jobs``,
                whose outputs the worker keeps, that have ended)
``pull``        ``{worker, max, wait, rewards?}``: leases the worker's queue, waiting up
                to ``wait`` seconds (long poll) for something to arrive
                → ``{units, rewards}``
``report``      ``{worker, results, units?}``: a batch of unit outcomes (compact rows)
                → ``{applied, duplicates, cancel}``
``cancel``      ``{id}``: end a running job (an operator method): its open units are
                cancelled, and those running are killed on their workers
``workers``     the live workers
``limits``      the bounds on one submission (``max_spec_bytes``, ``max_tasks_per_job``)
``exclude``     ``{workers: [...]}``: the anomaly hook (telemetry's flagged nodes)
==============  ===========================================================

``verdict`` is the worker's node telemetry verdict (``normal``, ``anomalous``,
``unknown``; omitted when the worker does not read telemetry): with
``exclude_anomalous`` on, a worker reported anomalous gets no new units until it
reports otherwise (:meth:`Core.set_verdict`).

``units`` in a heartbeat or a report lists the units the worker holds (running,
then queued); ``cancel`` in the reply names those whose job has ended (failed,
cancelled, or done by a duplicate run): the worker kills the running ones (their
whole process group) and drops the queued ones, and reports what it killed so
the records say how far each got (:meth:`Core.to_cancel`).

``rewards: true`` asks for the
team reward of seed 004's multi-agent scheduler: ``[[unit key, worker, response
time], ...]`` for units recorded done on *other* workers since this worker last asked
(:meth:`Core.team_rewards`, bounded); otherwise ``rewards`` is empty.

Who may submit
--------------
``submit``, ``cancel`` and ``exclude`` (the *operator* methods) need a credential, even on
loopback:

* the **submit socket** (``submit_socket``, a unix socket every local user may
  connect to): the kernel tells who connected (``SO_PEERCRED``: the peer's
  effective uid and gid at ``connect``), and only a user in ``submit_users``,
  or whose primary or supplementary group (from the user database) is in
  ``submit_groups``, may call them; the job records the user's name (or
  ``uid N``). The socket serves the operator and the read methods (``jobs``,
  ``job``, ``workers``, ``ping``), not the worker methods;
* the **TCP RPC with its HMAC token** (``token_file``): every connection proved
  the token, so the operator methods are allowed; the job records ``token``.
  Without a token (loopback only) the TCP RPC serves the worker methods and the
  read methods, and refuses the operator methods.

A refusal is the RPC error ``unauthorized`` with a one-line reason, logged and
counted in ``shoal_dispatcher_submit_refused_total{reason}`` (``no_credential``:
TCP without a token; ``not_allowed``: a socket peer not on the allow-list).
Workers are not authenticated on a token-less loopback RPC: any local user can
play a worker (pull units, report results) there; configure a token_file when
local users are not trusted.

Every method's parameters are a contract of :mod:`shoal.protocol.dispatch`.
A bad spec is answered ``bad_spec`` with the one-line reason and counted by
reason; a malformed request ``bad_params``. Off loopback every connection is
authenticated with the HMAC token (the RpcServer refuses to start without one).

Background: a ticker declares silent workers dead every ``lease_seconds / 4``,
and prunes jobs finished more than ``job_retention`` ago (at most
``store.PRUNE_ROWS`` rows a tick, so a huge job goes over several ticks);
learned policies' weights (``state_dict``) are saved to
``policies.msgpack`` in the state directory every ``policy_save_interval`` and
at stop (the runtime's ``StateSaver``; :mod:`shoal.core.dispatch.persist`), and
loaded when the policy is first used after a restart.
"""

from __future__ import annotations

import contextvars
import dataclasses
import grp
import logging
import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import Any

import trio

from shoal.core.dispatch.jobs import Limits, SpecError, parse_spec
from shoal.core.dispatch.machine import Core, CoreError
from shoal.core.dispatch.persist import pack_states, restore, unpack_states
from shoal.core.dispatch.policy import DISPATCH_POLICIES, DispatchPolicy, make_dispatch_policy
from shoal.daemons.dispatcher.config import DispatcherConfig
from shoal.daemons.dispatcher.metrics import DispatcherMetrics
from shoal.daemons.dispatcher.store import Store
from shoal.daemons.runtime.config import read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcError, RpcServer, handlers_of, rpc_method
from shoal.daemons.runtime.state import StateSaver
from shoal.protocol.contract import BadParams
from shoal.protocol.dispatch import (
    MAX_WAIT,
    Cancel,
    Exclude,
    Heartbeat,
    JobQuery,
    JobsQuery,
    Pull,
    Register,
    Report,
    Submit,
    decode_results,
)

log = logging.getLogger("shoal.dispatcher")

SUBMIT_SOCKET = "submit.sock"
#: the operator methods: they need a credential (see "Who may submit")
OPERATOR_METHODS = ("submit", "cancel", "exclude")


@dataclasses.dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a submit-socket connection (from SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int

    @property
    def name(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"

    def gids(self) -> set[int]:
        try:
            return set(os.getgrouplist(pwd.getpwuid(self.uid).pw_name, self.gid))
        except KeyError:
            return {self.gid}


#: the submit-socket peer of the connection a request came on; None on the TCP RPC.
#: Set in each connection's task: its request tasks inherit a copy (trio copies the
#: spawning task's context).
_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar("shoal_dispatcher_peer", default=None)


def peer_credentials(sock: Any) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return Peer(pid, uid, gid)


def _ids(names: tuple[str, ...], lookup: Any, what: str) -> set[int]:
    out = set()
    for n in names:
        if n.isdigit():
            out.add(int(n))
            continue
        try:
            out.add(lookup(n))
        except KeyError:
            log.warning("%s %r does not exist on this host: it allows no one", what, n)
    return out


STORE_FILE = "jobs.db"
SUMMARY_FAILURES = 10  # failed tasks a job summary shows
POLICY_FILE = "policies.msgpack"
TOKEN_KEY = "dispatcher.token_file"


class DispatcherApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: DispatcherConfig = ctx.config
        self.ctx = ctx
        self.section = cfg.dispatcher
        self.token = read_token(self.section.token_file, TOKEN_KEY)
        self.metrics = DispatcherMetrics(ctx.registry)
        self.store = Store(ctx.state_dir / STORE_FILE, durability=self.section.durability)
        self.policy_file = ctx.state_dir / POLICY_FILE
        self.saved_policies = self._load_policies()
        self.policies: dict[str, DispatchPolicy] = {}
        self.saver = StateSaver("policies", self.policy_file, self._policy_snapshot,
                                self.section.policy_save_interval, metrics=ctx.metrics, log=log)
        self.core = Core(
            self.store, self.policy_for, default_policy=self.section.policy,
            lease_seconds=self.section.lease_seconds, max_pending_units=self.section.max_pending_units,
            exclude_anomalous=self.section.exclude_anomalous, metrics=self.metrics,
        )
        self.core.on_assign = self._wake
        self.core.on_job_done = self._job_done
        self.wakeups: dict[str, trio.Event] = {}
        self.metrics.watch(ctx.registry, self.core)
        self.allowed_uids = _ids(self.section.submit_users, lambda n: pwd.getpwnam(n).pw_uid, "submit_users: user")
        self.allowed_gids = _ids(self.section.submit_groups, lambda n: grp.getgrnam(n).gr_gid, "submit_groups: group")
        self.submit_socket = self.section.submit_socket or _default_socket(ctx.state_dir)

    # -- who may submit -------------------------------------------------------------

    def _authorize(self, method: str) -> str:
        """Who is calling an operator method (recorded with the job), or refuse: one line, counted."""
        peer = _peer.get()
        if peer is None:
            if self.token is not None:
                return "token"
            self.metrics.submit_refused.labels("no_credential").inc()
            log.info("refused %s on the TCP RPC: no token configured, so no credential", method)
            raise RpcError("unauthorized", f"{method} needs a credential: use the submit socket "
                                           f"({self.submit_socket}) or a token_file")
        if peer.uid in self.allowed_uids or peer.gids() & self.allowed_gids:
            return peer.name
        self.metrics.submit_refused.labels("not_allowed").inc()
        log.info("refused %s from %s (pid %d) on the submit socket: not in submit_users or submit_groups",
                 method, peer.name, peer.pid)
        raise RpcError("unauthorized", f"{method}: user {peer.name} is not allowed to submit "
                                       "(submit_users, submit_groups)")

    @staticmethod
    def _tcp_only(method: str) -> None:
        if _peer.get() is not None:
            raise RpcError("no_such_method", f"{method}: workers use the TCP RPC, not the submit socket")

    async def serve_submit_socket(self, server: RpcServer, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The submit socket: anyone may connect (mode 0666); SO_PEERCRED says who did."""

        def who(stream: trio.SocketStream) -> None:
            _peer.set(peer_credentials(stream.socket))

        await server.serve_unix(self.submit_socket, mode=0o666, on_connect=who, task_status=task_status)

    # -- policies ----------------------------------------------------------------

    def policy_for(self, name: str) -> DispatchPolicy:
        pol = self.policies.get(name)
        if pol is None:
            pol = make_dispatch_policy(name, seed=self.section.policy_seed)  # ValueError if unknown
            try:
                if restore(pol, self.saved_policies):
                    log.info("restored the %s policy's state from %s", name, self.policy_file)
            except ValueError as exc:
                log.error("cannot restore the %s policy from %s: %s; starting fresh", name, self.policy_file, exc)
            self.policies[name] = pol
        return pol

    def _load_policies(self) -> dict[str, Any]:
        try:
            return unpack_states(self.policy_file.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable (%s); learned policies start fresh", self.policy_file, exc)
            return {}

    def _policy_snapshot(self) -> bytes:
        states = dict(self.saved_policies)
        states.update({name: pol.state_dict() for name, pol in self.policies.items()})
        return pack_states(states)

    def save_policies(self) -> bool:
        """Save the learned policies now; True if they are on disk."""
        return self.saver.save_now()

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        restored = self.core.restore(time.time())
        if restored:
            log.info("restored %d unfinished jobs (%d units) from %s", restored, self.core.unfinished_units,
                     self.store.path)
        server = RpcServer(handlers_of(self), metrics=ctx.metrics, token=self.token, name="shoal-dispatcher",
                           max_in_flight=self.section.max_rpc_in_flight, request_timeout=MAX_WAIT + 20)
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve_tcp, self.section.rpc_listen)
                sock = await nursery.start(self.serve_submit_socket, server)  # one server: one in-flight bound
                log.info("submissions on %s (users %s, groups %s)%s", sock, ", ".join(self.section.submit_users) or "-",
                         ", ".join(self.section.submit_groups) or "-",
                         " and on the RPC with its token" if self.token is not None else "")
                nursery.start_soon(self._ticker)
                nursery.start_soon(self.saver.run)
                ctx.announce(rpc=addr)
                log.info("dispatching on %s (policy %s)", addr, self.section.policy)
                task_status.started()
        finally:
            self.save_policies()  # the saver logs and counts a failure
            self.store.close()

    def reload(self, new: DispatcherConfig) -> None:
        if new.dispatcher.rpc_listen != self.section.rpc_listen or new.dispatcher.token_file != self.section.token_file:
            log.warning("rpc_listen and token_file changes take effect at the next restart")
        self.core.default_policy = new.dispatcher.policy
        self.core.lease_seconds = new.dispatcher.lease_seconds
        self.core.max_pending_units = new.dispatcher.max_pending_units
        if new.dispatcher.exclude_anomalous != self.core.exclude_anomalous:
            log.info("exclude_anomalous is now %s", new.dispatcher.exclude_anomalous)
            self.core.set_exclude_anomalous(new.dispatcher.exclude_anomalous, time.time())
        if new.dispatcher.submit_socket != self.section.submit_socket:
            log.warning("submit_socket changes take effect at the next restart")
        self.allowed_uids = _ids(new.dispatcher.submit_users, lambda n: pwd.getpwnam(n).pw_uid, "submit_users: user")
        self.allowed_gids = _ids(new.dispatcher.submit_groups, lambda n: grp.getgrnam(n).gr_gid,
                                 "submit_groups: group")
        self.section = dataclasses.replace(new.dispatcher, rpc_listen=self.section.rpc_listen,
                                           token_file=self.section.token_file,
                                           submit_socket=self.section.submit_socket)

    async def _ticker(self) -> None:
        period = self.core.lease_seconds / 4
        while True:
            await trio.sleep(period)
            excused = self.core.stalled_seconds
            dead = self.core.tick(time.time(), period)
            if self.core.stalled_seconds > excused:
                stall = self.core.stalled_seconds - excused
                self.metrics.stalled_seconds.inc(stall)
                log.warning("the dispatcher could not listen for %.1f s; workers' silence in that time is "
                            "not held against them", stall)
            for wid in dead:
                log.warning("worker %s went silent; its units are back in the queue", wid)
                self._wake(wid)
            self.prune(time.time())

    def prune(self, now: float) -> int:
        """Delete jobs finished more than job_retention ago (a bounded batch per tick)."""
        if self.section.job_retention <= 0:
            return 0
        rows = self.store.prune(now - self.section.job_retention)
        if rows:
            self.metrics.pruned_rows.inc(rows)
            log.info("pruned %d rows of jobs finished before the last %.0f s", rows, self.section.job_retention)
        return rows

    def _wake(self, worker_id: str) -> None:
        ev = self.wakeups.pop(worker_id, None)
        if ev is not None:
            ev.set()

    def _job_done(self, job_id: int, state: str) -> None:
        self.metrics.jobs_finished.labels(state).inc()
        log.info("job %d %s", job_id, state)

    # -- RPC -----------------------------------------------------------------------

    @rpc_method("submit", Submit)
    async def rpc_submit(self, params: Submit) -> dict[str, Any]:
        who = self._authorize("submit")
        policy = params.policy
        if policy is not None and policy not in DISPATCH_POLICIES:
            raise BadParams(f"unknown policy {policy!r}; known: {', '.join(DISPATCH_POLICIES)}")
        limits = Limits(self.section.max_spec_bytes, self.section.max_tasks_per_job)
        try:
            # Off the event loop: a million-task spec takes seconds to read, and heartbeats,
            # pulls and reports keep being served meanwhile.
            job = await trio.to_thread.run_sync(parse_spec, params.spec, limits)
            if job.policy is not None and job.policy not in DISPATCH_POLICIES:
                raise SpecError("invalid",
                                f"policy: unknown policy {job.policy!r}; known: {', '.join(DISPATCH_POLICIES)}")
        except SpecError as exc:
            self.metrics.specs_rejected.labels(exc.reason).inc()
            log.info("refused a job spec (%s): %s", exc.reason, exc)
            raise RpcError("bad_spec", str(exc)) from None
        job_id = self._core_call(self.core.submit, job, time.time(), policy, who)
        log.info("job %d %r accepted from %s: %d tasks in %d units", job_id, job.name, who, len(job.tasks),
                 len(job.units))
        return {"job": job_id, "tasks": len(job.tasks), "units": len(job.units)}

    @rpc_method("jobs", JobsQuery)
    async def rpc_jobs(self, params: JobsQuery) -> list[dict[str, Any]]:
        return self.store.jobs(params.limit, params.before, params.state)

    @rpc_method("job", JobQuery)
    async def rpc_job(self, params: JobQuery) -> dict[str, Any]:
        """One page of a job's tasks: a response must fit one RPC frame (1 MiB)."""
        # ~200 bytes per task row (2000 rows: ~400 KiB), plus logs and outputs up to 512 KiB
        if params.summary:  # counts by state and the first failures
            view = self.store.job(params.id, offset=0, limit=SUMMARY_FAILURES, states=("failed",))
        else:
            view = self.store.job(params.id, logs=params.logs, offset=params.offset, limit=2000, budget=512 * 1024,
                                  states=params.states or ())
        if view is None:
            raise RpcError("not_found", f"no job {params.id}")
        view["progress"] = self.core.progress(params.id)
        return view

    @rpc_method("register", Register)
    async def rpc_register(self, params: Register) -> dict[str, Any]:
        self._tcp_only("register")
        wid, cap, verdict = params.worker, params.capacity(), params.verdict
        self._core_call(self.core.register, wid, cap, time.time(), verdict)
        log.info("worker %s registered: %g cpus, %.0f MiB, rtt %.2f ms%s", wid, cap["cpus"], cap["memory"] / 2**20,
                 cap["rtt"] * 1000, f", node {verdict}" if verdict else "")
        return {"lease_seconds": self.core.lease_seconds, "max_log_bytes": self.section.max_log_bytes}

    @rpc_method("ping")
    async def rpc_ping(self) -> bool:
        return True

    @rpc_method("limits")
    async def rpc_limits(self) -> dict[str, int]:
        """The bounds on one submission, for a client to say them before sending."""
        return {"max_spec_bytes": self.section.max_spec_bytes, "max_tasks_per_job": self.section.max_tasks_per_job}

    @rpc_method("heartbeat", Heartbeat)
    async def rpc_heartbeat(self, params: Heartbeat) -> dict[str, Any]:
        self._tcp_only("heartbeat")
        wid, verdict = params.worker, params.verdict
        before = self.core.workers.get(wid)
        was = before.verdict if before is not None else None
        self._core_call(self.core.heartbeat, wid, params.running, time.time(), verdict)
        if verdict is not None and verdict != was:
            excluded = not self.core.dispatchable(self.core.workers[wid])
            log.warning("worker %s: its node's telemetry says %s%s", wid, verdict,
                        " (excluded from dispatch)" if excluded else "")
        return {"rewards": self._rewards(wid, params.rewards), "cancel": self.core.to_cancel(params.units or []),
                "ended": [j for j in params.jobs or [] if j not in self.core.jobs]}

    def _rewards(self, wid: str, wanted: bool) -> list[list[Any]]:
        return self._core_call(self.core.team_rewards, wid) if wanted else []

    @rpc_method("pull", Pull)
    async def rpc_pull(self, params: Pull) -> dict[str, Any]:
        self._tcp_only("pull")
        wid = params.worker
        want = max(1, min(params.max, self.section.max_pull))
        if params.wait and not self.core.has_work(wid):
            ev = self.wakeups.setdefault(wid, trio.Event())
            with trio.move_on_after(params.wait):
                await ev.wait()
        units = self._core_call(self.core.pull, wid, want, time.time())
        return {"units": units, "rewards": self._rewards(wid, params.rewards)}

    @rpc_method("report", Report)
    async def rpc_report(self, params: Report) -> dict[str, int]:
        self._tcp_only("report")
        batch = decode_results(params.results, self.section.max_log_bytes)
        applied = self._core_call(self.core.report, params.worker, batch, time.time())
        return {"applied": applied, "duplicates": len(batch) - applied,
                "cancel": self.core.to_cancel(params.units or [])}

    @rpc_method("cancel", Cancel)
    async def rpc_cancel(self, params: Cancel) -> dict[str, int]:
        who = self._authorize("cancel")
        reply = self._core_call(self.core.cancel, params.id, time.time(), who)
        log.warning("job %d cancelled by %s: %d units cancelled, %d leased (killed where running)", params.id, who,
                    reply["cancelled"], reply["killing"])
        return reply

    @rpc_method("workers")
    async def rpc_workers(self) -> list[dict[str, Any]]:
        return self.core.workers_view()

    @rpc_method("exclude", Exclude)
    async def rpc_exclude(self, params: Exclude) -> dict[str, int]:
        who = self._authorize("exclude")
        ids = params.workers
        self.core.set_excluded(ids, time.time())
        log.warning("anomaly hook (%s): excluding %d workers: %s", who, len(ids), ", ".join(ids[:10]))
        return {"excluded": len(ids)}

    @staticmethod
    def _core_call(fn, *args):
        try:
            return fn(*args)
        except CoreError as exc:
            if exc.code == "bad_params":
                raise BadParams(exc.message) from None
            raise RpcError(exc.code, exc.message) from None


def _default_socket(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY/submit.sock under systemd (RuntimeDirectory=), else <state_dir>/submit.sock."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(runtime or state_dir) / SUBMIT_SOCKET


def make_app(ctx: DaemonContext) -> DispatcherApp:
    return DispatcherApp(ctx)


def check_config(cfg: DispatcherConfig) -> None:
    read_token(cfg.dispatcher.token_file, TOKEN_KEY)


__all__ = ["DispatcherApp", "make_app", "check_config"]
