"""Capped exponential back-off for retrying a failing tracker (or anything else).

``Backoff(first, cap)``: after the n-th failure in a row the next try waits
``min(cap, first * 2**(n-1))`` seconds; a success starts over at ``first``.
Pure arithmetic, no clock: the caller sleeps.
"""

from __future__ import annotations


class Backoff:
    __slots__ = ("first", "cap", "failures")

    def __init__(self, first: float, cap: float) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"need 0 < first <= cap, got first={first} cap={cap}")
        self.first = first
        self.cap = cap
        self.failures = 0

    def failed(self) -> float:
        """Record a failure; the seconds to wait before the next try."""
        self.failures += 1
        # 2**60 * first is past any cap; stop growing the exponent there.
        return min(self.cap, self.first * 2.0 ** min(self.failures - 1, 60))

    def succeeded(self) -> None:
        """Record a success: the next failure waits ``first`` again."""
        self.failures = 0
