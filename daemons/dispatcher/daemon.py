"""The dispatcher daemon: the runtime's RPC around :class:`~.core.Core` and the store.

Theory of operation
-------------------
One trio task per RPC request (the runtime's :class:`RpcServer`), all sharing
one :class:`~.core.Core` whose store writes are synchronous SQLite calls, so
every request sees a consistent state without locks. Methods:

==============  ===========================================================
``submit``      ``{spec: bytes, policy?}`` → ``{job, tasks, units}`` after the commit
``jobs``        ``{limit?}`` → the latest jobs with task counts
``job``         ``{id, logs?, offset?}`` → one job, counts by state, and a page of its
                tasks (with logs: their output) that fits one RPC frame
``register``    a worker's capacity ``{worker, cpus, memory, cpu_speed, bandwidth, rtt,
                verdict?}``
``ping``        nothing; workers time it to measure their RTT
``heartbeat``   ``{worker, running, verdict?, rewards?}``: keeps the worker's leases
                alive → ``{rewards}``
``pull``        ``{worker, max, wait, rewards?}``: leases the worker's queue, waiting up
                to ``wait`` seconds (long poll) for something to arrive
                → ``{units, rewards}``
``report``      ``{worker, results}``: a batch of unit outcomes (:mod:`.wire`)
``workers``     the live workers
``exclude``     ``{workers: [...]}``: the anomaly hook (telemetry's flagged nodes)
==============  ===========================================================

``verdict`` is the worker's node telemetry verdict (``normal``, ``anomalous``,
``unknown``; omitted when the worker does not read telemetry): with
``exclude_anomalous`` on, a worker reported anomalous gets no new units until it
reports otherwise (:meth:`Core.set_verdict`). ``rewards: true`` asks for the
team reward of seed 004's multi-agent scheduler: ``[[unit key, worker, response
time], ...]`` for units recorded done on *other* workers since this worker last asked
(:meth:`Core.team_rewards`, bounded); otherwise ``rewards`` is empty.

A bad spec is answered ``bad_spec`` with the one-line reason and counted by
reason; a malformed request ``bad_request``. Off loopback every connection is
authenticated with the HMAC token (the RpcServer refuses to start without one).

Background: a ticker declares silent workers dead every ``lease_seconds / 4``;
learned policies' weights (``state_dict``) are saved to
``policies.msgpack`` in the state directory every ``policy_save_interval`` and
at stop, and loaded when the policy is first used after a restart.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import msgpack
import trio

from shoal.core.dispatch.jobs import Limits, SpecError, parse_spec
from shoal.core.dispatch.policy import DISPATCH_POLICIES, DispatchPolicy, make_dispatch_policy
from shoal.daemons.dispatcher.config import DispatcherConfig
from shoal.daemons.dispatcher.core import VERDICTS, Core, CoreError
from shoal.daemons.dispatcher.metrics import DispatcherMetrics
from shoal.daemons.dispatcher.store import Store
from shoal.daemons.dispatcher.wire import decode_results, read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcError, RpcServer
from shoal.daemons.runtime.state import atomic_write

log = logging.getLogger("shoal.dispatcher")

STORE_FILE = "jobs.db"
POLICY_FILE = "policies.msgpack"
MAX_WAIT = 10.0  # longest long poll, well under the RPC request timeout
MAX_WORKER_ID = 128


class DispatcherApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: DispatcherConfig = ctx.config
        self.ctx = ctx
        self.section = cfg.dispatcher
        self.token = read_token(self.section.token_file)
        self.metrics = DispatcherMetrics(ctx.registry)
        self.store = Store(ctx.state_dir / STORE_FILE, durability=self.section.durability)
        self.policy_file = ctx.state_dir / POLICY_FILE
        self.saved_policies = self._load_policies()
        self.policies: dict[str, DispatchPolicy] = {}
        self.core = Core(
            self.store, self.policy_for, default_policy=self.section.policy,
            lease_seconds=self.section.lease_seconds, max_pending_units=self.section.max_pending_units,
            exclude_anomalous=self.section.exclude_anomalous, metrics=self.metrics,
        )
        self.core.on_assign = self._wake
        self.core.on_job_done = self._job_done
        self.wakeups: dict[str, trio.Event] = {}
        self.metrics.watch(ctx.registry, self.core)

    # -- policies ----------------------------------------------------------------

    def policy_for(self, name: str) -> DispatchPolicy:
        pol = self.policies.get(name)
        if pol is None:
            pol = make_dispatch_policy(name, seed=self.section.policy_seed)  # ValueError if unknown
            state = self.saved_policies.get(name)
            if state is not None:
                try:
                    pol.load_state_dict(state)
                    log.info("restored the %s policy's state from %s", name, self.policy_file)
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("cannot restore the %s policy from %s: %s; starting fresh", name, self.policy_file, exc)
            self.policies[name] = pol
        return pol

    def _load_policies(self) -> dict[str, Any]:
        try:
            data = msgpack.unpackb(self.policy_file.read_bytes(), raw=False)
        except FileNotFoundError:
            return {}
        except (ValueError, msgpack.UnpackException) as exc:
            log.error("%s is unreadable (%s); learned policies start fresh", self.policy_file, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save_policies(self) -> None:
        states = dict(self.saved_policies)
        states.update({name: pol.state_dict() for name, pol in self.policies.items()})
        atomic_write(self.policy_file, msgpack.packb(states, use_bin_type=True))

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        restored = self.core.restore(time.time())
        if restored:
            log.info("restored %d unfinished jobs (%d units) from %s", restored, self.core.unfinished_units,
                     self.store.path)
        server = RpcServer(self.handlers(), metrics=ctx.metrics, token=self.token, name="shoal-dispatcher",
                           max_in_flight=self.section.max_rpc_in_flight, request_timeout=MAX_WAIT + 20)
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve_tcp, self.section.rpc_listen)
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._saver)
                ctx.announce(rpc=addr)
                log.info("dispatching on %s (policy %s)", addr, self.section.policy)
                task_status.started()
        finally:
            try:
                self.save_policies()
            except OSError as exc:
                log.error("cannot save policy state to %s: %s", self.policy_file, exc)
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
        self.section = dataclasses.replace(new.dispatcher, rpc_listen=self.section.rpc_listen,
                                           token_file=self.section.token_file)

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.core.lease_seconds / 4)
            for wid in self.core.tick(time.time()):
                log.warning("worker %s went silent; its units are back in the queue", wid)
                self._wake(wid)

    async def _saver(self) -> None:
        while True:
            await trio.sleep(self.section.policy_save_interval)
            try:
                self.save_policies()
            except OSError as exc:
                log.error("cannot save policy state to %s: %s", self.policy_file, exc)

    def _wake(self, worker_id: str) -> None:
        ev = self.wakeups.pop(worker_id, None)
        if ev is not None:
            ev.set()

    def _job_done(self, job_id: int, state: str) -> None:
        self.metrics.jobs_finished.labels(state).inc()
        log.info("job %d %s", job_id, state)

    # -- RPC -----------------------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {name[4:]: getattr(self, name) for name in dir(self) if name.startswith("rpc_")}

    async def rpc_submit(self, params: Any) -> dict[str, Any]:
        spec = _get(params, "spec", bytes)
        policy = params.get("policy") if isinstance(params, dict) else None
        if policy is not None and policy not in DISPATCH_POLICIES:
            raise RpcError("bad_request", f"unknown policy {policy!r}; known: {', '.join(DISPATCH_POLICIES)}")
        limits = Limits(self.section.max_spec_bytes, self.section.max_tasks_per_job)
        try:
            job = parse_spec(spec, limits)
            if job.policy is not None and job.policy not in DISPATCH_POLICIES:
                raise SpecError("invalid", f"policy: unknown policy {job.policy!r}; known: {', '.join(DISPATCH_POLICIES)}")
        except SpecError as exc:
            self.metrics.specs_rejected.labels(exc.reason).inc()
            log.info("refused a job spec (%s): %s", exc.reason, exc)
            raise RpcError("bad_spec", str(exc)) from None
        try:
            job_id = self.core.submit(job, time.time(), policy)
        except CoreError as exc:
            raise RpcError(exc.code, exc.message) from None
        log.info("job %d %r accepted: %d tasks in %d units", job_id, job.name, len(job.tasks), len(job.units))
        return {"job": job_id, "tasks": len(job.tasks), "units": len(job.units)}

    async def rpc_jobs(self, params: Any) -> list[dict[str, Any]]:
        limit = params.get("limit", 50) if isinstance(params, dict) else 50
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise RpcError("bad_request", "limit: expected 1 .. 1000")
        return self.store.jobs(limit)

    async def rpc_job(self, params: Any) -> dict[str, Any]:
        """One page of a job's tasks: a response must fit one RPC frame (1 MiB)."""
        job_id = _get(params, "id", int)
        logs = bool(params.get("logs"))
        offset = params.get("offset", 0)
        if not isinstance(offset, int) or offset < 0:
            raise RpcError("bad_request", "offset: expected a task index >= 0")
        # ~200 bytes per task row (2000 rows: ~400 KiB), plus logs and outputs up to 512 KiB
        view = self.store.job(job_id, logs=logs, offset=offset, limit=2000, budget=512 * 1024)
        if view is None:
            raise RpcError("not_found", f"no job {job_id}")
        view["progress"] = self.core.progress(job_id)
        return view

    async def rpc_register(self, params: Any) -> dict[str, Any]:
        wid = _worker_id(params)
        cap = {}
        for key, lo in (("cpus", 0.001), ("memory", 0), ("cpu_speed", 1e-9), ("bandwidth", 1.0), ("rtt", 0.0)):
            v = params.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < 1e18:
                raise RpcError("bad_request", f"{key}: expected a number >= {lo}")
            cap[key] = float(v)
        verdict = _verdict(params)
        self._core_call(self.core.register, wid, cap, time.time(), verdict)
        log.info("worker %s registered: %g cpus, %.0f MiB, rtt %.2f ms%s", wid, cap["cpus"], cap["memory"] / 2**20,
                 cap["rtt"] * 1000, f", node {verdict}" if verdict else "")
        return {"lease_seconds": self.core.lease_seconds, "max_log_bytes": self.section.max_log_bytes}

    async def rpc_ping(self, params: Any) -> bool:
        return True

    async def rpc_heartbeat(self, params: Any) -> dict[str, Any]:
        wid = _worker_id(params)
        running = params.get("running", 0)
        if not isinstance(running, int) or running < 0:
            raise RpcError("bad_request", "running: expected a count")
        verdict = _verdict(params)
        before = self.core.workers.get(wid)
        was = before.verdict if before is not None else None
        self._core_call(self.core.heartbeat, wid, running, time.time(), verdict)
        if verdict is not None and verdict != was:
            excluded = not self.core.dispatchable(self.core.workers[wid])
            log.warning("worker %s: its node's telemetry says %s%s", wid, verdict,
                        " (excluded from dispatch)" if excluded else "")
        return {"rewards": self._rewards(wid, params)}

    def _rewards(self, wid: str, params: dict[str, Any]) -> list[list[Any]]:
        return self._core_call(self.core.team_rewards, wid) if params.get("rewards") is True else []

    async def rpc_pull(self, params: Any) -> dict[str, Any]:
        wid = _worker_id(params)
        want = _get(params, "max", int)
        wait = params.get("wait", 0.0)
        if not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT:
            raise RpcError("bad_request", f"wait: expected 0 .. {MAX_WAIT} seconds")
        want = max(1, min(want, self.section.max_pull))
        if wait and not self.core.has_work(wid):
            ev = self.wakeups.setdefault(wid, trio.Event())
            with trio.move_on_after(wait):
                await ev.wait()
        units = self._core_call(self.core.pull, wid, want, time.time())
        return {"units": units, "rewards": self._rewards(wid, params)}

    async def rpc_report(self, params: Any) -> dict[str, int]:
        wid = _worker_id(params)
        try:
            batch = decode_results(params.get("results"), self.section.max_log_bytes)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        applied = self._core_call(self.core.report, wid, batch, time.time())
        return {"applied": applied, "duplicates": len(batch) - applied}

    async def rpc_workers(self, params: Any) -> list[dict[str, Any]]:
        return self.core.workers_view()

    async def rpc_exclude(self, params: Any) -> dict[str, int]:
        ids = params.get("workers") if isinstance(params, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(ids) > 100_000:
            raise RpcError("bad_request", "workers: expected a list of worker ids")
        self.core.set_excluded(ids, time.time())
        log.warning("anomaly hook: excluding %d workers: %s", len(ids), ", ".join(ids[:10]))
        return {"excluded": len(ids)}

    @staticmethod
    def _core_call(fn, *args):
        try:
            return fn(*args)
        except CoreError as exc:
            raise RpcError(exc.code, exc.message) from None


def _get(params: Any, key: str, tp: type) -> Any:
    if not isinstance(params, dict):
        raise RpcError("bad_request", "expected a map of parameters")
    v = params.get(key)
    if not isinstance(v, tp) or isinstance(v, bool):
        raise RpcError("bad_request", f"{key}: expected {tp.__name__}")
    return v


def _verdict(params: dict[str, Any]) -> str | None:
    v = params.get("verdict")
    if v is not None and v not in VERDICTS:
        raise RpcError("bad_request", f"verdict: expected one of {', '.join(VERDICTS)}")
    return v


def _worker_id(params: Any) -> str:
    wid = _get(params, "worker", str)
    if not 1 <= len(wid) <= MAX_WORKER_ID or not wid.isprintable():
        raise RpcError("bad_request", f"worker: expected 1 .. {MAX_WORKER_ID} printable characters")
    return wid


def make_app(ctx: DaemonContext) -> DispatcherApp:
    return DispatcherApp(ctx)


def check_config(cfg: DispatcherConfig) -> None:
    read_token(cfg.dispatcher.token_file)


__all__ = ["DispatcherApp", "make_app", "check_config"]
