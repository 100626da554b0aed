"""The backup role (the seed's P_b): a mirror of every group's parity.

The coordinator applies each commit's deltas here (``b_apply``) before it
answers the commit, copies whole groups after the backup was away
(``b_put``), and reads them back after its own restart (``b_list``,
``b_read``). Deltas commute, so the order they arrive in does not matter.

A commit larger than one frame arrives in parts. The parts are staged per
(group, rank) and applied together, with the new checkpoint number, when the
last part arrives: the parity here is always the code of the ranks' checkpoints
whose numbers it lists. (Applied one at a time, a commit cut off by a killed
coordinator left a parity that mixed two checkpoints under the old number, and
a restarted coordinator restored it: a silently wrong recovery.) A part out of
order is refused, so the coordinator copies the group again.

The backup also keeps each group's epoch, as the coordinator last sent it (with
every commit and copy, and on its own when a rank failure moves it,
``b_epoch``): whenever the coordinator says its mirror is current, both agree on
the parity, the checkpoint numbers and the epoch (tests check it after every
transition). The parity's validity is decided by the numbers alone: a rollback
returns a rank to a committed checkpoint and its next one is numbered after it,
so a number names one image.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.core.checkpoint.groupcode import GroupCode
from shoal.daemons.checkpoint.config import CheckpointSection
from shoal.daemons.checkpoint.metrics import CheckpointMetrics
from shoal.daemons.checkpoint.refusals import Refused, counted, wrong_role
from shoal.daemons.runtime.rpc import Handler, handlers_of, rpc_method
from shoal.protocol.checkpoint import (
    COORDINATOR_METHODS,
    BackupApply,
    BackupDrop,
    BackupEpoch,
    BackupPut,
    BackupRead,
    GroupMeta,
)
from shoal.protocol.contract import BadParams


@dataclass(slots=True)
class Held:
    """One group's mirror: its parity, and per rank the checkpoint number and size it is of."""

    code: GroupCode
    numbers: list[int]
    sizes: list[int]
    epoch: int


class Backup:
    """The backup's RPC handlers (role = backup)."""

    def __init__(self, cfg: CheckpointSection, metrics: CheckpointMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.groups: dict[str, Held] = {}
        self._incoming: dict[str, GroupCode] = {}
        # (group, rank) -> (tag, next part, staged blocks, staged bytes): a commit in parts
        self._staged: dict[tuple[str, int], tuple[int, int, list[tuple[int, bytes]], int]] = {}

    def handlers(self) -> dict[str, Handler]:
        others = [m for m in COORDINATOR_METHODS if m != "status"]
        return counted(self.metrics, handlers_of(self)) | wrong_role(
            self.metrics, others, "this daemon is a backup; talk to the coordinator")

    def gauges(self) -> dict[str, float]:
        return {"shoal_checkpoint_groups": len(self.groups),
                "shoal_checkpoint_parity_bytes": sum(h.code.nbytes for h in self.groups.values()),
                "shoal_checkpoint_backup_in_sync": 1.0,
                "shoal_checkpoint_backup_configured": 0.0}

    def _new_code(self, meta: GroupMeta) -> GroupCode:
        if meta.n > self.cfg.max_ranks:
            raise BadParams(f"meta.n: must be <= {self.cfg.max_ranks}")
        return GroupCode(meta.n, meta.m, meta.block_size)

    @rpc_method("b_apply", BackupApply)
    async def b_apply(self, p: BackupApply) -> bool:
        if p.group not in self.groups:
            if len(self.groups) >= self.cfg.max_groups:
                raise Refused("too_many", "too many groups")
            code = self._new_code(p.meta)
            self.groups[p.group] = Held(code, [-1] * code.n, [-1] * code.n, p.meta.epoch)
        held = self.groups[p.group]
        code = held.code
        if p.rank >= code.n:
            raise BadParams(f"rank: must be <= {code.n - 1}")
        if p.size > self.cfg.max_state_bytes:
            raise BadParams(f"size: must be <= {self.cfg.max_state_bytes}")
        blocks = p.pairs(code.block_size)
        key = (p.group, p.rank)
        if p.part == 0:
            self._staged.pop(key, None)  # a commit cut off earlier is dropped, never applied
            staged: list[tuple[int, bytes]] = []
            nbytes = 0
        else:
            tag, expected, staged, nbytes = self._staged.pop(key, (-1, 0, [], 0))
            if (tag, expected) != (p.tag, p.part):
                raise BadParams(f"part: part {p.part} of checkpoint {p.tag} does not follow what is staged")
        staged = staged + blocks
        nbytes += sum(len(d) for _, d in blocks)
        if nbytes > self.cfg.max_state_bytes:
            raise Refused("too_many", "staged deltas exceed max_state_bytes")
        if p.number is None:
            self._staged[key] = (p.tag, p.part + 1, staged, nbytes)
            return True
        # The last part: the whole commit at once, no await in between.
        for k, d in staged:
            code.apply(p.rank, k, d)
        code.set_size(p.rank, p.size)
        held.numbers[p.rank], held.sizes[p.rank] = p.number, p.size
        held.epoch = p.meta.epoch  # a commit is refused at the coordinator unless its epoch is current
        self.metrics.mirror.labels("ok").inc()
        return True

    @rpc_method("b_put", BackupPut)
    async def b_put(self, p: BackupPut) -> bool:
        if p.offset == 0:
            code = self._new_code(p.meta)
            if len(p.sizes) != code.n:
                raise BadParams("sizes: one size per rank")
            for i, s in enumerate(p.sizes):
                if s >= 0:
                    code.set_size(i, s)
            self._incoming[p.group] = code
            for key in [k for k in self._staged if k[0] == p.group]:
                del self._staged[key]
        incoming = self._incoming.get(p.group)
        if incoming is None:
            raise BadParams("offset: a copy starts at offset 0")
        incoming.write(p.offset, p.data)
        if p.final:
            del self._incoming[p.group]
            self.groups[p.group] = Held(incoming, list(p.numbers), list(p.sizes), p.meta.epoch)
            self.metrics.mirror.labels("resync").inc()
        return True

    @rpc_method("b_epoch", BackupEpoch)
    async def b_epoch(self, p: BackupEpoch) -> bool:
        if p.group not in self.groups:
            raise Refused("unknown_group", "no such group here")
        self.groups[p.group].epoch = p.epoch
        return True

    @rpc_method("b_list")
    async def b_list(self) -> dict:
        return {name: {"n": h.code.n, "m": h.code.m, "block_size": h.code.block_size, "numbers": h.numbers,
                       "sizes": h.sizes, "epoch": h.epoch}
                for name, h in self.groups.items()}

    @rpc_method("b_drop", BackupDrop)
    async def b_drop(self, p: BackupDrop) -> bool:
        """The group finished or failed at the coordinator: free its parity."""
        self.groups.pop(p.group, None)
        self._incoming.pop(p.group, None)
        for key in [k for k in self._staged if k[0] == p.group]:
            del self._staged[key]
        return True

    @rpc_method("b_read", BackupRead)
    async def b_read(self, p: BackupRead) -> bytes:
        if p.group not in self.groups:
            raise Refused("unknown_group", "no such group here")
        if p.length > self.cfg.max_frame // 2:
            raise BadParams(f"length: must be <= {self.cfg.max_frame // 2}")
        return self.groups[p.group].code.read(p.offset, p.length)

    @rpc_method("status")
    async def status(self) -> dict:
        return {"role": "backup", "groups": [{"group": k, "parity_bytes": h.code.nbytes, "numbers": h.numbers,
                                              "epoch": h.epoch} for k, h in self.groups.items()]}
