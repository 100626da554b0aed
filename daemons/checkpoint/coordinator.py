"""The coordinator (the seed's checkpoint processor P_c): the shell around the groups.

This module is the I/O shell: the RPC handlers (contracts in
:mod:`shoal.protocol.checkpoint`), the failure detector (long polls and the
reaper) and recovery's orchestration. The group's state machine and
bookkeeping are I/O-free in :mod:`shoal.core.checkpoint.group`; the backup's
copy is kept by :mod:`mirror`, ranges are read from the ranks by
:mod:`ranklinks`, and the backup role itself is :mod:`backup`.

Theory of operation
-------------------
A *group* is one application of n ranks. Each rank keeps its last checkpoint
in its own memory (see shoal.ckpt.rank); the coordinator keeps, per group, the parity
of those checkpoints (:class:`~shoal.core.checkpoint.groupcode.GroupCode`), each rank's committed
checkpoint number, and the Timeout rule (:class:`grant.GrantRule`). Everything
a rank asks travels on the runtime RPC transport; every call after ``join``
carries the session key the join returned, so a rank cannot act for another
(``bad_identity``), and the group's *epoch*, so a call made before a rollback is
refused (``stale_epoch``).

Checkpoints. A rank asks (``request``); under the Timeout rule the grant is
given at once or held, and a held grant is released when the slowest rank
completes. A granted rank streams its block deltas (``delta``), which are
*staged*; ``commit`` applies them all to the parity, mirrors them to the backup
and only then answers, so the parity is always the XOR of every rank's last
*committed* checkpoint, and so is the backup's copy (deltas commute: order does
not matter). Checkpoint 0 (the whole state) needs no grant.

Blocking mode (Plank's N+1 parity, the seed's baseline) runs global rounds: a
rank whose timer fires proposes one; ranks then report their step counter at
each safe point until every rank has reported once, and the round's target
step is one past the largest step seen. Every rank freezes when it reaches the
target, asks, and is granted when all ranks have asked and no message is in
transit; it then checkpoints and stays frozen until every rank has committed.
Choosing a step nobody has reached yet means no rank freezes while another
still waits for its messages.

Failure. Each rank keeps one long-poll (``watch``) open; it returns when the
group changes or after ``heartbeat_interval``. If the rank's connection closes
the poll is cancelled and the rank is declared failed at once; a rank silent
for ``heartbeat_timeout`` is declared failed by the reaper. The group's epoch
goes up, staged deltas and pending grants are dropped, and the watches tell the
survivors to roll back. Survivors restore their local checkpoints and call
``ready`` with, for every source, the sequence number of the last message they
had consumed. A replacement joins under the failed rank's id and reads its
checkpoint with ``recover_read``: each range is the decode of the survivors'
same ranges (fetched from their own RPC servers) with the parity. When every
rank is ready the watches carry ``resume`` with the consumed-sequence matrix;
each rank resends the logged messages its peers had not consumed and runs
again. R is measured from detection to resume.

Coordinator failure. A restarted coordinator knows no group. Ranks reconnect
and join again, reporting the checkpoint number they hold; when all n have,
the parity is read back from the backup if the backup's checkpoint numbers are
exactly those, and recomputed from the ranks' checkpoints otherwise. Ranks
keep computing meanwhile; only checkpoints wait. Backup failure: a failed
mirror call marks the backup out of sync; a task reconnects and copies every
group's parity again, then deltas flow as before.

Limits: ``max_groups`` groups, ``max_ranks`` per group, ``max_state_bytes`` per
rank, RPC frames of ``max_frame`` bytes (deltas and ranges travel in chunks
of half of it).
"""

from __future__ import annotations

import logging
import math
import secrets
import weakref
from typing import Any

import trio

from shoal.core.checkpoint.group import FAILED, OVER, REBUILDING, RECOVERING, STATE_LOST, Group, GroupTable, Refusal
from shoal.core.checkpoint.overhead import model
from shoal.daemons.checkpoint.config import CheckpointSection
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.checkpoint.mirror import Mirror
from shoal.daemons.checkpoint.ranklinks import RankLinks
from shoal.daemons.checkpoint.refusals import Refused, counted, wrong_role
from shoal.daemons.runtime.rpc import Handler, RpcError, handlers_of, rpc_method
from shoal.protocol.checkpoint import (
    BACKUP_METHODS,
    SESSION_METHODS,
    AtStep,
    Barrier,
    Commit,
    Delta,
    Freeze,
    Join,
    Member,
    Ready,
    RecoverRead,
    Request,
    Session,
    Stats,
    Watch,
    group_named,
)
from shoal.protocol.contract import BadParams

