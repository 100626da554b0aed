"""The checkpoint RPC: the parameters of every method, and its error codes.

Three servers speak it (see docs/checkpoint.md for the protocol in prose):

* the **coordinator** (the seed's P_c), called by the ranks: ``join``,
  ``watch``, ``attach``, ``request``, ``delta``, ``commit``, ``stats``,
  ``ready``, ``recover_read``, ``propose``, ``at_step``, ``freeze``,
  ``barrier``, ``finish`` and ``status`` (no parameters);
* the **backup** (P_b), called by the coordinator: ``b_apply``, ``b_put``,
  ``b_read``, ``b_list``, ``b_drop`` and ``status`` (no parameters);
* each **rank**'s own server, called by its peers and the coordinator:
  ``msg``, ``ack``, ``ckpt_read`` and ``ckpt_size`` (no parameters).

Every call a rank makes after ``join`` names its session (:class:`Session`:
group, rank and the key ``join`` returned) and, except the long polls, the
group's epoch (:class:`Member`). A call naming a group the coordinator does not
hold is answered ``unknown_group`` before its other parameters are looked at:
that is how a rank learns that the coordinator restarted (it joins again).

Bad input is ``bad_params`` (the field is named); the domain codes are
:data:`ERROR_CODES`. Each contract checks what it can alone; checks that need
the daemon's state (``rank < n``, ``max_ranks``, ``max_state_bytes``) are made by
the handler, and raise :class:`~shoal.protocol.contract.BadParams` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.protocol.contract import BadParams, Contract, bounded

__all__ = [
    "BACKUP_METHODS", "COORDINATOR_METHODS", "SESSION_METHODS", "ERROR_CODES",
    "MAX_NAME", "MAX_RANKS", "MAX_SHARDS", "MODES",
    "Session", "Member", "Join", "Watch", "Request", "Delta", "Commit", "Stats", "Ready", "RecoverRead",
    "AtStep", "Freeze", "Barrier", "GroupMeta", "BackupApply", "BackupPut", "BackupRead", "BackupDrop",
    "BackupEpoch",
    "Msg", "Ack", "CkptRead", "group_named",
]

#: The domain error codes of the checkpoint RPC (beyond the shared
#: :data:`shoal.protocol.contract.ERROR_CODES`); each refusal is also counted
#: in ``shoal_checkpoint_refused_total{reason}``.
ERROR_CODES = {
    "unknown_group": "a group that was never created here (or the coordinator restarted: join again)",
    "bad_identity": "a session key that is not the rank's: another rank's id claimed, or a session declared failed",
    "rank_taken": "a join for a rank that is alive",
    "group_mismatch": "a join whose n, mode, block size or shards differ from the group's",
    "too_many": "max_groups or max_state_bytes exceeded",
    "stale_epoch": "a call from before a rollback",
    "not_granted": "deltas, a commit or a round without a grant",
    "wrong_role": "a coordinator method sent to a backup, or the reverse",
    "survivor_unreachable": "a recovery read could not reach a survivor (the rank retries)",
    "group_over": "a join for a group that has finished or failed here (it is not created again)",
}

MODES = ("blocking", "enhanced")
#: Group names are chosen by applications; bounded so a view or a log line stays small.
MAX_NAME = 64
#: The largest ``max_ranks`` a coordinator may be configured with.
MAX_RANKS = 4096
#: Parity shards: 1 = XOR, up to 4 Reed-Solomon shards.
MAX_SHARDS = 4
MIN_BLOCK, MAX_BLOCK = 512, 64 << 20
#: The largest RPC frame a checkpoint daemon accepts (config ``max_frame`` max):
#: no bytes field of one call can be longer.
MAX_FRAME = 64 << 20
#: Blocks in one delta/mirror call: a call carries at most half a frame of
#: deltas, and a delta is rarely under a few bytes; the frame bound caps memory anyway.
MAX_BLOCKS = 1 << 20
#: A session key is 16 random bytes; anything much longer is not one.
MAX_KEY = 64
#: A host name or address in a rank's ``addr`` (DNS names are at most 253 characters).
MAX_HOST = 253
#: A checkpoint of one rank (config ``max_state_bytes`` max).
MAX_STATE = 1 << 40
#: Step, sequence, version and message counters: 63 bits, as msgpack carries them.
MAX_COUNT = (1 << 63) - 1


#: The coordinator's methods (called by the ranks, and ``status``).
COORDINATOR_METHODS = ("join", "watch", "attach", "request", "delta", "commit", "stats", "ready", "recover_read",
                       "propose", "at_step", "freeze", "barrier", "finish", "status")
#: The backup's methods (called by the coordinator, and ``status``).
BACKUP_METHODS = ("b_apply", "b_put", "b_epoch", "b_list", "b_read", "b_drop", "status")
#: Rank methods that name a session: ``unknown_group`` comes before any other check.
SESSION_METHODS = tuple(m for m in COORDINATOR_METHODS if m not in ("join", "status"))


def group_named(raw: Any) -> str | None:
    """The group a call names, before the call is decoded (None if it names none)."""
    if isinstance(raw, dict):
        name = raw.get("group")
        if isinstance(name, str):
            return name[:MAX_NAME + 1]
    return None


# -- the coordinator (called by ranks) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Session(Contract):
    """A rank's session: the key ``join`` returned proves it is that rank."""

    group: str = bounded(max_len=MAX_NAME)
    rank: int = bounded(min=0, max=MAX_RANKS - 1)
    key: bytes = bounded(max_len=MAX_KEY)


