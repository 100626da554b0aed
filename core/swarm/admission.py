"""Who gets a connection slot: the admission and eviction policy, with no I/O.

A torrent keeps at most ``hard`` connections and dials up to ``soft``. A
handshaken newcomer that arrives at the soft limit replaces the *least useful*
connection, ranked by class, then by how long it has moved no block:

0. a seed, when we are seeding too (two seeds have nothing to trade);
1. a peer not interested either way (neither wants the other's data);
2. a peer that has moved no block in either direction for ``idle_after`` s.

Anything else is useful and never evicted. With nobody to evict the newcomer
is still admitted below the hard limit, and refused at it. The caller passes a
:class:`Candidate` view of each live connection and ``now``; nothing here
reads a clock or touches a socket.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Candidate", "IDLE_AFTER", "admit", "least_useful"]

# A peer that has moved no block either way for this long may be evicted.
IDLE_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the policy needs to know of one live connection."""

    key: Hashable
    is_seed: bool  # it has every piece
    peer_interested: bool  # it wants our data
    am_interested: bool  # we want its data
    last_payload: float  # when a block last moved either way (or it joined)


def _eviction_class(c: Candidate, now: float, seeding: bool, idle_after: float) -> int | None:
    if seeding and c.is_seed:
        return 0
    if not c.peer_interested and not c.am_interested:
        return 1
    if now - c.last_payload >= idle_after:
        return 2
    return None


def least_useful(candidates: Iterable[Candidate], now: float, *, seeding: bool,
                 idle_after: float = IDLE_AFTER) -> Hashable | None:
    """The key of the connection to evict for a newcomer, or None if all are useful."""
    best: tuple[int, float] | None = None
    victim = None
    for c in candidates:
        cls = _eviction_class(c, now, seeding, idle_after)
        if cls is not None and (best is None or (cls, c.last_payload) < best):
            best, victim = (cls, c.last_payload), c.key
    return victim


def admit(live: int, soft: int, hard: int, victim: Hashable | None) -> Literal["admit", "evict", "refuse"]:
    """What to do with a newcomer given ``live`` connections and the would-be victim."""
    if live < soft:
        return "admit"
    if victim is not None:
        return "evict"
    return "admit" if live < hard else "refuse"
