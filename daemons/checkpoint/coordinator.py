"""The coordinator (the seed's checkpoint processor P_c) and the backup (P_b).

Theory of operation
-------------------
A *group* is one application of n ranks. Each rank keeps its last checkpoint
in its own memory (see client.py); the coordinator keeps, per group, the parity
of those checkpoints (:class:`code.GroupCode`), each rank's committed
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
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from shoal.core.checkpoint.grant import BLOCKING, ENHANCED, GrantRule
from shoal.core.checkpoint.groupcode import GroupCode
from shoal.core.checkpoint.overhead import model
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcClient, RpcError, connect_tcp

log = logging.getLogger("shoal.checkpoint")

MAX_NAME = 64
#: Bytes of stats kept per group for the model (O, L and R samples).
STATS_SAMPLES = 256




class Refused(RpcError):
    """A request refused for a reason in metrics.REFUSALS."""


def _need(params: Any, key: str, kind: type | tuple[type, ...], *, lo: int | None = None, hi: int | None = None):
    if not isinstance(params, dict) or key not in params:
        raise Refused("bad_params", f"missing {key!r}")
    value = params[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise Refused("bad_params", f"{key!r} has the wrong type")
    if lo is not None and value < lo:
        raise Refused("bad_params", f"{key!r} must be >= {lo}")
    if hi is not None and value > hi:
        raise Refused("bad_params", f"{key!r} must be <= {hi}")
    return value


def _counting_refusals(metrics, fn):
    """An RPC handler that counts each refusal by its code before it goes back to the caller."""
    async def handler(params):
        try:
            return await fn(params)
        except Refused as exc:
            metrics.refuse(exc.code)
            raise
    return handler


@dataclass(eq=False)
class Slot:
    key: bytes | None = None
    alive: bool = False
    addr: ListenAddr | None = None
    last_seen: float = 0.0
    number: int = -1  # last committed checkpoint (-1: none yet)
    size: int = 0
    staged: dict[int, bytes] = field(default_factory=dict)
    staged_bytes: int = 0
    staged_number: int | None = None
    granted_at: float = 0.0
    ready_epoch: int = -1
    consumed: list[int] = field(default_factory=list)
    finished: bool = False
    log_bytes: int = 0
    log_entries: int = 0


class Group:
    """One application's checkpoint state at the coordinator."""

    def __init__(self, name: str, n: int, mode: str, block_size: int, m: int):
        self.name, self.n, self.mode, self.block_size, self.m = name, n, mode, block_size, m
        self.code = GroupCode(n, m, block_size)
        self.slots = [Slot() for _ in range(n)]
        self.rule = GrantRule(n, mode)
        self.epoch = 0
        self.phase = "starting"  # starting | running | recovering | rebuilding | finished | failed
        self.lost: set[int] = set()
        self.version = 0
        self._changed = trio.Event()
        self.recovery_started = 0.0
        self.resume_phase = "starting"
        self.consumed: list[list[int]] = []
        # blocking rounds
        self.round_pending = False
        self.round_target: int | None = None
        self.round_reported: dict[int, int] = {}
        self.round_opened = 0.0
        self.round_number = 0
        self.O: deque[float] = deque(maxlen=STATS_SAMPLES)
        self.L: deque[float] = deque(maxlen=STATS_SAMPLES)
        self.R: deque[float] = deque(maxlen=STATS_SAMPLES)

    def changed(self) -> None:
        self.version += 1
        ev, self._changed = self._changed, trio.Event()
        ev.set()

    async def wait_change(self, version: int, timeout: float) -> None:
        if self.version == version:
            with trio.move_on_after(timeout):
                await self._changed.wait()

    def view(self) -> dict[str, Any]:
        v: dict[str, Any] = {
            "version": self.version,
            "epoch": self.epoch,
            "phase": self.phase,
            "lost": sorted(self.lost),
            "numbers": self.rule.numbers(),
            "taking": [i for i in range(self.n) if self.rule.is_taking(i)],
            "round": [self.round_pending, self.round_target],
            "global": self.rule.global_number,
        }
        if self.phase in ("running", "starting"):
            v["addrs"] = [[s.addr.host, s.addr.port] if s.addr else None for s in self.slots]
            v["consumed"] = self.consumed
        return v

    def model(self, mtbf: float) -> dict[str, float]:
        O = sum(self.O) / len(self.O) if self.O else 0.0
        L = sum(self.L) / len(self.L) if self.L else 0.0
        R = sum(self.R) / len(self.R) if self.R else 0.0
        out = {"O": O, "L": L, "R": R, "T_opt": 0.0, "gamma": 0.0, "r": 0.0}
        if O > 0:
            m = model(O, L, R, mtbf)
            out.update(T_opt=m.T_opt, gamma=m.gamma, r=m.r)
        return out


