"""A checkpoint group at the coordinator: its state machine and its bookkeeping.

Theory of operation
-------------------
A *group* is one application of n ranks. The coordinator keeps, per group, the
parity of the ranks' last committed checkpoints (:class:`GroupCode`), one
:class:`Slot` per rank (session key, liveness, committed number, staged
deltas) and the Timeout rule (:class:`GrantRule`). Nothing here does I/O or
reads a clock: every method that needs the time takes ``now``, and the
daemon (``shoal.daemons.checkpoint.coordinator``) is the shell that turns RPC
calls into these calls, mirrors commits to the backup and fetches ranges
from the ranks.

The group's *phase* moves only through :meth:`Group.move`, along one table
(:data:`TRANSITIONS`, in the style of h11's ``_state.py``)::

    starting   --all_hold_zero-->   running     every rank committed checkpoint 0
    starting   --rank_lost------>   recovering  (the parity survives the loss)
    running    --rank_lost------>   recovering
    recovering --rank_lost------>   recovering  another loss during a recovery
    starting, running,
    recovering --too_many_lost-->   failed      more ranks lost than parity shards
    recovering --resume_running->   running     every rank rolled back
    recovering --resume_starting>   starting    (a failure before everyone held checkpoint 0)
    rebuilding --rebuilt_running>   running     a restarted coordinator has the parity again
    rebuilding --rebuilt_starting>  starting
    rebuilding --rank_lost------>   failed      a loss before the parity is rebuilt
    starting   --restarted------>   rebuilding  a rank holding a checkpoint joins a group
                                                that has none here (this coordinator restarted)
    starting,
    rebuilding --state_lost----->   failed      a rank lost its state while the coordinator was
                                                away, or the ranks did not all come back
    running    --all_finished--->   finished

``rebuilding`` is where a group starts when a rank joins a coordinator that
does not know it while holding a checkpoint (the coordinator restarted);
every other group starts in ``starting``. ``finished`` and ``failed`` are
final. Any other (phase, event) pair is a bug and raises
:class:`LocalProtocolError`.

Every change a rank must see bumps ``version`` and calls ``on_change`` (the
daemon wakes its long polls there). Refusals of a rank's call raise
:class:`Refusal` with a code of :data:`shoal.protocol.checkpoint.ERROR_CODES`.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.core.checkpoint.grant import BLOCKING, ENHANCED, GrantRule
from shoal.core.checkpoint.groupcode import GroupCode
from shoal.core.checkpoint.overhead import model
from shoal.protocol.contract import BadParams
from shoal.protocol.errors import LocalProtocolError

__all__ = ["PHASES", "EVENTS", "TRANSITIONS", "Refusal", "Slot", "Group", "GroupTable", "STATS_SAMPLES"]

#: O, L and R samples kept per group for the model.
STATS_SAMPLES = 256

STARTING, RUNNING, RECOVERING, REBUILDING, FINISHED, FAILED = (
    "starting", "running", "recovering", "rebuilding", "finished", "failed")
PHASES = (STARTING, RUNNING, RECOVERING, REBUILDING, FINISHED, FAILED)

ALL_HOLD_ZERO, RANK_LOST, TOO_MANY_LOST = "all_hold_zero", "rank_lost", "too_many_lost"
RESUME_RUNNING, RESUME_STARTING = "resume_running", "resume_starting"
REBUILT_RUNNING, REBUILT_STARTING = "rebuilt_running", "rebuilt_starting"
ALL_FINISHED, RESTARTED, STATE_LOST = "all_finished", "restarted", "state_lost"
EVENTS = (ALL_HOLD_ZERO, RANK_LOST, TOO_MANY_LOST, RESUME_RUNNING, RESUME_STARTING, REBUILT_RUNNING,
          REBUILT_STARTING, ALL_FINISHED, RESTARTED, STATE_LOST)
#: Phases a group never leaves; the table frees such a group after a grace period.
OVER = (FINISHED, FAILED)

#: ``(phase, event) -> new phase``: every move a group's phase can make.
TRANSITIONS: dict[tuple[str, str], str] = {
    (STARTING, ALL_HOLD_ZERO): RUNNING,
    (STARTING, RANK_LOST): RECOVERING,
    (RUNNING, RANK_LOST): RECOVERING,
    (RECOVERING, RANK_LOST): RECOVERING,
    (STARTING, TOO_MANY_LOST): FAILED,
    (RUNNING, TOO_MANY_LOST): FAILED,
    (RECOVERING, TOO_MANY_LOST): FAILED,
    (RECOVERING, RESUME_RUNNING): RUNNING,
    (RECOVERING, RESUME_STARTING): STARTING,
    (REBUILDING, REBUILT_RUNNING): RUNNING,
    (REBUILDING, REBUILT_STARTING): STARTING,
    (REBUILDING, RANK_LOST): FAILED,
    (RUNNING, ALL_FINISHED): FINISHED,
    (STARTING, RESTARTED): REBUILDING,
    (STARTING, STATE_LOST): FAILED,
    (REBUILDING, STATE_LOST): FAILED,
}


class Refusal(Exception):
    """A rank's call refused with a domain error code (the daemon answers it as such)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class Slot:
    """One rank of a group, as the coordinator knows it."""

    key: bytes | None = None
    alive: bool = False
    addr: tuple[str, int] | None = None  # the rank's own RPC server
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
    ran: bool = False  # the rank said at join that it has run main (its state left checkpoint 0)
    fresh: bool = True  # its join named no earlier session: a new process
    log_bytes: int = 0
    log_entries: int = 0

    def unstage(self) -> None:
        self.staged, self.staged_bytes, self.staged_number = {}, 0, None