log = logging.getLogger("shoal.checkpoint")


class _Wakeups:
    """One trio.Event per group, set when the group changes (the long polls wait on it)."""

    def __init__(self) -> None:
        # weak: a group forgotten by the table takes its event with it
        self._events: weakref.WeakKeyDictionary[Group, trio.Event] = weakref.WeakKeyDictionary()

    def changed(self, g: Group) -> None:
        ev = self._events.pop(g, None)
        if ev is not None:
            ev.set()

    async def wait(self, g: Group, version: int, timeout: float) -> None:
        """Until ``g`` changes from ``version``, or ``timeout`` seconds."""
        if g.version == version:
            ev = self._events.setdefault(g, trio.Event())
            with trio.move_on_after(timeout):
                await ev.wait()


class Coordinator:
    """The coordinator's RPC handlers and background tasks (role = coordinator)."""

    def __init__(self, cfg: CheckpointSection, metrics: CheckpointMetrics, token: bytes | None,
                 clock=trio.current_time) -> None:
        self.metrics = metrics
        self.token = token
        self.clock = clock
        self.wakeups = _Wakeups()
        self.table = GroupTable(cfg.max_groups, cfg.max_ranks, on_change=self._changed, grace=cfg.finished_grace)
        self.groups = self.table.groups
        self.chunk = cfg.max_frame // 2
        self.mirror = Mirror(cfg, metrics, token, lambda: list(self.table))
        self.links = RankLinks(cfg, token)
        self._cfg = cfg
        self.stopping = False
        self._nursery: trio.Nursery | None = None

    @property
    def cfg(self) -> CheckpointSection:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: CheckpointSection) -> None:  # a reload changes the timing live
        self._cfg = self.mirror.cfg = self.links.cfg = cfg

    def _changed(self, g: Group) -> None:
        """Every change of a group: wake its long polls; a group just over frees its parity."""
        self.wakeups.changed(g)
        if g.phase in OVER and g.over_since is None:
            g.over(self.clock())
            if g.phase == FAILED:
                self.metrics.recoveries.labels("failed").inc()
                self.metrics.groups_failed.labels(g.failure or "too_many_lost").inc()
                log.error("group %s failed: %s", g.name, g.reason)

    @property
    def backup_in_sync(self) -> bool:
        return self.mirror.in_sync

    # -- plumbing ----------------------------------------------------------------
    def handlers(self) -> dict[str, Handler]:
        own = handlers_of(self)
        for name in SESSION_METHODS:
            own[name] = self._group_first(own[name])
        others = [m for m in BACKUP_METHODS if m != "status"]
        return counted(self.metrics, own) | wrong_role(
            self.metrics, others, "this daemon is a coordinator, not a backup")

    def _group_first(self, handler: Handler) -> Handler:
        """A call naming a group we do not hold is ``unknown_group`` whatever else it says:
        that is how a rank learns that the coordinator restarted."""
        async def scoped(params: Any) -> Any:
            name = group_named(params)
            if name is not None:
                self.table.get(name)
            return await handler(params)

        scoped.__name__ = handler.__name__
        return scoped

    def gauges(self) -> dict[str, float]:
        groups = list(self.table)
        out = {
            "shoal_checkpoint_groups": len(groups),
            "shoal_checkpoint_ranks_alive": sum(s.alive for g in groups for s in g.slots),
            "shoal_checkpoint_parity_bytes": sum(g.code.nbytes for g in groups),
            "shoal_checkpoint_msglog_bytes": sum(s.log_bytes for g in groups for s in g.slots),
            "shoal_checkpoint_msglog_entries": sum(s.log_entries for g in groups for s in g.slots),
            "shoal_checkpoint_held_requests": sum(g.rule.is_held(i) for g in groups for i in range(g.n)),
            "shoal_checkpoint_backup_in_sync": float(self.mirror.in_sync),
            "shoal_checkpoint_backup_configured": float(self.cfg.backup is not None),
        }
        O = [x for g in groups for x in g.O]  # noqa: E741 - the seed's names
        L = [x for g in groups for x in g.L]
        R = [x for g in groups for x in g.R]
        if O and sum(O) > 0:
            m = model(sum(O) / len(O), sum(L) / len(L) if L else 0.0, sum(R) / len(R) if R else 0.0, self.cfg.mtbf)
            out.update({"shoal_checkpoint_optimal_interval_seconds": m.T_opt,
                        "shoal_checkpoint_gamma_seconds": m.gamma,
                        "shoal_checkpoint_overhead_ratio": m.r})
        return out

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reaper)
                if self.cfg.backup is not None:
                    nursery.start_soon(self.mirror.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.stopping = True
            await self.links.aclose()
            await self.mirror.aclose()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "the coordinator is running"
        return self._nursery

    def _member(self, p: Session) -> tuple[Group, int, Any]:
        """The group and slot of a session call (its epoch checked if it carries one)."""
        g = self.table.get(p.group)
        epoch = p.epoch if isinstance(p, Member) else None
        return g, p.rank, g.member(p.rank, p.key, epoch, self.clock())

    async def _wait_change(self, g: Group, version: int, timeout: float) -> None:
        await self.wakeups.wait(g, version, timeout)

    # -- membership ----------------------------------------------------------------
    @rpc_method("join", Join)
    async def rpc_join(self, p: Join) -> dict[str, Any]:
        g = self.table.open(p.group, p.n, p.mode, p.block_size, p.m, p.have, self.clock())
        try:
            recover, rebuild = g.admit(p.rank, p.key, secrets.token_bytes(16), p.host_port, p.have, p.epoch,
                                       self.clock(), running=p.running, finished=p.finished)
        except (Refusal, BadParams):
            self.table.discard(g)  # a refused join creates nothing
            raise
        if rebuild:
            self.nursery.start_soon(self._rebuild, g)
        slot = g.slots[p.rank]
        log.info("group %s: rank %d joined (%s)", p.group, p.rank, "recovering" if recover else g.phase)
        return {"key": slot.key, "epoch": g.epoch, "number": slot.number if recover else -1,
                "size": slot.size if recover else 0, "chunk": self.chunk, "phase": g.phase,
                "version": g.version}

    @rpc_method("watch", Watch)
    async def rpc_watch(self, p: Watch) -> dict[str, Any]:
        """Long-poll: the group's view as soon as it changes, or after heartbeat_interval."""
        g, rank, slot = self._member(p)
        await self._wait_change(g, p.version, self.cfg.heartbeat_interval)
        slot.last_seen = self.clock()
        return g.view()

    @rpc_method("attach", Session)
    async def rpc_attach(self, p: Session) -> bool:
        """The rank's heartbeat: always in flight on its connection, so a closed
        connection (a killed process) cancels it and is detected at once."""
        g, rank, slot = self._member(p)
        try:
            await trio.sleep(self.cfg.heartbeat_interval)
        except trio.Cancelled:
            # The server cancels a request when its connection closes: the rank is gone.
            # Unless the whole daemon is stopping (the same cancellation): decided in a
            # task of the coordinator's own nursery, which a stop cancels before it runs,
            # so a graceful restart never declares its ranks failed.
            if not self.stopping and slot.alive and slot.key == p.key:
                self.nursery.start_soon(self._disconnected, g, rank, p.key)
            raise
        slot.last_seen = self.clock()
        return True

    async def _disconnected(self, g: Group, rank: int, key: bytes) -> None:
        await trio.lowlevel.checkpoint()  # cancelled here if the daemon is stopping
        slot = g.slots[rank]
        if not self.stopping and slot.alive and slot.key == key:
            self._failed(g, rank, "disconnect")

    async def _reaper(self) -> None:
        while True:
            expected = self.clock() + self.cfg.heartbeat_interval / 2
            await trio.sleep(self.cfg.heartbeat_interval / 2)
            now = self.clock()
            for g in self.table.reap(now):
                self.metrics.groups_freed.inc()
                log.info("group %s freed (%s)", g.name, g.phase)
                if self.cfg.backup is not None:
                    self.nursery.start_soon(self.mirror.drop, g.name)
            for g in self.table:
                if g.phase == REBUILDING and now - g.created > self.cfg.rebuild_timeout and not all(
                        s.alive for s in g.slots):
                    missing = [i for i, s in enumerate(g.slots) if not s.alive]
                    g.fail(STATE_LOST, f"rank(s) {missing} did not join again within rebuild_timeout "
                                       f"({self.cfg.rebuild_timeout:g}s) after a coordinator restart")
                    g.changed()
            if now - expected > self.cfg.heartbeat_interval:
                # Our own loop stalled (a large commit, a slow mirror): the ranks'
                # heartbeats waited on us, so they say nothing about the ranks.
                for g in self.table:
                    for slot in g.slots:
                        slot.last_seen = max(slot.last_seen, now)
                continue
            for g in self.table:
                for rank, slot in enumerate(g.slots):
                    if slot.alive and now - slot.last_seen > self.cfg.heartbeat_timeout:
                        self._failed(g, rank, "heartbeat")

    def _failed(self, g: Group, rank: int, cause: str) -> None:
        self.links.drop(self.nursery, g, rank)
        phase = g.lose(rank, self.clock())
        if phase is None:
            return
        log.warning("group %s: rank %d failed (%s)", g.name, rank, cause)
        self.metrics.failures.labels(cause).inc()
        if self.cfg.backup is not None:
            self.mirror.epoch_changed(g.name)
        # (a failed group is counted and logged by _changed)

    @rpc_method("ready", Ready)
    async def rpc_ready(self, p: Ready) -> dict[str, int]:
        g, rank, slot = self._member(p)
        took = g.ready(rank, p.number, p.consumed, self.clock())
        if took is not None:
            self.metrics.recovery.observe(took)
            self.metrics.recoveries.labels("ok").inc()
            log.info("group %s: recovered in %.3fs, epoch %d", g.name, took, g.epoch)
        return {"epoch": g.epoch}

    @rpc_method("recover_read", RecoverRead)
    async def rpc_recover_read(self, p: RecoverRead) -> bytes:
        g, rank, slot = self._member(p)
        if p.length > self.chunk:
            raise BadParams(f"length: must be <= {self.chunk}")
        if rank not in g.lost or slot.number < 0:
            raise BadParams(f"rank: rank {rank} has nothing to recover")
        end = min(p.offset + p.length, slot.size)
        if p.offset >= end:
            return b""
        # Survivors' local checkpoints match the parity only once they have rolled back.
        with trio.move_on_after(self.cfg.heartbeat_timeout * 4) as waited:
            while not g.survivors_ready():
                if g.phase != RECOVERING:
                    raise Refused("stale_epoch", "the group is no longer recovering")
                await self._wait_change(g, g.version, self.cfg.heartbeat_interval)
        if waited.cancelled_caught:
            raise Refused("survivor_unreachable", "the survivors have not rolled back yet")
        lost = sorted(g.lost)
        chunks = await self.links.fetch_range(g, [i for i in range(g.n) if i not in g.lost], p.offset,
                                              end - p.offset)
        return g.code.decode_range(lost, chunks, p.offset, end - p.offset)[rank]

    # -- checkpoints -------------------------------------------------------------
    @rpc_method("request", Request)
    async def rpc_request(self, p: Request) -> dict[str, bool]:
        g, rank, slot = self._member(p)
        granted, decided = g.request(rank, p.number, self.clock())
        if decided:
            self.metrics.grants.labels("granted" if granted else "held").inc()
        return {"granted": granted}

    @rpc_method("delta", Delta)
    async def rpc_delta(self, p: Delta) -> int:
        g, rank, slot = self._member(p)
        try:
            g.check_may_write(rank, p.number)
        except Refusal:
            log.debug("rank %d: no grant for %d (%s, numbers %s)", rank, p.number, g.phase, g.rule.numbers())
            raise
        return g.stage(rank, p.number, p.pairs(g.block_size), self.cfg.max_state_bytes)

    @rpc_method("commit", Commit)
    async def rpc_commit(self, p: Commit) -> dict[str, int]:
        g, rank, slot = self._member(p)
        if p.size > self.cfg.max_state_bytes:
            raise BadParams(f"size: must be <= {self.cfg.max_state_bytes}")
        blocks = g.staged_for_commit(rank, p.number)
        slot.log_bytes, slot.log_entries = p.log_bytes, p.log_entries
        if p.O is not None and math.isfinite(p.O) and p.O >= 0:
            g.O.append(p.O)  # enhanced mode: the capture pause, known before the commit
            self.metrics.overhead.observe(p.O)
        g.check_within(rank, blocks, p.size)
        epoch = g.epoch
        async with self.mirror.lock:
            # A failure may have been handled while we waited for the lock.
            if g.epoch != epoch:
                raise Refused("stale_epoch", f"the group is at epoch {g.epoch}")
            # Apply and record in one go (no await in between), so that a failure
            # handled later sees this checkpoint as committed, as the rank will.
            for took in g.commit(rank, p.number, p.size, blocks, self.clock()):
                self.metrics.latency.observe(took)
            await self.mirror.apply(g, rank, blocks)
        nbytes = sum(len(d) for _, d in blocks)
        self.metrics.checkpoints.inc()
        self.metrics.delta_bytes.inc(nbytes)
        return {"number": p.number, "bytes": nbytes}

    @rpc_method("stats", Stats)
    async def rpc_stats(self, p: Stats) -> bool:
        g = self.table.get(p.group)
        g.member(p.rank, p.key, None, self.clock())
        if math.isfinite(p.O):
            g.O.append(p.O)
            self.metrics.overhead.observe(p.O)
        return True

    # -- blocking rounds -----------------------------------------------------------
    @rpc_method("propose", Member)
    async def rpc_propose(self, p: Member) -> bool:
        g, rank, slot = self._member(p)
        g.propose(self.clock())
        return True

    @rpc_method("at_step", AtStep)
    async def rpc_at_step(self, p: AtStep) -> list[int] | None:
        g, rank, slot = self._member(p)
        return g.at_step(rank, p.step)

    @rpc_method("freeze", Freeze)
    async def rpc_freeze(self, p: Freeze) -> bool:
        """Blocking mode: the rank reached the target step and is frozen; it calls
        again with fresh message totals until the round is granted (True)."""
        g, rank, slot = self._member(p)
        granted = g.freeze(rank, p.number, p.sent, p.received, self.clock())
        if granted is not None:
            self.metrics.grants.labels("granted" if granted else "held").inc()
        if g.rule.is_taking(rank):
            return True
        epoch = g.epoch
        await self._wait_change(g, g.version, self.cfg.heartbeat_interval)
        if g.epoch != epoch:
            raise Refused("stale_epoch", "a rank failed during the round")
        return g.rule.is_taking(rank)

    @rpc_method("barrier", Barrier)
    async def rpc_barrier(self, p: Barrier) -> bool:
        """Blocking mode: stay frozen until every rank has committed ``number``."""
        g, rank, slot = self._member(p)
        epoch = g.epoch
        while g.rule.global_number < p.number:
            await self._wait_change(g, g.version, self.cfg.heartbeat_interval)
            if g.epoch != epoch:
                raise Refused("stale_epoch", "a rank failed during the round")
        return True

    @rpc_method("finish", Member)
    async def rpc_finish(self, p: Member) -> bool:
        g, rank, slot = self._member(p)
        if g.finish(rank):
            log.info("group %s finished", g.name)
        return True

    @rpc_method("status")
    async def rpc_status(self, _: None = None) -> dict[str, Any]:
        return {"groups": [g.status(self.cfg.mtbf) for g in self.table], "mtbf": self.cfg.mtbf,
                "backup_in_sync": self.mirror.in_sync, "backup": str(self.cfg.backup) if self.cfg.backup else ""}

    # -- rebuilding after a coordinator restart --------------------------------------
    async def _rebuild(self, g: Group) -> None:
        source = "ranks"
        try:
            if await self.mirror.restore(g):
                source = "backup"
        except (RpcError, OSError) as exc:
            log.warning("group %s: backup unusable (%s); recomputing from the ranks", g.name, exc)
        if source == "ranks":
            try:
                with trio.fail_after(self.cfg.rebuild_timeout):
                    await self._recompute(g)
            except (RpcError, OSError, trio.TooSlowError) as exc:
                if g.phase == REBUILDING:
                    g.fail(STATE_LOST, f"the parity could not be recomputed from the ranks ({exc})"[:300])
                    g.changed()
                return
        if g.phase != REBUILDING:  # a rank failed meanwhile, or another rebuild finished first
            log.warning("group %s: %s after the parity was rebuilt", g.name, g.phase)
            return
        done = g.rebuilt()
        log.info("group %s: parity rebuilt from the %s", g.name, source)
        if done:
            log.info("group %s finished (every rank had returned while the coordinator was away)", g.name)
        if source == "ranks":
            self.mirror.out_of_sync()

    async def _recompute(self, g: Group) -> None:
        sizes = {}
        for i, s in enumerate(g.slots):
            if s.number >= 0:
                s.size = await self.links.size_of(g, i)
                sizes[i] = s.size
                g.code.set_size(i, s.size)
        total = max(sizes.values(), default=0)
        for off in range(0, total, self.chunk):
            length = min(self.chunk, total - off)
            chunks = await self.links.fetch_range(g, list(sizes), off, length)
            g.code.encode_range(chunks, off, length)