class Coordinator:
    """The coordinator's RPC handlers and background tasks (role = coordinator)."""

    def __init__(self, cfg, metrics: CheckpointMetrics, token: bytes | None, clock=trio.current_time):
        self.cfg = cfg
        self.metrics = metrics
        self.token = token
        self.clock = clock
        self.groups: dict[str, Group] = {}
        self.chunk = cfg.max_frame // 2
        self.backup: RpcClient | None = None
        self.backup_in_sync = False
        self._backup_wake = trio.Event()
        self._backup_synced = trio.Event()
        self._mirror_lock = trio.Lock()
        self._peers: dict[tuple[str, int, tuple[str, int]], RpcClient] = {}
        self.stopping = False
        self._nursery: trio.Nursery | None = None

    # -- plumbing ----------------------------------------------------------------
    def handlers(self) -> dict[str, Any]:
        names = ("join", "watch", "attach", "request", "delta", "commit", "stats", "ready", "recover_read",
                 "propose", "at_step", "freeze", "barrier", "finish", "status")
        return {n: self._guard(getattr(self, "rpc_" + n)) for n in names} | {
            n: self._wrong_role for n in ("b_apply", "b_put", "b_list", "b_read")
        }

    def _guard(self, fn):
        return _counting_refusals(self.metrics, fn)

    async def _wrong_role(self, params):
        self.metrics.refuse("wrong_role")
        raise RpcError("wrong_role", "this daemon is a coordinator, not a backup")

    def gauges(self) -> dict[str, float]:
        groups = list(self.groups.values())
        out = {
            "shoal_checkpoint_groups": len(groups),
            "shoal_checkpoint_ranks_alive": sum(s.alive for g in groups for s in g.slots),
            "shoal_checkpoint_parity_bytes": sum(g.code.nbytes for g in groups),
            "shoal_checkpoint_msglog_bytes": sum(s.log_bytes for g in groups for s in g.slots),
            "shoal_checkpoint_msglog_entries": sum(s.log_entries for g in groups for s in g.slots),
            "shoal_checkpoint_held_requests": sum(g.rule.is_held(i) for g in groups for i in range(g.n)),
            "shoal_checkpoint_backup_in_sync": float(self.backup_in_sync),
        }
        O = [x for g in groups for x in g.O]
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
                    nursery.start_soon(self._backup_keeper)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.stopping = True
            for c in list(self._peers.values()):
                await trio.aclose_forcefully(c._stream)  # noqa: SLF001 - no await-free close
            if self.backup is not None:
                await trio.aclose_forcefully(self.backup._stream)  # noqa: SLF001

    def _group(self, params) -> Group:
        name = _need(params, "group", str)
        g = self.groups.get(name)
        if g is None:
            raise Refused("unknown_group", f"no group {name[:MAX_NAME]!r} here")
        return g

    def _member(self, params, *, epoch: bool = True) -> tuple[Group, int, Slot]:
        g = self._group(params)
        rank = _need(params, "rank", int, lo=0, hi=g.n - 1)
        key = _need(params, "key", bytes)
        slot = g.slots[rank]
        if slot.key is None or not secrets.compare_digest(slot.key, key):
            raise Refused("bad_identity", f"the session key is not rank {rank}'s")
        if not slot.alive:
            raise Refused("bad_identity", f"rank {rank}'s session was declared failed; join again")
        if epoch and _need(params, "epoch", int) != g.epoch:
            raise Refused("stale_epoch", f"the group is at epoch {g.epoch}")
        slot.last_seen = self.clock()
        return g, rank, slot

    # -- membership ----------------------------------------------------------------
    async def rpc_join(self, p):
        name = _need(p, "group", str)
        if not 0 < len(name) <= MAX_NAME:
            raise Refused("bad_params", "group names are 1..64 characters")
        rank = _need(p, "rank", int, lo=0, hi=self.cfg.max_ranks - 1)
        n = _need(p, "n", int, lo=1, hi=self.cfg.max_ranks)
        mode = _need(p, "mode", str)
        if mode not in (BLOCKING, ENHANCED):
            raise Refused("bad_params", "mode is blocking or enhanced")
        block_size = _need(p, "block_size", int, lo=512, hi=64 << 20)
        m = _need(p, "m", int, lo=1, hi=4)
        have = _need(p, "have", int, lo=-1)
        host, port = _need(p, "addr", list)
        if not isinstance(host, str) or not isinstance(port, int) or not 0 < port < 65536 or rank >= n:
            raise Refused("bad_params", "addr is [host, port]; rank < n")
        if m > 1 and m >= n:
            raise Refused("bad_params", "Reed-Solomon needs more ranks than parity shards")
        g = self.groups.get(name)
        if g is not None and g.phase == "finished" and not any(s.alive for s in g.slots):
            del self.groups[name]
            g = None
        if g is None:
            if len(self.groups) >= self.cfg.max_groups:
                raise Refused("too_many", f"already {self.cfg.max_groups} groups")
            g = Group(name, n, mode, block_size, m)
            if have >= 0:
                g.phase = "rebuilding"  # a coordinator restarted under running ranks
            self.groups[name] = g
        if (g.n, g.mode, g.block_size, g.m) != (n, mode, block_size, m):
            raise Refused("group_mismatch", f"group {name!r} has n={g.n} mode={g.mode} block={g.block_size} m={g.m}")
        slot = g.slots[rank]
        old_key = p.get("key")
        same_session = (slot.alive and isinstance(old_key, bytes) and slot.key is not None
                        and secrets.compare_digest(slot.key, old_key))
        if slot.alive and not same_session:
            raise Refused("rank_taken", f"rank {rank} of {name!r} is alive")
        if slot.key is not None and rank not in g.lost and g.phase != "rebuilding" and not same_session:
            raise Refused("rank_taken", f"rank {rank} of {name!r} has a session")
        slot.key = secrets.token_bytes(16)
        slot.alive = True
        slot.addr = ListenAddr(host, port)
        slot.last_seen = self.clock()
        recover = rank in g.lost and slot.number >= 0
        if g.phase == "rebuilding":
            slot.number = have
            g.epoch = max(g.epoch, _need(p, "epoch", int, lo=0))
            if all(s.alive for s in g.slots):
                self._nursery.start_soon(self._rebuild, g)
        elif rank in g.lost and slot.number < 0:
            g.lost.discard(rank)  # nothing to recover: it starts afresh
        log.info("group %s: rank %d joined (%s)", name, rank, "recovering" if recover else g.phase)
        g.changed()
        return {"key": slot.key, "epoch": g.epoch, "number": slot.number if recover else -1,
                "size": slot.size if recover else 0, "chunk": self.chunk, "phase": g.phase,
                "version": g.version}

    async def rpc_watch(self, p):
        """Long-poll: the group's view as soon as it changes, or after heartbeat_interval."""
        g, rank, slot = self._member(p, epoch=False)
        seen = _need(p, "version", int)
        await g.wait_change(seen, self.cfg.heartbeat_interval)
        slot.last_seen = self.clock()
        return g.view()

    async def rpc_attach(self, p):
        """The rank's heartbeat: always in flight on its connection, so a closed
        connection (a killed process) cancels it and is detected at once."""
        g, rank, slot = self._member(p, epoch=False)
        try:
            await trio.sleep(self.cfg.heartbeat_interval)
        except trio.Cancelled:
            # The server cancels a request when its connection closes: the rank is gone.
            if not self.stopping and slot.alive and slot.key == p.get("key"):
                self._failed(g, rank, "disconnect")
            raise
        slot.last_seen = self.clock()
        return True

    async def _reaper(self) -> None:
        while True:
            expected = self.clock() + self.cfg.heartbeat_interval / 2
            await trio.sleep(self.cfg.heartbeat_interval / 2)
            now = self.clock()
            if now - expected > self.cfg.heartbeat_interval:
                # Our own loop stalled (a large commit, a slow mirror): the ranks'
                # heartbeats waited on us, so they say nothing about the ranks.
                for g in self.groups.values():
                    for slot in g.slots:
                        slot.last_seen = max(slot.last_seen, now)
                continue
            for g in list(self.groups.values()):
                for rank, slot in enumerate(g.slots):
                    if slot.alive and now - slot.last_seen > self.cfg.heartbeat_timeout:
                        self._failed(g, rank, "heartbeat")

    def _failed(self, g: Group, rank: int, cause: str) -> None:
        slot = g.slots[rank]
        slot.alive = False
        for key in [k for k in self._peers if k[:2] == (g.name, rank)]:
            client = self._peers.pop(key)
            self._nursery.start_soon(trio.aclose_forcefully, client._stream)  # noqa: SLF001
        if g.phase in ("finished", "failed"):
            return
        log.warning("group %s: rank %d failed (%s)", g.name, rank, cause)
        self.metrics.failures.labels(cause).inc()
        now = self.clock()
        if g.phase != "recovering":
            g.resume_phase = "running" if g.phase == "running" else "starting"
            g.recovery_started = now
        g.lost.add(rank)
        if g.phase == "rebuilding" or len(g.lost) > g.m:
            g.phase = "failed"
            self.metrics.recoveries.labels("failed").inc()
            log.error("group %s: %d ranks lost, the parity survives %d; the group has failed",
                      g.name, len(g.lost), g.m)
            g.changed()
            return
        g.phase = "recovering"
        g.epoch += 1
        for i, s in enumerate(g.slots):
            s.staged.clear()
            s.staged_bytes = 0
            s.staged_number = None
            s.finished = False
            g.rule.abort(i)
        g.round_pending, g.round_target, g.round_reported = False, None, {}
        g.changed()

    async def rpc_ready(self, p):
        g, rank, slot = self._member(p)
        consumed = _need(p, "consumed", list)
        if len(consumed) != g.n or not all(isinstance(x, int) for x in consumed):
            raise Refused("bad_params", "consumed has one int per rank")
        number = _need(p, "number", int, lo=-1)
        if number != slot.number:
            raise Refused("bad_params", f"rank {rank} holds checkpoint {number}, the parity has {slot.number}")
        slot.consumed = consumed
        slot.ready_epoch = g.epoch
        g.lost.discard(rank)
        g.changed()
        if g.phase == "recovering" and all(s.alive and s.ready_epoch == g.epoch for s in g.slots):
            g.consumed = [s.consumed for s in g.slots]
            if g.mode == BLOCKING:
                # A failure during a round leaves some ranks one checkpoint ahead;
                # rounds are global, so the next one is numbered after the highest
                # (a checkpoint number only labels an image; the parity has none).
                top = max(g.rule.completed(i) for i in range(g.n))
                for i in range(g.n):
                    g.rule._r[i].completed = top  # noqa: SLF001 - level the rule's counters
            g.phase = g.resume_phase
            if g.phase == "starting" and all(s.number >= 0 for s in g.slots):
                g.phase = "running"
            took = self.clock() - g.recovery_started
            g.R.append(took)
            self.metrics.recovery.observe(took)
            self.metrics.recoveries.labels("ok").inc()
            log.info("group %s: recovered in %.3fs, epoch %d", g.name, took, g.epoch)
            g.changed()
        return {"epoch": g.epoch}

    async def rpc_recover_read(self, p):
        g, rank, slot = self._member(p)
        offset = _need(p, "offset", int, lo=0)
        length = _need(p, "length", int, lo=1, hi=self.chunk)
        if rank not in g.lost or slot.number < 0:
            raise Refused("bad_params", f"rank {rank} has nothing to recover")
        end = min(offset + length, slot.size)
        if offset >= end:
            return b""
        # Survivors' local checkpoints match the parity only once they have rolled back.
        with trio.move_on_after(self.cfg.heartbeat_timeout * 4) as waited:
            while not all(s.alive and s.ready_epoch == g.epoch for i, s in enumerate(g.slots) if i not in g.lost):
                if g.phase != "recovering":
                    raise Refused("stale_epoch", "the group is no longer recovering")
                await g.wait_change(g.version, self.cfg.heartbeat_interval)
        if waited.cancelled_caught:
            raise Refused("survivor_unreachable", "the survivors have not rolled back yet")
        lost = sorted(g.lost)
        chunks = await self._fetch_range(g, [i for i in range(g.n) if i not in g.lost], offset, end - offset)
        return g.code.decode_range(lost, chunks, offset, end - offset)[rank]

    async def _fetch_range(self, g: Group, ranks: list[int], offset: int, length: int) -> dict[int, bytes]:
        """The same byte range of every listed rank's checkpoint, read concurrently."""
        out: dict[int, bytes] = {}
        errors: list[str] = []

        async def one(i: int) -> None:
            s = g.slots[i]
            if s.number < 0 or offset >= s.size:
                out[i] = b""
                return
            try:
                client = await self._peer(g, i)
                out[i] = await client.call("ckpt_read", {"offset": offset, "length": min(length, s.size - offset)},
                                           timeout=self.cfg.heartbeat_timeout * 4)
            except (RpcError, OSError) as exc:
                errors.append(f"rank {i}: {exc}")

        async with trio.open_nursery() as nursery:
            for i in ranks:
                nursery.start_soon(one, i)
        if errors:
            raise Refused("survivor_unreachable", "; ".join(errors)[:500])
        return out

    async def _peer(self, g: Group, i: int) -> RpcClient:
        addr = g.slots[i].addr
        key = (g.name, i, tuple(addr))
        c = self._peers.get(key)
        if c is None or c._broken is not None:  # noqa: SLF001 - reconnect a broken client
            c = await connect_tcp(addr, token=self.token, max_frame=self.cfg.max_frame)
            self._peers[key] = c
        return c

    # -- checkpoints -------------------------------------------------------------
    async def rpc_request(self, p):
        g, rank, slot = self._member(p)
        number = _need(p, "number", int, lo=1)
        if g.phase != "running" or g.mode != ENHANCED or slot.staged_number is not None:
            raise Refused("not_granted", f"group is {g.phase} ({g.mode})")
        if g.rule.is_taking(rank) or g.rule.is_held(rank):
            return {"granted": g.rule.is_taking(rank)}
        try:
            granted = g.rule.request(rank, number, self.clock())
        except ValueError as exc:
            raise Refused("bad_params", str(exc)) from None
        self.metrics.grants.labels("granted" if granted else "held").inc()
        if granted:
            slot.granted_at = self.clock()
        g.changed()
        return {"granted": granted}

    async def rpc_delta(self, p):
        g, rank, slot = self._member(p)
        number = _need(p, "number", int, lo=0)
        blocks = _need(p, "blocks", list)
        self._check_may_write(g, rank, number)
        limit = -(-self.cfg.max_state_bytes // g.block_size)
        for item in blocks:
            if (not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], int)
                    or not isinstance(item[1], bytes) or not 0 <= item[0] < limit or len(item[1]) > g.block_size):
                raise Refused("bad_params", "blocks are [index, delta] with delta <= block size")
        slot.staged_number = number
        for k, d in blocks:
            old = slot.staged.get(k)
            slot.staged_bytes += len(d) - (len(old) if old is not None else 0)
            slot.staged[k] = d
        if slot.staged_bytes > self.cfg.max_state_bytes:
            slot.staged.clear()
            slot.staged_bytes = 0
            raise Refused("too_many", "staged deltas exceed max_state_bytes")
        return len(blocks)

    def _check_may_write(self, g: Group, rank: int, number: int) -> None:
        slot = g.slots[rank]
        if number == 0 and slot.number < 0 and g.phase in ("starting", "running"):
            return  # checkpoint 0 needs no grant
        if g.phase != "running" or not g.rule.is_taking(rank) or g.rule.numbers()[rank] != number:
            log.debug("rank %d: no grant for %d (%s, numbers %s)", rank, number, g.phase, g.rule.numbers())
            raise Refused("not_granted", f"rank {rank} has no grant for checkpoint {number}")

    async def rpc_commit(self, p):
        g, rank, slot = self._member(p)
        number = _need(p, "number", int, lo=0)
        size = _need(p, "size", int, lo=0, hi=self.cfg.max_state_bytes)
        self._check_may_write(g, rank, number)
        if slot.staged_number not in (None, number):
            raise Refused("bad_params", "deltas were staged for another checkpoint")
        slot.log_bytes = _need(p, "log_bytes", int, lo=0)
        slot.log_entries = _need(p, "log_entries", int, lo=0)
        overhead = p.get("O")
        if isinstance(overhead, float) and math.isfinite(overhead) and overhead >= 0:
            g.O.append(overhead)  # enhanced mode: the capture pause, known before the commit
            self.metrics.overhead.observe(overhead)
        blocks = sorted(slot.staged.items())
        for k, _d in blocks:
            if k * g.block_size >= max(size, slot.size):
                raise Refused("bad_params", f"block {k} lies beyond the checkpoint")
        epoch = g.epoch
        async with self._mirror_lock:
            # A failure may have been handled while we waited for the lock.
            if g.epoch != epoch:
                raise Refused("stale_epoch", f"the group is at epoch {g.epoch}")
            self._check_may_write(g, rank, number)
            slot.staged, slot.staged_bytes, slot.staged_number = {}, 0, None
            # Apply and record in one go (no await in between), so that a failure
            # handled later sees this checkpoint as committed, as the rank will.
            for k, d in blocks:
                g.code.apply(rank, k, d)
            g.code.set_size(rank, size)
            slot.number, slot.size = number, size
            now = self.clock()
            if number > 0:
                if g.mode == ENHANCED:
                    took = now - slot.granted_at
                    g.L.append(took)
                    self.metrics.latency.observe(took)
                for i in g.rule.done(rank, number, now):
                    g.slots[i].granted_at = now
                if g.mode == BLOCKING and g.rule.global_number == number:
                    took = now - g.round_opened
                    g.L.append(took)
                    self.metrics.latency.observe(took)
                    g.round_pending, g.round_target, g.round_reported = False, None, {}
            elif g.phase == "starting" and all(s.number >= 0 for s in g.slots):
                g.phase = "running"
            g.changed()
            await self._mirror_apply(g, rank, blocks)
        nbytes = sum(len(d) for _, d in blocks)
        self.metrics.checkpoints.inc()
        self.metrics.delta_bytes.inc(nbytes)
        return {"number": number, "bytes": nbytes}

    async def rpc_stats(self, p):
        g, rank, slot = self._member(p, epoch=False)
        O = _need(p, "O", float, lo=0)
        if math.isfinite(O):
            g.O.append(O)
            self.metrics.overhead.observe(O)
        return True

    # -- blocking rounds -----------------------------------------------------------
    async def rpc_propose(self, p):
        g, rank, slot = self._member(p)
        if g.mode != BLOCKING or g.phase != "running":
            raise Refused("not_granted", f"group is {g.phase} ({g.mode})")
        if not g.round_pending:
            g.round_pending, g.round_target, g.round_reported = True, None, {}
            g.round_opened = self.clock()
            g.changed()
        return True

    async def rpc_at_step(self, p):
        g, rank, slot = self._member(p)
        step = _need(p, "step", int, lo=0)
        if not g.round_pending:
            return None
        if g.round_target is None:
            g.round_reported[rank] = step
            if len(g.round_reported) == g.n:
                g.round_target = max(g.round_reported.values()) + 1
                g.changed()
        if g.round_target is None:
            return None
        # A round is one number for every rank: the global number + 1.
        return [g.round_target, g.rule.global_number + 1]

    async def rpc_freeze(self, p):
        """Blocking mode: the rank reached the target step and is frozen; it calls
        again with fresh message totals until the round is granted (True)."""
        g, rank, slot = self._member(p)
        number = _need(p, "number", int, lo=1)
        sent = _need(p, "sent", int, lo=0)
        received = _need(p, "received", int, lo=0)
        if g.mode != BLOCKING or g.phase != "running" or g.round_target is None:
            raise Refused("not_granted", "no blocking round is due")
        now = self.clock()
        if not (g.rule.is_held(rank) or g.rule.is_taking(rank)):
            try:
                granted = g.rule.request(rank, number, now, sent, received)
            except ValueError as exc:
                raise Refused("bad_params", str(exc)) from None
            self.metrics.grants.labels("granted" if granted else "held").inc()
            g.changed()  # the other frozen ranks report again: their totals may have moved
        elif g.rule.report(rank, sent, received, now):
            g.changed()
        if g.rule.is_taking(rank):
            return True
        epoch = g.epoch
        await g.wait_change(g.version, self.cfg.heartbeat_interval)
        if g.epoch != epoch:
            raise Refused("stale_epoch", "a rank failed during the round")
        return g.rule.is_taking(rank)

    async def rpc_barrier(self, p):
        """Blocking mode: stay frozen until every rank has committed ``number``."""
        g, rank, slot = self._member(p)
        number = _need(p, "number", int, lo=1)
        epoch = g.epoch
        while g.rule.global_number < number:
            await g.wait_change(g.version, self.cfg.heartbeat_interval)
            if g.epoch != epoch:
                raise Refused("stale_epoch", "a rank failed during the round")
        return True

    async def rpc_finish(self, p):
        g, rank, slot = self._member(p)
        slot.finished = True
        if all(s.finished for s in g.slots) and g.phase == "running":
            g.phase = "finished"
            log.info("group %s finished", g.name)
        g.changed()
        return True

    async def rpc_status(self, p):
        out = []
        for g in self.groups.values():
            m = g.model(self.cfg.mtbf)
            out.append({
                "group": g.name, "n": g.n, "mode": g.mode, "m": g.m, "phase": g.phase, "epoch": g.epoch,
                "numbers": g.rule.numbers(), "alive": [s.alive for s in g.slots],
                "parity_bytes": g.code.nbytes, "samples": [len(g.O), len(g.L), len(g.R)], **m,
                "recommended_interval": m["T_opt"],
            })
        return {"groups": out, "mtbf": self.cfg.mtbf, "backup_in_sync": self.backup_in_sync,
                "backup": str(self.cfg.backup) if self.cfg.backup else ""}

    # -- rebuilding after a coordinator restart --------------------------------------
    async def _rebuild(self, g: Group) -> None:
        numbers = [s.number for s in g.slots]
        sizes = None
        source = "ranks"
        if self.cfg.backup is not None:
            with trio.move_on_after(self.cfg.heartbeat_timeout):
                await self._backup_synced.wait()
        try:
            if self.backup is not None and self.backup_in_sync:
                listing = await self.backup.call("b_list", None)
                meta = listing.get(g.name)
                if meta and meta["numbers"] == numbers and (meta["n"], meta["m"], meta["block_size"]) == (g.n, g.m, g.block_size):
                    sizes = meta["sizes"]
                    for i, size in enumerate(sizes):
                        if size >= 0:
                            g.code.set_size(i, size)
                            g.slots[i].size = size
                    total = g.code.nbytes
                    for off in range(0, total, self.chunk):
                        g.code.write(off, await self.backup.call("b_read", {"group": g.name, "offset": off,
                                                                             "length": self.chunk}))
                    source = "backup"
        except (RpcError, OSError) as exc:
            log.warning("group %s: backup unusable (%s); recomputing from the ranks", g.name, exc)
            sizes = None
        if sizes is None:
            await self._recompute(g)
        for i, s in enumerate(g.slots):
            g.rule._r[i].completed = max(s.number, 0)  # noqa: SLF001 - seed the rule with held numbers
        g.phase = "running" if all(n >= 0 for n in numbers) else "starting"
        log.info("group %s: parity rebuilt from the %s", g.name, source)
        if source == "ranks":
            self.backup_in_sync = False
            self._backup_wake.set()
        g.changed()

    async def _recompute(self, g: Group) -> None:
        sizes = {}
        for i, s in enumerate(g.slots):
            if s.number >= 0:
                client = await self._peer(g, i)
                s.size = await client.call("ckpt_size", None)
                sizes[i] = s.size
                g.code.set_size(i, s.size)
        total = max(sizes.values(), default=0)
        for off in range(0, total, self.chunk):
            length = min(self.chunk, total - off)
            chunks = await self._fetch_range(g, list(sizes), off, length)
            g.code.encode_range(chunks, off, length)

    # -- the backup mirror --------------------------------------------------------
    async def _mirror_apply(self, g: Group, rank: int, blocks: list[tuple[int, bytes]]) -> None:
        if self.backup is None or not self.backup_in_sync:
            return
        try:
            batch: list[list] = []
            size = 0
            for k, d in blocks + [(None, b"")]:
                if k is None or size + len(d) > self.chunk:
                    last = k is None
                    await self.backup.call("b_apply", {
                        "group": g.name, "meta": self._meta(g), "rank": rank, "blocks": batch,
                        "number": g.slots[rank].number if last else None, "size": g.slots[rank].size,
                    }, timeout=self.cfg.heartbeat_timeout * 4)
                    batch, size = [], 0
                if k is not None:
                    batch.append([k, d])
                    size += len(d)
            self.metrics.mirror.labels("ok").inc()
        except (RpcError, OSError) as exc:
            log.warning("backup mirror failed (%s); it will be copied again", exc)
            self.metrics.mirror.labels("error").inc()
            self.backup_in_sync = False
            self._backup_wake.set()

    def _meta(self, g: Group) -> dict[str, Any]:
        return {"n": g.n, "m": g.m, "block_size": g.block_size, "mode": g.mode}

    async def _backup_keeper(self) -> None:
        """Keep a connection to the backup; copy every group whenever it was out of sync."""
        while True:
            if not self.backup_in_sync:
                try:
                    if self.backup is None or self.backup._broken is not None:  # noqa: SLF001
                        self.backup = await connect_tcp(self.cfg.backup, token=self.token,
                                                        max_frame=self.cfg.max_frame, timeout=2.0)
                    async with self._mirror_lock:
                        for g in list(self.groups.values()):
                            if g.phase in ("rebuilding", "failed"):
                                continue
                            await self._copy_group(g)
                        self.backup_in_sync = True
                    self._backup_synced.set()
                    self.metrics.mirror.labels("resync").inc()
                    log.info("backup %s in sync", self.cfg.backup)
                except (RpcError, OSError) as exc:
                    log.debug("backup not reachable: %s", exc)
                    with trio.move_on_after(self.cfg.heartbeat_interval):
                        await trio.sleep_forever()
                    continue
            self._backup_wake = trio.Event()
            await self._backup_wake.wait()

    async def _copy_group(self, g: Group) -> None:
        total = g.code.nbytes
        numbers = [s.number for s in g.slots]
        sizes = [s.size if s.number >= 0 else -1 for s in g.slots]
        offsets = list(range(0, total, self.chunk)) or [0]
        for off in offsets:
            await self.backup.call("b_put", {
                "group": g.name, "meta": self._meta(g), "numbers": numbers, "sizes": sizes,
                "offset": off, "data": g.code.read(off, self.chunk), "final": off == offsets[-1],
            }, timeout=self.cfg.heartbeat_timeout * 4)