@dataclass(eq=False)
class Round:
    """Blocking mode: the global round being agreed on."""

    pending: bool = False
    target: int | None = None  # the step every rank freezes at, once all have reported
    reported: dict[int, int] = field(default_factory=dict)
    opened: float = 0.0

    def clear(self) -> None:
        self.pending, self.target, self.reported = False, None, {}


class Group:
    """One application's checkpoint state at the coordinator (see the module docstring)."""

    def __init__(self, name: str, n: int, mode: str, block_size: int, m: int, *, phase: str = STARTING,
                 on_change: Callable[[], None] | None = None) -> None:
        if phase not in (STARTING, REBUILDING):
            raise LocalProtocolError(f"a group starts in {STARTING} or {REBUILDING}, not {phase}")
        self.name, self.n, self.mode, self.block_size, self.m = name, n, mode, block_size, m
        self.code = GroupCode(n, m, block_size)
        self.slots = [Slot() for _ in range(n)]
        self.rule = GrantRule(n, mode)
        self.epoch = 0
        self.phase = phase
        self.lost: set[int] = set()
        self.version = 0
        self.on_change = on_change
        self.recovery_started = 0.0
        self.resume_phase = STARTING
        self.consumed: list[list[int]] = []
        self.round = Round()
        self.O: deque[float] = deque(maxlen=STATS_SAMPLES)  # noqa: E741 - the seed's names
        self.L: deque[float] = deque(maxlen=STATS_SAMPLES)
        self.R: deque[float] = deque(maxlen=STATS_SAMPLES)
        self.created = 0.0  # when this coordinator created it (the rebuild deadline counts from here)
        self.over_since: float | None = None  # when it finished or failed (it is freed a grace later)
        self.reason = ""  # why it failed, in words (the log line, the view, GroupFailed)
        self.failure = ""  # ... and as the event that failed it (the metric's label)

    # -- the state machine -----------------------------------------------------------
    def move(self, event: str) -> str:
        """Take ``event``; the new phase (LocalProtocolError if the table has no such move)."""
        try:
            self.phase = TRANSITIONS[self.phase, event]
        except KeyError:
            raise LocalProtocolError(f"group {self.name}: no move from {self.phase} on {event}") from None
        return self.phase

    def changed(self) -> None:
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    @property
    def shape(self) -> tuple[int, str, int, int]:
        return self.n, self.mode, self.block_size, self.m

    def all_hold_a_checkpoint(self) -> bool:
        return all(s.number >= 0 for s in self.slots)

    def _maybe_all_hold_zero(self) -> None:
        if self.phase == STARTING and self.all_hold_a_checkpoint():
            self.move(ALL_HOLD_ZERO)

    # -- sessions ------------------------------------------------------------------
    def member(self, rank: int, key: bytes, epoch: int | None, now: float) -> Slot:
        """The rank's slot if ``key`` is its session (and ``epoch`` current, when given)."""
        if rank >= self.n:
            raise BadParams(f"rank: must be <= {self.n - 1}")
        slot = self.slots[rank]
        if slot.key is None or not secrets.compare_digest(slot.key, key):
            raise Refusal("bad_identity", f"the session key is not rank {rank}'s")
        if not slot.alive:
            raise Refusal("bad_identity", f"rank {rank}'s session was declared failed; join again")
        if epoch is not None and epoch != self.epoch:
            raise Refusal("stale_epoch", f"the group is at epoch {self.epoch}")
        slot.last_seen = now
        return slot

    def admit(self, rank: int, old_key: bytes, new_key: bytes, addr: tuple[str, int], have: int, epoch: int,
              now: float, *, running: bool = False, finished: bool = False) -> tuple[bool, bool]:
        """A join: (the rank recovers a lost checkpoint, every rank is back for a rebuild).

        ``running``/``finished``: the rank has run (returned from) its main."""
        if self.phase in OVER:
            why = f": {self.reason}" if self.reason else ""
            raise Refusal("group_over", f"group {self.name!r} has {self.phase}{why}; it is not created again")
        slot = self.slots[rank]
        same_session = slot.alive and slot.key is not None and secrets.compare_digest(slot.key, old_key)
        if slot.alive and not same_session:
            raise Refusal("rank_taken", f"rank {rank} of {self.name!r} is alive")
        if slot.key is not None and rank not in self.lost and self.phase != REBUILDING and not same_session:
            raise Refusal("rank_taken", f"rank {rank} of {self.name!r} has a session")
        if (self.phase == STARTING and have >= 0 and slot.number < 0 and rank not in self.lost
                and not any(s.number >= 0 for s in self.slots)):
            # A rank holding a checkpoint, in a group this coordinator has no
            # checkpoint of: we restarted, and a fresh rank joined first.
            self.move(RESTARTED)
        slot.key, slot.alive, slot.addr, slot.last_seen = new_key, True, addr, now
        slot.ran, slot.fresh = running, not old_key
        recover = rank in self.lost and slot.number >= 0
        rebuild = False
        if self.phase == REBUILDING:
            slot.number, slot.finished = have, finished
            self.epoch = max(self.epoch, epoch)
            if all(s.alive for s in self.slots):
                rebuild = self._check_rebuild()
        elif self.phase == STARTING and have >= 0 and slot.number < 0 and rank not in self.lost:
            # It holds a checkpoint from before a restart, the others started afresh here.
            self.fail(STATE_LOST, f"rank {rank} holds checkpoint {have} from before a coordinator restart, "
                                  "and the group started again without it")
        elif rank in self.lost and slot.number < 0:
            self.lost.discard(rank)  # nothing to recover: it starts afresh
        self.changed()
        return recover, rebuild

    def _check_rebuild(self) -> bool:
        """Every rank is back after a restart: whether the parity can be rebuilt (else the group fails)."""
        # A rank holding no checkpoint that had a session before is still taking its
        # checkpoint 0 (its commit was cut off by the restart): its state is its
        # initial one, and it takes checkpoint 0 again. A new process holding none,
        # while the others have run, replaces a rank whose state is lost with the
        # coordinator's record of it.
        # (A replacement that was reading its image says it ran: its state is not its initial one.)
        moved_on = any(s.ran or s.number > 0 for s in self.slots)
        fresh = [i for i, s in enumerate(self.slots) if s.number < 0 and (s.ran or (s.fresh and moved_on))]
        if fresh:
            self.fail(STATE_LOST, f"rank(s) {fresh} came back without a checkpoint while the coordinator "
                                  "was away (their state is lost)")
            return False
        return True

    def fail(self, event: str, reason: str) -> None:
        """Fail the group for ``reason`` (an event of the table that leads to failed)."""
        self.move(event)
        self.reason, self.failure = reason, event

    def over(self, now: float) -> None:
        """The group finished or failed: staged deltas are dropped now, the group (and its
        parity) a grace later (:meth:`GroupTable.reap`)."""
        if self.over_since is None:
            self.over_since = now
            for s in self.slots:
                s.unstage()

    def lose(self, rank: int, now: float) -> str | None:
        """The rank failed: the group's new phase, or None if it was finished or failed already."""
        self.slots[rank].alive = False
        if self.phase in (FINISHED, FAILED):
            return None
        if self.phase != RECOVERING:
            self.resume_phase = RUNNING if self.phase == RUNNING else STARTING
            self.recovery_started = now
        self.lost.add(rank)
        if self.phase != REBUILDING and len(self.lost) > self.m:
            self.fail(TOO_MANY_LOST, f"more ranks failed than the parity survives: ranks {sorted(self.lost)} "
                                     f"lost at once, parity shards {self.m}")
            self.changed()
            return self.phase
        self.move(RANK_LOST)
        if self.phase == FAILED:  # lost while rebuilding
            self.reason = f"rank {rank} lost while the parity was being rebuilt after a coordinator restart"
            self.failure = RANK_LOST
            self.changed()
            return self.phase
        self.epoch += 1
        for i, s in enumerate(self.slots):
            s.unstage()
            s.finished = False
            self.rule.abort(i)
        self.round.clear()
        self.changed()
        return self.phase

    def ready(self, rank: int, number: int, consumed: list[int], now: float) -> float | None:
        """The rank rolled back; R in seconds if that was the last one and the group resumed."""
        slot = self.slots[rank]
        if len(consumed) != self.n:
            raise BadParams("consumed: one int per rank")
        if number != slot.number:
            raise BadParams(f"number: rank {rank} holds checkpoint {number}, the parity has {slot.number}")
        slot.consumed = consumed
        slot.ready_epoch = self.epoch
        self.lost.discard(rank)
        self.changed()
        if not (self.phase == RECOVERING and all(s.alive and s.ready_epoch == self.epoch for s in self.slots)):
            return None
        self.consumed = [s.consumed for s in self.slots]
        if self.mode == BLOCKING:
            # A failure during a round leaves some ranks one checkpoint ahead;
            # rounds are global, so the next one is numbered after the highest
            # (a checkpoint number only labels an image; the parity has none).
            top = max(self.rule.completed(i) for i in range(self.n))
            for i in range(self.n):
                self.rule.set_completed(i, top)
        self.move(RESUME_RUNNING if self.resume_phase == RUNNING else RESUME_STARTING)
        self._maybe_all_hold_zero()
        took = now - self.recovery_started
        self.R.append(took)
        self.changed()
        return took

    def survivors_ready(self) -> bool:
        return all(s.alive and s.ready_epoch == self.epoch for i, s in enumerate(self.slots) if i not in self.lost)

    def rebuilt(self) -> bool:
        """The parity is whole again after a coordinator restart; True if that finished the group
        (every rank had returned from main while the coordinator was away)."""
        top = max(max(s.number, 0) for s in self.slots)
        for i, s in enumerate(self.slots):
            # Blocking rounds are global: a restart during a round leaves some ranks
            # holding round c+1 and others c ([4, 5, 5, 5]); the next round is
            # numbered after the highest (as after a rollback), or no rank could
            # ever be granted one again.
            self.rule.set_completed(i, top if self.mode == BLOCKING else max(s.number, 0))
        self.move(REBUILT_RUNNING if self.all_hold_a_checkpoint() else REBUILT_STARTING)
        done = self.phase == RUNNING and all(s.finished for s in self.slots)
        if done:
            self.move(ALL_FINISHED)
        self.changed()
        return done

    def finish(self, rank: int) -> bool:
        """The rank's main returned; True when that finished the group."""
        self.slots[rank].finished = True
        done = all(s.finished for s in self.slots) and self.phase == RUNNING
        if done:
            self.move(ALL_FINISHED)
        self.changed()
        return done

    # -- checkpoints ---------------------------------------------------------------
    def request(self, rank: int, number: int, now: float) -> tuple[bool, bool]:
        """Enhanced mode: (granted, a new request the Timeout rule decided on)."""
        slot = self.slots[rank]
        if self.phase != RUNNING or self.mode != ENHANCED or slot.staged_number is not None:
            raise Refusal("not_granted", f"group is {self.phase} ({self.mode})")
        if self.rule.is_taking(rank) or self.rule.is_held(rank):
            return self.rule.is_taking(rank), False
        try:
            granted = self.rule.request(rank, number, now)
        except ValueError as exc:
            raise BadParams(f"number: {exc}") from None
        if granted:
            slot.granted_at = now
        self.changed()
        return granted, True

    def check_may_write(self, rank: int, number: int) -> None:
        slot = self.slots[rank]
        if number == 0 and slot.number < 0 and self.phase in (STARTING, RUNNING):
            return  # checkpoint 0 needs no grant
        if self.phase != RUNNING or not self.rule.is_taking(rank) or self.rule.numbers()[rank] != number:
            raise Refusal("not_granted", f"rank {rank} has no grant for checkpoint {number}")

    def stage(self, rank: int, number: int, blocks: list[tuple[int, bytes]], max_state_bytes: int) -> int:
        """Stage deltas of checkpoint ``number``; how many blocks."""
        self.check_may_write(rank, number)
        limit = -(-max_state_bytes // self.block_size)
        if any(k >= limit for k, _ in blocks):
            raise BadParams("blocks: an index beyond max_state_bytes")
        slot = self.slots[rank]
        slot.staged_number = number
        for k, d in blocks:
            old = slot.staged.get(k)
            slot.staged_bytes += len(d) - (len(old) if old is not None else 0)
            slot.staged[k] = d
        if slot.staged_bytes > max_state_bytes:
            slot.unstage()
            raise Refusal("too_many", "staged deltas exceed max_state_bytes")
        return len(blocks)

    def staged_for_commit(self, rank: int, number: int) -> list[tuple[int, bytes]]:
        """The blocks a commit of ``number`` would apply, in order."""
        slot = self.slots[rank]
        self.check_may_write(rank, number)
        if slot.staged_number not in (None, number):
            raise BadParams("number: deltas were staged for another checkpoint")
        return sorted(slot.staged.items())

    def check_within(self, rank: int, blocks: list[tuple[int, bytes]], size: int) -> None:
        """Every block lies inside the checkpoint being committed (or the last one)."""
        for k, _d in blocks:
            if k * self.block_size >= max(size, self.slots[rank].size):
                raise BadParams(f"blocks: block {k} lies beyond the checkpoint")

    def commit(self, rank: int, number: int, size: int, blocks: list[tuple[int, bytes]], now: float) -> list[float]:
        """Apply and record a checkpoint in one go; the latencies L it completed."""
        self.check_may_write(rank, number)
        slot = self.slots[rank]
        slot.unstage()
        for k, d in blocks:
            self.code.apply(rank, k, d)
        self.code.set_size(rank, size)
        slot.number, slot.size = number, size
        latencies = []
        if number > 0:
            if self.mode == ENHANCED:
                latencies.append(now - slot.granted_at)
            for i in self.rule.done(rank, number, now):
                self.slots[i].granted_at = now
            if self.mode == BLOCKING and self.rule.global_number == number:
                latencies.append(now - self.round.opened)
                self.round.clear()
        else:
            self._maybe_all_hold_zero()
        self.L.extend(latencies)
        self.changed()
        return latencies

    # -- blocking rounds -----------------------------------------------------------
    def propose(self, now: float) -> None:
        if self.mode != BLOCKING or self.phase != RUNNING:
            raise Refusal("not_granted", f"group is {self.phase} ({self.mode})")
        if not self.round.pending:
            self.round = Round(pending=True, opened=now)
            self.changed()

    def at_step(self, rank: int, step: int) -> list[int] | None:
        """[target step, round number] once every rank has reported its step."""
        r = self.round
        if not r.pending:
            return None
        if r.target is None:
            r.reported[rank] = step
            if len(r.reported) == self.n:
                r.target = max(r.reported.values()) + 1
                self.changed()
        if r.target is None:
            return None
        # A round is one number for every rank: the global number + 1.
        return [r.target, self.rule.global_number + 1]

    def freeze(self, rank: int, number: int, sent: int, received: int, now: float) -> bool | None:
        """The rank is frozen at the round's step: whether the request is granted (None: reported again)."""
        if self.mode != BLOCKING or self.phase != RUNNING or self.round.target is None:
            raise Refusal("not_granted", "no blocking round is due")
        if not (self.rule.is_held(rank) or self.rule.is_taking(rank)):
            try:
                granted = self.rule.request(rank, number, now, sent, received)
            except ValueError as exc:
                raise BadParams(f"number: {exc}") from None
            self.changed()  # the other frozen ranks report again: their totals may have moved
            return granted
        if self.rule.report(rank, sent, received, now):
            self.changed()
        return None

    # -- views -----------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        v: dict[str, Any] = {
            "version": self.version,
            "epoch": self.epoch,
            "phase": self.phase,
            "lost": sorted(self.lost),
            "numbers": self.rule.numbers(),
            "taking": [i for i in range(self.n) if self.rule.is_taking(i)],
            "round": [self.round.pending, self.round.target],
            "global": self.rule.global_number,
        }
        if self.reason:
            v["reason"] = self.reason
        if self.phase in (RUNNING, STARTING):
            v["addrs"] = [list(s.addr) if s.addr else None for s in self.slots]
            v["consumed"] = self.consumed
        return v

    def model(self, mtbf: float) -> dict[str, float]:
        O = sum(self.O) / len(self.O) if self.O else 0.0  # noqa: E741 - the seed's names
        L = sum(self.L) / len(self.L) if self.L else 0.0
        R = sum(self.R) / len(self.R) if self.R else 0.0
        out = {"O": O, "L": L, "R": R, "T_opt": 0.0, "gamma": 0.0, "r": 0.0}
        if O > 0:
            m = model(O, L, R, mtbf)
            out.update(T_opt=m.T_opt, gamma=m.gamma, r=m.r)
        return out

    def status(self, mtbf: float) -> dict[str, Any]:
        m = self.model(mtbf)
        return {
            "group": self.name, "n": self.n, "mode": self.mode, "m": self.m, "phase": self.phase,
            "epoch": self.epoch, "numbers": self.rule.numbers(), "alive": [s.alive for s in self.slots],
            "parity_bytes": self.code.nbytes, "samples": [len(self.O), len(self.L), len(self.R)], **m,
            "reason": self.reason,
            "recommended_interval": m["T_opt"],
        }


