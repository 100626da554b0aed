"""Graded, expiring bans: who may not talk to us about a torrent, and until when.

An offence is recorded against a *peer* of one torrent, never against an
address as a whole: behind a NAT or on a shared host several clients use one
IP, and one buggy client must not lock the others out. A peer is named by
keys of the form ``(info_hash, ip, tag)`` where ``tag`` is its listening port
(when known: we dialled it, or its BEP 10 handshake said) and its peer_id;
an offence is recorded under each of its keys, and a connection is refused
when any of its keys is banned.

Each offence has a weight in points (a protocol error 1, certain bad data 2).
Points accumulate per key; reaching ``BAN_POINTS`` bans the key for
``base * 2**(bans so far)`` seconds, capped at ``longest``, and resets the
points. So a first protocol error only closes the connection; a second one
bans for ``base`` (60 s), the next for 2 min, then 4, ... A key that has
been quiet for ``forget_after`` seconds after its ban ended is forgotten.

No I/O, no clock: ``now`` is an argument. At most ``max_keys`` keys are kept
(the oldest offender is dropped first), so a flood of spoofed identities
costs bounded memory.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

__all__ = ["BAN_POINTS", "BanList"]

BAN_POINTS = 2


@dataclass(slots=True)
class _Record:
    points: int = 0
    bans: int = 0  # bans served so far: the next lasts base * 2**bans
    until: float = 0.0  # banned while now < until
    last: float = 0.0  # time of the last offence
    reason: str = ""


class BanList:
    def __init__(self, *, base: float = 60.0, longest: float = 24 * 3600.0, forget_after: float = 3600.0,
                 max_keys: int = 10_000) -> None:
        if not (base > 0 and longest >= base and forget_after > 0 and max_keys > 0):
            raise ValueError("base, longest, forget_after and max_keys must be > 0 (longest >= base)")
        self.base = base
        self.longest = longest
        self.forget_after = forget_after
        self.max_keys = max_keys
        self._records: dict[Hashable, _Record] = {}

    def offend(self, keys: Iterable[Hashable], reason: str, now: float, points: int = 1) -> float | None:
        """Record an offence under every key; the ban's end time if one (now) follows, else None."""
        until: float | None = None
        for key in keys:
            rec = self._records.pop(key, None)
            if rec is None or self._stale(rec, now):
                rec = _Record()
            self._records[key] = rec  # most recent offender last
            rec.last = now
            rec.reason = reason
            rec.points += points
            if rec.points >= BAN_POINTS:
                rec.points = 0
                rec.until = max(rec.until, now + min(self.longest, self.base * 2 ** rec.bans))
                rec.bans += 1
                until = rec.until if until is None else max(until, rec.until)
        while len(self._records) > self.max_keys:
            del self._records[next(iter(self._records))]
        return until

    def banned(self, keys: Iterable[Hashable], now: float) -> str | None:
        """The reason if any of ``keys`` is banned at ``now``, else None."""
        for key in keys:
            rec = self._records.get(key)
            if rec is not None and now < rec.until:
                return rec.reason
        return None

    def offences(self, key: Hashable, now: float) -> tuple[int, int]:
        """(points pending, bans served) for one key, for tests and status."""
        rec = self._records.get(key)
        if rec is None or self._stale(rec, now):
            return (0, 0)
        return (rec.points, rec.bans)

    def _stale(self, rec: _Record, now: float) -> bool:
        return now >= max(rec.until, rec.last) + self.forget_after

    def __len__(self) -> int:
        return len(self._records)
