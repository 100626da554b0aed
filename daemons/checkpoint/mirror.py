"""The coordinator's side of the backup: a mirror of every group's parity.

Every commit's deltas are applied to the backup's copy before the commit is
answered (:meth:`Mirror.apply`, under :attr:`Mirror.lock`, which the commit
holds), so the backup's parity is the XOR of the same committed checkpoints as
the coordinator's. A failed mirror call marks the backup out of sync; the
keeper task (:meth:`Mirror.run`) reconnects and copies every group again
(``b_put``), then deltas flow as before. A restarted coordinator reads a
group's parity back (:meth:`Mirror.restore`) when the backup's checkpoint
numbers are exactly the ones the ranks hold.

The group's epoch travels with every commit and copy; when a rank failure moves
it, :meth:`Mirror.epoch_changed` has the keeper send it on its own
(``b_epoch``). :attr:`Mirror.current` says the backup agrees with this
coordinator on parity, numbers and epoch (nothing is waiting to be sent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio

from shoal.core.checkpoint.group import FAILED, REBUILDING, Group
from shoal.daemons.checkpoint.config import CheckpointSection
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.runtime.rpc import RpcClient, RpcError, connect_tcp
from shoal.protocol.checkpoint import BackupApply, BackupDrop, BackupEpoch, BackupPut, BackupRead, GroupMeta

log = logging.getLogger("shoal.checkpoint")

#: at most this many freed groups wait for a resync to be dropped at the backup
PENDING_DROPS = 100_000


def meta_of(g: Group) -> GroupMeta:
    return GroupMeta(n=g.n, m=g.m, block_size=g.block_size, mode=g.mode, epoch=g.epoch)


class Mirror:
    def __init__(self, cfg: CheckpointSection, metrics: CheckpointMetrics, token: bytes | None,
                 groups: Callable[[], Iterable[Group]]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.token = token
        self.groups = groups
        self.chunk = cfg.max_frame // 2
        self.client: RpcClient | None = None
        self.in_sync = False
        self.lock = trio.Lock()  # a commit and a whole copy never interleave
        self._wake = trio.Event()
        self.synced = trio.Event()  # set the first time the backup is in sync
        self._epochs: set[str] = set()  # groups whose new epoch the backup has not been sent
        # Groups freed here that the backup may still hold (freed while it was out of sync, or
        # their drop failed): a resync drops them, unless a group of that name is held again.
        self._drops: dict[str, None] = {}

    def out_of_sync(self) -> None:
        self.in_sync = False
        self._wake.set()

    def epoch_changed(self, name: str) -> None:
        """The group's epoch moved: the keeper sends it to the backup."""
        self._epochs.add(name)
        self._wake.set()

    @property
    def current(self) -> bool:
        """The backup holds this coordinator's parity, numbers and epochs (nothing in flight)."""
        return self.in_sync and not self._epochs and not self.lock.locked()

    async def aclose(self) -> None:
        if self.client is not None:
            await trio.aclose_forcefully(self.client._stream)  # noqa: SLF001 - no await-free close

    async def apply(self, g: Group, rank: int, blocks: list[tuple[int, bytes]]) -> None:
        """Mirror one commit (call with :attr:`lock` held); a failure marks the backup out of sync."""
        if self.client is None or not self.in_sync:
            return
        try:
            batch: list[list[Any]] = []
            size = 0
            part = 0
            slot = g.slots[rank]
            for k, d in [*blocks, (None, b"")]:
                if k is None or size + len(d) > self.chunk:
                    last = k is None
                    # The backup stages the parts and applies them all on the last one.
                    call = BackupApply(group=g.name, meta=meta_of(g), rank=rank, blocks=batch,
                                       number=slot.number if last else None, size=slot.size,
                                       tag=slot.number, part=part)
                    await self.client.call("b_apply", call.encode(), timeout=self.cfg.heartbeat_timeout * 4)
                    batch, size = [], 0
                    part += 1
                if k is not None:
                    batch.append([k, d])
                    size += len(d)
            self.metrics.mirror.labels("ok").inc()
        except (RpcError, OSError) as exc:
            log.warning("backup mirror failed (%s); it will be copied again", exc)
            self.metrics.mirror.labels("error").inc()
            self.out_of_sync()

    async def drop(self, name: str) -> None:
        """The group is freed here: free it at the backup too, now or at the next resync.

        A group freed while the backup is out of sync (or whose drop fails) may be held
        there, copied before it was freed: it waits in ``_drops`` for the resync. (Before,
        it was forgotten; the backup's groups grew with every resync until it refused new
        ones as too many, and each refusal started another resync.)
        """
        if self.client is None or not self.in_sync:
            self._pending_drop(name)
            return
        async with self.lock:
            if not self.in_sync:  # a resync began while we waited: it drops it
                self._pending_drop(name)
                return
            try:
                await self.client.call("b_drop", BackupDrop(group=name).encode(),
                                       timeout=self.cfg.heartbeat_timeout * 4)
            except (RpcError, OSError) as exc:
                log.warning("backup: dropping group %s failed (%s); it will be copied again", name, exc)
                self._pending_drop(name)
                self.out_of_sync()

    def _pending_drop(self, name: str) -> None:
        self._drops[name] = None
        while len(self._drops) > PENDING_DROPS:  # a backup gone for good: forget the oldest
            del self._drops[next(iter(self._drops))]

    async def _send_drops(self) -> None:
        """Drop at the backup the groups freed here while it was out of sync (with the lock held)."""
        assert self.client is not None
        while self._drops:
            name = next(iter(self._drops))
            if all(g.name != name for g in self.groups()):  # not held again (a new group, just copied)
                await self.client.call("b_drop", BackupDrop(group=name).encode(),
                                       timeout=self.cfg.heartbeat_timeout * 4)
            del self._drops[name]  # after the call: a failed one is sent at the next resync

    async def run(self) -> None:
        """Keep a connection to the backup; copy every group whenever it was out of sync."""
        assert self.cfg.backup is not None
        while True:
            if not self.in_sync:
                try:
                    if self.client is None or self.client._broken is not None:  # noqa: SLF001
                        self.client = await connect_tcp(self.cfg.backup, token=self.token,
                                                        max_frame=self.cfg.max_frame, timeout=2.0)
                    async with self.lock:
                        for g in self.groups():
                            if g.phase in (REBUILDING, FAILED):
                                continue
                            await self._copy(g)
                        await self._send_drops()
                        self.in_sync = True
                    self.synced.set()
                    self.metrics.mirror.labels("resync").inc()
                    log.info("backup %s in sync", self.cfg.backup)
                except (RpcError, OSError) as exc:
                    log.debug("backup not reachable: %s", exc)
                    with trio.move_on_after(self.cfg.heartbeat_interval):
                        await trio.sleep_forever()
                    continue
            self._wake = trio.Event()
            if self._epochs:
                await self._send_epochs()
                continue
            await self._wake.wait()

    async def _send_epochs(self) -> None:
        assert self.client is not None
        by_name = {g.name: g for g in self.groups()}
        async with self.lock:
            try:
                while self._epochs:
                    g = by_name.get(self._epochs.pop())
                    if g is None or g.phase in (REBUILDING, FAILED):
                        continue
                    await self.client.call("b_epoch", BackupEpoch(group=g.name, epoch=g.epoch).encode(),
                                           timeout=self.cfg.heartbeat_timeout * 4)
            except (RpcError, OSError) as exc:
                log.warning("backup: sending an epoch failed (%s); it will be copied again", exc)
                self.metrics.mirror.labels("error").inc()
                self.out_of_sync()

    async def _copy(self, g: Group) -> None:
        assert self.client is not None
        self._epochs.discard(g.name)  # the copy carries the epoch
        total = g.code.nbytes
        numbers = [s.number for s in g.slots]
        sizes = [s.size if s.number >= 0 else -1 for s in g.slots]
        offsets = list(range(0, total, self.chunk)) or [0]
        for off in offsets:
            call = BackupPut(group=g.name, meta=meta_of(g), numbers=numbers, sizes=sizes, offset=off,
                             data=g.code.read(off, self.chunk), final=off == offsets[-1])
            await self.client.call("b_put", call.encode(), timeout=self.cfg.heartbeat_timeout * 4)

    async def restore(self, g: Group) -> bool:
        """Read ``g``'s parity back if the backup holds the ranks' very checkpoints."""
        if self.cfg.backup is not None:
            with trio.move_on_after(self.cfg.heartbeat_timeout):
                await self.synced.wait()
        if self.client is None or not self.in_sync:
            return False
        numbers = [s.number for s in g.slots]
        listing = await self.client.call("b_list", None)
        meta = listing.get(g.name)
        if not (meta and meta["numbers"] == numbers
                and (meta["n"], meta["m"], meta["block_size"]) == (g.n, g.m, g.block_size)):
            return False
        for i, size in enumerate(meta["sizes"]):
            if size >= 0:
                g.code.set_size(i, size)
                g.slots[i].size = size
        for off in range(0, g.code.nbytes, self.chunk):
            read = BackupRead(group=g.name, offset=off, length=self.chunk)
            g.code.write(off, await self.client.call("b_read", read.encode()))
        if meta.get("epoch") != g.epoch:
            # The ranks' epoch is the group's (they hold its fence); the parity is that of
            # their numbers either way. The backup is told the group's epoch.
            self.epoch_changed(g.name)
        return True