class GroupTable:
    """Every group a coordinator holds, bounded in number and size.

    A group that finished or failed stays ``grace`` seconds (late calls of its
    ranks are answered: ``group_over`` for a join, its final view for a watch)
    and is then forgotten with its parity (:meth:`reap`). ``max_groups``
    counts the live groups only."""

    def __init__(self, max_groups: int, max_ranks: int, on_change: Callable[[Group], None] | None = None,
                 grace: float = 5.0) -> None:
        self.max_groups, self.max_ranks, self.grace = max_groups, max_ranks, grace
        self.groups: dict[str, Group] = {}
        self._on_change = on_change

    def __iter__(self):
        return iter(list(self.groups.values()))

    def __len__(self) -> int:
        return len(self.groups)

    def live(self) -> int:
        return sum(g.phase not in OVER for g in self.groups.values())

    def get(self, name: str) -> Group:
        g = self.groups.get(name)
        if g is None:
            raise Refusal("unknown_group", f"no group {name!r} here")
        return g

    def open(self, name: str, n: int, mode: str, block_size: int, m: int, have: int, now: float = 0.0) -> Group:
        """The group a join names, created if new (the caller :meth:`discard` s a new group
        whose first join is refused: a refused join creates nothing)."""
        if n > self.max_ranks:
            raise BadParams(f"n: must be <= {self.max_ranks}")
        g = self.groups.get(name)
        if g is None:
            if self.live() >= self.max_groups:
                raise Refusal("too_many", f"already {self.max_groups} live groups")
            # A rank holding a checkpoint joins a coordinator that does not know
            # its group: the coordinator restarted under running ranks.
            g = Group(name, n, mode, block_size, m, phase=REBUILDING if have >= 0 else STARTING)
            g.created = now
            if self._on_change is not None:
                g.on_change = _bind(self._on_change, g)
            self.groups[name] = g
            return g
        if g.shape != (n, mode, block_size, m):
            raise Refusal("group_mismatch",
                          f"group {name!r} has n={g.n} mode={g.mode} block={g.block_size} m={g.m}")
        return g

    def discard(self, g: Group) -> None:
        """Forget ``g`` if no rank ever joined it (its first join was refused)."""
        if self.groups.get(g.name) is g and all(s.key is None for s in g.slots):
            del self.groups[g.name]

    def reap(self, now: float) -> list[Group]:
        """Forget the groups over for longer than the grace; those forgotten."""
        gone = [g for g in self.groups.values() if g.over_since is not None and now - g.over_since >= self.grace]
        for g in gone:
            del self.groups[g.name]
        return gone


def _bind(fn: Callable[[Group], None], g: Group) -> Callable[[], None]:
    return lambda: fn(g)
