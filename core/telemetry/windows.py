"""Fixed-length windows over node samples: the mean and std of every metric.

Theory of operation
-------------------
The seed aggregates node metrics over 15-minute windows (Nagios labels a
node every 15 minutes) and describes each window by the average and the
standard deviation of every metric. :class:`WindowAccumulator` does exactly
that, sans-IO: ``add(t, sample)`` with the time passed in, and it returns the
windows that ``t`` closed.

Windows are aligned to multiples of their length since the epoch (a 15 min
window starts at :00, :15, ...), so the windows of every node in a cluster
line up and a label given for a time range maps to the same windows
everywhere. A sample belongs to the window ``[start, start + length)`` that
holds its time. A window closes when a sample arrives at or after its end,
or by :meth:`flush` (called with the current time by a timer, so a quiet
collector still closes windows). A window with fewer than ``min_samples``
samples is dropped, not emitted: a daemon that started in the last seconds
of a window would otherwise produce a window of statistics over one or two
samples.

Statistics use Welford's running mean and M2 per metric (numerically stable
for long windows of large values like byte counters), with the population
standard deviation (``ddof = 0``). A metric missing from some samples (a
sensor that vanished) is summarised over the samples that had it. Feature
names are ``<metric>:mean`` and ``<metric>:std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Window:
    start: float
    end: float
    n_samples: int
    features: dict[str, float]


@dataclass(slots=True)
class _Stat:
    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.n) if self.n else 0.0


@dataclass
class WindowAccumulator:
    length: float
    min_samples: int = 1
    _start: float | None = None
    _count: int = 0
    _stats: dict[str, _Stat] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.length > 0:
            raise ValueError("window length must be positive")

    def window_start(self, t: float) -> float:
        return math.floor(t / self.length) * self.length

    @property
    def open_start(self) -> float | None:
        return self._start

    @property
    def open_samples(self) -> int:
        return self._count

    def add(self, t: float, sample: dict[str, float]) -> list[Window]:
        """Add one sample taken at ``t``; return the window it closed, if any."""
        closed = self.flush(t)
        if self._start is None:
            self._start = self.window_start(t)
        self._count += 1
        for k, v in sample.items():
            if v != v or v in (math.inf, -math.inf):  # NaN/inf from a broken sensor
                continue
            st = self._stats.get(k)
            if st is None:
                st = self._stats[k] = _Stat()
            st.add(float(v))
        return closed

    def flush(self, now: float) -> list[Window]:
        """Close the open window if ``now`` is at or past its end."""
        if self._start is None or now < self._start + self.length:
            return []
        w = self._close()
        return [w] if w is not None else []

    def _close(self) -> Window | None:
        assert self._start is not None
        start, count, stats = self._start, self._count, self._stats
        self._start, self._count, self._stats = None, 0, {}
        if count < self.min_samples:
            return None
        features: dict[str, float] = {}
        for k in sorted(stats):
            features[f"{k}:mean"] = stats[k].mean
            features[f"{k}:std"] = stats[k].std
        return Window(start, start + self.length, count, features)


class Disturbances:
    """Time ranges in which the daemon itself disturbed the node (training, installing a model,
    the local training of a federated round).

    A window that overlaps one is the daemon's doing, not the node's: it is kept out of
    training data and is not scored (no alarm). :meth:`begin` opens a range at a time,
    :meth:`end` closes the newest open one ``settle`` seconds after the given time (the model loading, memory
    settling: one window in the daemon). :meth:`put` sets the range of a named disturbance
    another process reports (the Flower ClientApp's fit: open while it runs, then closed),
    replacing what was known of it. Time is passed in (sans-IO). Ranges older than
    every window still to be judged are forgotten (:meth:`covers` drops those ending
    before the window it is asked about: windows are judged in time order).
    """

    def __init__(self) -> None:
        self._ranges: list[list[float]] = []  # [start, end]; end = inf while open
        self._named: dict[str, list[float]] = {}

    def begin(self, t: float) -> None:
        self._ranges.append([t, math.inf])

    def end(self, t: float, settle: float = 0.0) -> tuple[float, float]:
        """Close the newest open range at ``t + settle``; returns it as (start, end)."""
        for r in reversed(self._ranges):
            if r[1] == math.inf:
                r[1] = t + settle
                return r[0], r[1]
        raise ValueError("no disturbance in progress")

    def put(self, name: str, start: float, end: float | None, settle: float = 0.0) -> tuple[float, float]:
        """The disturbance ``name`` runs from ``start`` to ``end + settle`` (to be told, while
        ``end`` is None); returns the range."""
        r = [start, math.inf if end is None else end + settle]
        self._named[name] = r
        return r[0], r[1]

    def covers(self, start: float, end: float) -> bool:
        """Whether the window [start, end) overlaps a disturbance (an open one included)."""
        self._ranges = [r for r in self._ranges if r[1] > start]
        self._named = {k: r for k, r in self._named.items() if r[1] > start}
        return any(r[0] < end and r[1] > start for r in [*self._ranges, *self._named.values()])