class Backup:
    """The backup's RPC handlers (role = backup): a mirror of every group's parity."""

    def __init__(self, cfg, metrics: CheckpointMetrics):
        self.cfg = cfg
        self.metrics = metrics
        self.groups: dict[str, tuple[GroupCode, list[int], list[int]]] = {}  # code, numbers, sizes
        self._incoming: dict[str, GroupCode] = {}

    def handlers(self) -> dict[str, Any]:
        own = {"b_apply": self.b_apply, "b_put": self.b_put, "b_list": self.b_list, "b_read": self.b_read,
               "status": self.status}
        coord = ("join", "watch", "attach", "request", "delta", "commit", "stats", "ready", "recover_read",
                 "propose", "at_step", "freeze", "barrier", "finish")
        wrapped = {}
        for name, fn in own.items():
            wrapped[name] = self._guard(fn)
        for name in coord:
            wrapped[name] = self._wrong_role
        return wrapped

    def _guard(self, fn):
        return _counting_refusals(self.metrics, fn)

    async def _wrong_role(self, params):
        self.metrics.refuse("wrong_role")
        raise RpcError("wrong_role", "this daemon is a backup; talk to the coordinator")

    def gauges(self) -> dict[str, float]:
        return {"shoal_checkpoint_groups": len(self.groups),
                "shoal_checkpoint_parity_bytes": sum(c.nbytes for c, _, _ in self.groups.values()),
                "shoal_checkpoint_backup_in_sync": 1.0}

    def _new_code(self, p) -> GroupCode:
        meta = _need(p, "meta", dict)
        n = _need(meta, "n", int, lo=1, hi=self.cfg.max_ranks)
        m = _need(meta, "m", int, lo=1, hi=4)
        bs = _need(meta, "block_size", int, lo=512, hi=64 << 20)
        return GroupCode(n, m, bs)

    async def b_apply(self, p):
        name = _need(p, "group", str)
        if name not in self.groups:
            if len(self.groups) >= self.cfg.max_groups:
                raise Refused("too_many", "too many groups")
            code = self._new_code(p)
            self.groups[name] = (code, [-1] * code.n, [-1] * code.n)
        code, numbers, sizes = self.groups[name]
        rank = _need(p, "rank", int, lo=0, hi=code.n - 1)
        for item in _need(p, "blocks", list):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and item[0] >= 0
                    and isinstance(item[1], bytes) and len(item[1]) <= code.block_size):
                raise Refused("bad_params", "blocks are [index, delta]")
            code.apply(rank, item[0], item[1])
        number = p.get("number")
        if number is not None:
            size = _need(p, "size", int, lo=0, hi=self.cfg.max_state_bytes)
            code.set_size(rank, size)
            numbers[rank], sizes[rank] = int(number), size
        self.metrics.mirror.labels("ok").inc()
        return True

    async def b_put(self, p):
        name = _need(p, "group", str)
        offset = _need(p, "offset", int, lo=0)
        data = _need(p, "data", bytes)
        if offset == 0:
            code = self._new_code(p)
            sizes = _need(p, "sizes", list)
            if len(sizes) != code.n:
                raise Refused("bad_params", "one size per rank")
            for i, s in enumerate(sizes):
                if isinstance(s, int) and s >= 0:
                    code.set_size(i, s)
            self._incoming[name] = code
        code = self._incoming.get(name)
        if code is None:
            raise Refused("bad_params", "a copy starts at offset 0")
        code.write(offset, data)
        if p.get("final"):
            del self._incoming[name]
            self.groups[name] = (code, list(_need(p, "numbers", list)), list(_need(p, "sizes", list)))
            self.metrics.mirror.labels("resync").inc()
        return True

    async def b_list(self, p):
        return {name: {"n": c.n, "m": c.m, "block_size": c.block_size, "numbers": nums, "sizes": sizes}
                for name, (c, nums, sizes) in self.groups.items()}

    async def b_read(self, p):
        name = _need(p, "group", str)
        if name not in self.groups:
            raise Refused("unknown_group", "no such group here")
        offset = _need(p, "offset", int, lo=0)
        length = _need(p, "length", int, lo=1, hi=self.cfg.max_frame // 2)
        return self.groups[name][0].read(offset, length)

    async def status(self, p):
        return {"role": "backup", "groups": [{"group": k, "parity_bytes": c.nbytes, "numbers": nums}
                                             for k, (c, nums, _) in self.groups.items()]}


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)