@dataclass(frozen=True, slots=True)
class Member(Session):
    """A session call that is refused (``stale_epoch``) if made before a rollback."""

    epoch: int = bounded(min=0, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class Join(Contract):
    """Join (or rejoin) a group; ``have`` is the checkpoint the rank holds (-1: none)."""

    group: str = bounded(max_len=MAX_NAME)
    rank: int = bounded(min=0, max=MAX_RANKS - 1)
    n: int = bounded(min=1, max=MAX_RANKS)
    mode: str = bounded(max_len=16)
    block_size: int = bounded(min=MIN_BLOCK, max=MAX_BLOCK)
    m: int = bounded(min=1, max=MAX_SHARDS)
    have: int = bounded(min=-1, max=MAX_COUNT)
    addr: list[Any] = bounded(max_len=2)  # [host, port] of the rank's own server
    epoch: int = bounded(0, min=0, max=MAX_COUNT)  # the epoch the rank was at (a coordinator restart)
    key: bytes = bounded(b"", max_len=MAX_KEY)  # the previous session's key, if any
    # The rank has run its main (so its state has left checkpoint 0), and it has
    # returned from it: a restarted coordinator needs both to tell a rank that
    # is merely late from one that lost its state, and to finish the group.
    running: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        if not self.group:
            raise BadParams("group: group names are 1..64 characters")
        if self.mode not in MODES:
            raise BadParams("mode: blocking or enhanced")
        if (len(self.addr) != 2 or not isinstance(self.addr[0], str) or not 0 < len(self.addr[0]) <= MAX_HOST
                or not isinstance(self.addr[1], int) or isinstance(self.addr[1], bool)
                or not 0 < self.addr[1] < 65536):
            raise BadParams("addr: [host, port]")
        if self.rank >= self.n:
            raise BadParams("rank: must be < n")
        if self.m > 1 and self.m >= self.n:
            raise BadParams("m: Reed-Solomon needs more ranks than parity shards")

    @property
    def host_port(self) -> tuple[str, int]:
        return self.addr[0], self.addr[1]


@dataclass(frozen=True, slots=True)
class Watch(Session):
    """Long poll: the group's view once its version differs from ``version``."""

    version: int = bounded(min=-1, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class Request(Member):
    """Enhanced mode: ask for a grant to take checkpoint ``number``."""

    number: int = bounded(min=1, max=MAX_COUNT)


def _check_blocks(blocks: list[Any], block_size: int = MAX_BLOCK) -> list[tuple[int, bytes]]:
    out = []
    for item in blocks:
        if (not isinstance(item, list | tuple) or len(item) != 2 or not isinstance(item[0], int)
                or isinstance(item[0], bool) or item[0] < 0 or not isinstance(item[1], bytes)
                or len(item[1]) > block_size):
            raise BadParams("blocks: [index, delta] with delta <= block size")
        out.append((item[0], item[1]))
    return out


@dataclass(frozen=True, slots=True)
class Delta(Member):
    """Block deltas of checkpoint ``number``, staged until the commit."""

    number: int = bounded(min=0, max=MAX_COUNT)
    blocks: list[Any] = bounded(max_len=MAX_BLOCKS)  # [index, XOR delta] pairs

    def __post_init__(self) -> None:
        _check_blocks(self.blocks)

    def pairs(self, block_size: int) -> list[tuple[int, bytes]]:
        """The blocks, each delta checked against the group's block size."""
        return _check_blocks(self.blocks, block_size)


@dataclass(frozen=True, slots=True)
class Commit(Member):
    """Apply the staged deltas of checkpoint ``number`` (image ``size`` bytes)."""

    number: int = bounded(min=0, max=MAX_COUNT)
    size: int = bounded(min=0, max=MAX_STATE)
    log_bytes: int = bounded(min=0, max=MAX_COUNT)
    log_entries: int = bounded(min=0, max=MAX_COUNT)
    O: float | None = None  # noqa: E741 - the seed's name: the capture pause, seconds


@dataclass(frozen=True, slots=True)
class Stats(Contract):
    """Blocking mode: a round's overhead O, measured by the rank."""

    group: str = bounded(max_len=MAX_NAME)
    rank: int = bounded(min=0, max=MAX_RANKS - 1)
    key: bytes = bounded(max_len=MAX_KEY)
    O: float = bounded(min=0)  # noqa: E741 - the seed's name
    epoch: int | None = bounded(None, min=0, max=MAX_COUNT)  # sent, not checked: a figure, not a state change


@dataclass(frozen=True, slots=True)
class Ready(Member):
    """A rank rolled back to checkpoint ``number``; ``consumed[src]`` is the last seq consumed from src."""

    number: int = bounded(min=-1, max=MAX_COUNT)
    consumed: list[int] = bounded(max_len=MAX_RANKS, min=-1, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class RecoverRead(Member):
    """A replacement reads a range of its lost checkpoint (decoded by the coordinator)."""

    offset: int = bounded(min=0, max=MAX_STATE)
    length: int = bounded(min=1, max=MAX_FRAME)


@dataclass(frozen=True, slots=True)
class AtStep(Member):
    """Blocking mode: the rank's step counter at a safe point."""

    step: int = bounded(min=0, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class Freeze(Member):
    """Blocking mode: frozen at the round's step, with this epoch's message totals."""

    number: int = bounded(min=1, max=MAX_COUNT)
    sent: int = bounded(min=0, max=MAX_COUNT)
    received: int = bounded(min=0, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class Barrier(Member):
    """Blocking mode: wait until every rank has committed ``number``."""

    number: int = bounded(min=1, max=MAX_COUNT)


# -- the backup (called by the coordinator) --------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupMeta(Contract):
    """A group's shape, as the backup needs it to hold its parity."""

    n: int = bounded(min=1, max=MAX_RANKS)
    m: int = bounded(min=1, max=MAX_SHARDS)
    block_size: int = bounded(min=MIN_BLOCK, max=MAX_BLOCK)
    mode: str = bounded("enhanced", max_len=16)
    epoch: int = bounded(0, min=0, max=MAX_COUNT)  # the group's epoch at the coordinator


@dataclass(frozen=True, slots=True)
class BackupApply(Contract):
    """Mirror one part of one rank's commit. Every part carries the checkpoint number
    (``tag``) and its index (``part``, 0 starts a commit); the backup stages the parts
    and applies them all at once when the last one arrives, which alone carries
    ``number`` (= ``tag``). A commit cut off half-way (the coordinator killed) is
    never applied in part."""

    group: str = bounded(max_len=MAX_NAME)
    meta: GroupMeta = bounded()
    rank: int = bounded(min=0, max=MAX_RANKS - 1)
    blocks: list[Any] = bounded(max_len=MAX_BLOCKS)  # [index, XOR delta] pairs
    number: int | None = bounded(None, min=0, max=MAX_COUNT)
    size: int = bounded(0, min=0, max=MAX_STATE)
    tag: int = bounded(0, min=0, max=MAX_COUNT)
    part: int = bounded(0, min=0, max=MAX_COUNT)

    def __post_init__(self) -> None:
        _check_blocks(self.blocks)
        if self.number is not None and self.number != self.tag:
            raise BadParams("number: the last part's number is its tag")

    def pairs(self, block_size: int) -> list[tuple[int, bytes]]:
        return _check_blocks(self.blocks, block_size)


@dataclass(frozen=True, slots=True)
class BackupPut(Contract):
    """One chunk of a whole copy of a group's parity; ``offset`` 0 starts one, ``final`` ends it."""

    group: str = bounded(max_len=MAX_NAME)
    meta: GroupMeta = bounded()
    numbers: list[int] = bounded(max_len=MAX_RANKS, min=-1, max=MAX_COUNT)
    sizes: list[int] = bounded(max_len=MAX_RANKS, min=-1, max=MAX_STATE)
    offset: int = bounded(min=0, max=MAX_STATE * (MAX_SHARDS + 1))
    data: bytes = bounded(max_len=MAX_FRAME)
    final: bool = False


@dataclass(frozen=True, slots=True)
class BackupEpoch(Contract):
    """The group's epoch moved (a rank failed): the backup keeps the coordinator's."""

    group: str = bounded(max_len=MAX_NAME)
    epoch: int = bounded(min=0, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class BackupDrop(Contract):
    """Forget a group (it finished or failed at the coordinator)."""

    group: str = bounded(max_len=MAX_NAME)


@dataclass(frozen=True, slots=True)
class BackupRead(Contract):
    """A range of a group's parity (the coordinator rebuilding after a restart)."""

    group: str = bounded(max_len=MAX_NAME)
    offset: int = bounded(min=0, max=MAX_STATE * (MAX_SHARDS + 1))
    length: int = bounded(min=1, max=MAX_FRAME)


# -- a rank's own server (called by its peers and the coordinator) ----------------------


@dataclass(frozen=True, slots=True)
class Msg(Contract):
    """An application message from rank ``src`` (sequence ``seq`` of the sender's sent table)."""

    src: int = bounded(min=0, max=MAX_RANKS - 1)
    seq: int = bounded(min=0, max=MAX_COUNT)
    epoch: int = bounded(min=0, max=MAX_COUNT)
    data: bytes = bounded(max_len=MAX_FRAME)


@dataclass(frozen=True, slots=True)
class Ack(Contract):
    """Rank ``src``'s committed checkpoint has consumed our messages up to ``upto``."""

    src: int = bounded(min=0, max=MAX_RANKS - 1)
    upto: int = bounded(min=-1, max=MAX_COUNT)
    epoch: int = bounded(0, min=0, max=MAX_COUNT)


@dataclass(frozen=True, slots=True)
class CkptRead(Contract):
    """A range of the rank's last committed checkpoint image."""

    offset: int = bounded(min=0, max=MAX_STATE)
    length: int = bounded(min=1, max=MAX_FRAME)
