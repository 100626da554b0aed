"""Byte rates over a sliding window, for one direction of one peer.

Theory of operation
-------------------
Time is cut into fixed buckets (1 s by default) and a :class:`RateMeter`
keeps one ``[bucket_number, bytes]`` pair per bucket that saw traffic, in a
deque, plus the running sum of the bytes they hold. :meth:`RateMeter.add`
adds to the newest bucket or appends one; both it and :meth:`RateMeter.rate`
first drop the buckets that slid out of the window from the left. Every
bucket is appended once and dropped once, so both calls are O(1) amortised
and the memory is at most ``window / bucket`` pairs.

The rate is the window's bytes divided by the window, except for a meter
younger than the window: it divides by its age (at least one bucket), so a
peer that has sent 1 MB in its first 2 s reads as 512 KB/s, not 52 KB/s.

There is no clock: every call takes ``now`` (monotonic seconds). A ``now``
earlier than the newest bucket (a caller's clock going backwards) counts into
the newest bucket instead of corrupting the order.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["RateMeter"]


class RateMeter:
    """Bytes per second over the last ``window`` seconds, in ``bucket``-second steps."""

    __slots__ = ("window", "bucket", "total", "_nbuckets", "_buckets", "_sum", "_start")

    def __init__(self, window: float = 20.0, *, bucket: float = 1.0) -> None:
        if not window > 0 or not bucket > 0 or bucket > window:
            raise ValueError(f"need 0 < bucket <= window, got window={window!r} bucket={bucket!r}")
        self.window = float(window)
        self.bucket = float(bucket)
        #: every byte ever added (for the wire protocol's uploaded/downloaded counters)
        self.total = 0
        self._nbuckets = max(1, round(window / bucket))
        self._buckets: deque[list[int]] = deque()
        self._sum = 0
        self._start: float | None = None

    def _expire(self, slot: int) -> None:
        oldest = slot - self._nbuckets  # this bucket and older ones are out of the window
        buckets = self._buckets
        while buckets and buckets[0][0] <= oldest:
            self._sum -= buckets.popleft()[1]

    def add(self, nbytes: int, now: float) -> None:
        """Count ``nbytes`` transferred at time ``now``."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        slot = math.floor(now / self.bucket)
        if self._start is None:
            self._start = now
        self.total += nbytes
        buckets = self._buckets
        if buckets and buckets[-1][0] >= slot:
            buckets[-1][1] += nbytes
        else:
            buckets.append([slot, nbytes])
            self._expire(slot)
        self._sum += nbytes

    def rate(self, now: float) -> float:
        """Bytes per second over the window ending at ``now``."""
        if self._start is None:
            return 0.0
        self._expire(math.floor(now / self.bucket))
        span = min(self.window, max(self.bucket, now - self._start))
        return self._sum / span

    def __repr__(self) -> str:
        return f"RateMeter(window={self.window}, total={self.total}, in_window={self._sum})"
