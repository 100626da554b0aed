"""The Timeout rule at the coordinator (seed 003, II "Timeout Mechanism").

Theory of operation
-------------------
Each rank counts its completed checkpoints; all start at 0 (the seed's checkpoint 0
is taken at start-up). The *global checkpoint number* is the smallest of them: the
last checkpoint every rank has completed.

Enhanced mode (the seed's scheme). When a rank's buffer fills up or its timer fires
(the Timeout), it asks for checkpoint c+1, c being its last completed one
(``request``). The coordinator grants it if c+1 is at most one ahead of the global
number; otherwise the request is held until the global number is incremented,
which happens when the slowest rank completes (``done`` returns the ranks whose
held requests that released). So a rank is never more than one checkpoint ahead of
any other: the invariant behind partial message logging, which keeps only the
present and the previous interval's messages.

Blocking mode (Plank's N+1 parity, the seed's baseline). Checkpoints are global
rounds taken with zero messages in transit. A rank that wants checkpoint c+1 calls
``request``: from then on it *freezes*: it sends nothing, but its library keeps
receiving and acknowledging messages. With the request it reports how many messages
it has sent and received in total since start (``sent``, ``received``); while frozen
it reports new totals with ``report`` as messages arrive. The coordinator grants
round c+1 to every rank at once when all ranks have asked for c+1 and the sums of
the totals agree (sum sent == sum received: frozen ranks send nothing, so nothing is
left in transit). What a rank needs to honour this: stop sending when it asks, keep
receiving (and counting) while frozen, and count messages and their receipts the
same way on every rank. A rank blocked in ``recv`` when a round is wanted must be
able to ask too (it is at a library call, its state is consistent), otherwise a
round can wait forever for a rank that waits for a frozen sender.

All methods take ``now`` (seconds, any monotonic clock) so tests drive them with a
fake clock; ``held_seconds`` records how long each released request waited.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

ENHANCED, BLOCKING = "enhanced", "blocking"


@dataclass(slots=True)
class _Rank:
    completed: int = 0  # last completed checkpoint number
    taking: int | None = None  # number granted and not yet done
    held: int | None = None  # number requested and held
    held_since: float = 0.0
    sent: int = 0  # blocking mode: message totals reported while frozen
    received: int = 0


@dataclass
class GrantRule:
    ranks: int
    mode: str = ENHANCED
    _r: list[_Rank] = field(init=False, repr=False)
    granted_total: int = field(default=0, init=False)
    held_total: int = field(default=0, init=False)
    # how long each released request was held, most recent last (bounded)
    held_seconds: deque = field(default_factory=lambda: deque(maxlen=4096), init=False, repr=False)

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"a group needs at least one rank, got {self.ranks}")
        if self.mode not in (ENHANCED, BLOCKING):
            raise ValueError(f"mode must be {ENHANCED!r} or {BLOCKING!r}, got {self.mode!r}")
        self._r = [_Rank() for _ in range(self.ranks)]

    # -- read side -----------------------------------------------------------
    @property
    def global_number(self) -> int:
        """The last checkpoint completed by every rank."""
        return min(r.completed for r in self._r)

    def completed(self, rank: int) -> int:
        return self._rank(rank).completed

    def is_held(self, rank: int) -> bool:
        return self._rank(rank).held is not None

    def is_taking(self, rank: int) -> bool:
        return self._rank(rank).taking is not None

    def numbers(self) -> list[int]:
        """Every rank's checkpoint number, counting a granted one in progress."""
        return [r.taking if r.taking is not None else r.completed for r in self._r]

    def _rank(self, rank: int) -> _Rank:
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} is outside 0..{self.ranks - 1}")
        return self._r[rank]

    # -- events --------------------------------------------------------------
    def request(self, rank: int, number: int, now: float, sent: int = 0, received: int = 0) -> bool:
        """Rank asks for checkpoint ``number`` (its completed + 1). True: granted now.
        False: held; it appears in a later ``done``/``report`` result when granted.
        ``sent``/``received`` are the rank's message totals (used in blocking mode)."""
        r = self._rank(rank)
        if number != r.completed + 1:
            raise ValueError(f"rank {rank} completed {r.completed}, cannot ask for {number}")
        if r.taking is not None or r.held is not None:
            raise ValueError(f"rank {rank} already has checkpoint {r.taking or r.held} pending")
        r.sent, r.received = sent, received
        if self.mode == ENHANCED and number - self.global_number <= 1:
            r.taking = number
            self.granted_total += 1
            return True
        r.held, r.held_since = number, now
        self.held_total += 1
        if self.mode == BLOCKING:
            return rank in self._release_round(now)
        return False

    def done(self, rank: int, number: int, now: float) -> list[int]:
        """Rank completed checkpoint ``number`` (the coordinator applied its deltas).
        Returns the ranks whose held requests are granted as a result."""
        r = self._rank(rank)
        if r.taking != number:
            raise ValueError(f"rank {rank} was not granted checkpoint {number}")
        r.taking, r.completed = None, number
        if self.mode == BLOCKING:
            return []
        released = []
        g = self.global_number
        for i, other in enumerate(self._r):
            if other.held is not None and other.held - g <= 1:
                other.taking, other.held = other.held, None
                self.granted_total += 1
                self.held_seconds.append(now - other.held_since)
                released.append(i)
        return released

    def report(self, rank: int, sent: int, received: int, now: float) -> list[int]:
        """Blocking mode: a frozen rank's new message totals. Returns the ranks granted."""
        r = self._rank(rank)
        r.sent, r.received = sent, received
        if self.mode != BLOCKING:
            return []
        return self._release_round(now)

    def abort(self, rank: int) -> None:
        """The rank failed or rolled back: forget its pending request or checkpoint.
        Its completed number stays: that checkpoint is what it recovers to."""
        r = self._rank(rank)
        r.taking = r.held = None

    def set_completed(self, rank: int, number: int) -> None:
        """Seed the rank's completed number: the checkpoint it holds after a
        coordinator restart, or the level every rank is set to after a blocking
        round was cut short by a failure."""
        self._rank(rank).completed = number

    def _release_round(self, now: float) -> list[int]:
        want = self.global_number + 1
        if any(r.held != want for r in self._r):
            return []
        if sum(r.sent for r in self._r) != sum(r.received for r in self._r):
            return []
        for r in self._r:
            r.taking, r.held = want, None
            self.held_seconds.append(now - r.held_since)
        self.granted_total += self.ranks
        return list(range(self.ranks))

    def in_transit(self) -> int:
        """Blocking mode: messages still in transit by the reported totals."""
        return sum(r.sent for r in self._r) - sum(r.received for r in self._r)
