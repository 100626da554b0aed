"""Netdata's anomaly detector, from its documentation, over the metrics Netdata collects.

Why a re-implementation: Debian's netdata (1.37.1, the one the registries carry) is built
without machine learning (``netdata -W buildinfo``: "Machine Learning: NO"), so its own
``anomaly_detection.*`` charts do not exist. Netdata still collects the node's metrics
(every chart and dimension, every second, read here from its ``/api/v1/data``), and its
detector is documented (learn.netdata.cloud, "ML Configuration"; 1.37 defaults):

* per dimension, the series is differenced (``num samples to diff = 1``), smoothed by a
  mean over 3 samples (``num samples to smooth = 3``), and each point becomes a vector of
  itself and its 5 predecessors (``num samples to lag = 5``);
* a k-means model with k = 2 is trained on a random 20 % of the training vectors
  (``random sampling ratio = 0.2``);
* a point's anomaly score is its distance to the nearest centre, min-max normalised by
  the training vectors' distances; the point is anomalous (its *anomaly bit*) when the
  score is at least 0.99 (``dimension anomaly score threshold``);
* the node's anomaly rate at a second is the share of its dimensions whose bit is set.

Netdata keeps 18 models per dimension trained over days and sets the bit only when all
agree; a benchmark of minutes has one model per dimension, trained on its normal period.
A window's score is the mean node anomaly rate over the window's seconds.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np

DIFF, SMOOTH, LAG = 1, 3, 5
SAMPLING_RATIO = 0.2
SCORE_THRESHOLD = 0.99
KMEANS_ITERATIONS = 1000


def features(x: np.ndarray) -> np.ndarray:
    """Rows of (diffed, smoothed) values with their LAG predecessors; len(x) - DIFF - SMOOTH - LAG + 1 rows."""
    d = x[DIFF:] - x[:-DIFF]
    kernel = np.ones(SMOOTH) / SMOOTH
    s = np.convolve(d, kernel, mode="valid")
    n = s.shape[0] - LAG
    if n <= 0:
        return np.zeros((0, LAG + 1))
    return np.stack([s[LAG - k:LAG - k + n] for k in range(LAG + 1)], axis=1)


def kmeans2(X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two centres by Lloyd's algorithm from a k-means++ start."""
    c0 = X[rng.integers(len(X))]
    d = ((X - c0) ** 2).sum(axis=1)
    c1 = X[rng.choice(len(X), p=d / d.sum())] if d.sum() > 0 else c0
    centres = np.stack([c0, c1])
    for _ in range(KMEANS_ITERATIONS):
        nearest = np.argmin(((X[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        new = np.stack([X[nearest == k].mean(axis=0) if np.any(nearest == k) else centres[k] for k in range(2)])
        if np.allclose(new, centres):
            break
        centres = new
    return centres


class DimensionModel:
    def __init__(self, train: np.ndarray, rng: np.random.Generator) -> None:
        X = features(train)
        if len(X) > 10:
            X = X[rng.random(len(X)) < SAMPLING_RATIO] if len(X) * SAMPLING_RATIO >= 10 else X
        self.centres = kmeans2(X, rng)
        dist = self._distance(X)
        self.lo, self.hi = float(dist.min()), float(dist.max())

    def _distance(self, X: np.ndarray) -> np.ndarray:
        return np.sqrt(((X[:, None, :] - self.centres[None]) ** 2).sum(axis=2)).min(axis=1)

    def bits(self, x: np.ndarray) -> np.ndarray:
        """Anomaly bit of each point of ``x`` from its (DIFF + SMOOTH - 1 + LAG)-th on."""
        dist = self._distance(features(x))
        if self.hi <= self.lo:
            return dist > self.hi
        return (dist - self.lo) / (self.hi - self.lo) >= SCORE_THRESHOLD


WARMUP = DIFF + SMOOTH - 1 + LAG  # points of a series before its first anomaly bit


class NodeDetector:
    """One model per dimension that varied during training; ``rate`` -> the node anomaly rate per second."""

    def __init__(self, train: dict[str, np.ndarray], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.models = {name: DimensionModel(x, rng) for name, x in train.items()
                       if len(x) > WARMUP + 10 and np.ptp(x) > 0}

    def rate(self, series: dict[str, np.ndarray]) -> np.ndarray:
        """Share (0..1) of the modelled dimensions with the bit set, per second from WARMUP on."""
        bits = [m.bits(series[name]) for name, m in self.models.items() if name in series]
        if not bits:
            raise ValueError("no modelled dimension in the series")
        n = min(len(b) for b in bits)
        return np.mean([b[:n] for b in bits], axis=0)


#: a dimension must have a value at this share of the seconds of a fetch to be kept
MIN_COVERAGE = 0.9


def align(charts: dict[str, tuple[list[str], list[list]]], after: int, before: int
          ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Netdata's per-chart rows on one per-second grid [after, before).

    ``charts``: chart -> (dimension labels, rows ``[t, v1, v2, ...]`` in any order, ``None`` for
    a gap). Every chart has its own timeline (a chart that started later, a plugin that
    collects at its own pace: apps.plugin's charts against the kernel's), so rows are placed
    by their timestamp, not their position: the bench used to take the first chart's
    timestamps as everyone's and drop every chart not exactly on them, which left only
    apps.plugin's charts in training and a different set in the test (recall 0 everywhere).
    A dimension with values at under MIN_COVERAGE of the seconds is left out; its gaps are
    filled with its previous value (its first, before it starts).
    """
    grid = np.arange(after, before, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for chart, (labels, rows) in charts.items():
        if not rows:
            continue
        t = np.array([int(round(r[0])) for r in rows], np.int64)
        vals = np.array([[np.nan if v is None else float(v) for v in r[1:]] for r in rows], np.float64)
        inside = (t >= after) & (t < before)
        t, vals = t[inside], vals[inside]
        for k, label in enumerate(labels):
            col = np.full(grid.shape, np.nan)
            col[t - after] = vals[:, k]
            ok = ~np.isnan(col)
            if ok.mean() < MIN_COVERAGE:
                continue
            idx = np.where(ok, np.arange(len(col)), 0)
            np.maximum.accumulate(idx, out=idx)
            col = col[idx]
            col[np.isnan(col)] = col[ok][0]  # before its first value
            out[f"{chart}/{label}"] = col
    return grid.astype(np.float64), out


def window_scores(times: np.ndarray, rate: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """The mean node anomaly rate over each window [start, end) (``rate[i]`` at ``times[i]``,
    the end of Netdata's second ``times[i] - 1 .. times[i]``); NaN for a window with no second."""
    times, rate = np.asarray(times, np.float64), np.asarray(rate, np.float64)
    if times.shape != rate.shape:
        raise ValueError(f"{times.shape[0]} timestamps for {rate.shape[0]} rates")
    out = np.full(len(windows), np.nan)
    for i, (s, e) in enumerate(windows):
        m = (times > s) & (times <= e)
        if m.any():
            out[i] = rate[m].mean()
    return out


def fetch(base: str, after: int, before: int, timeout: float = 30.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every chart's dimensions from a Netdata agent, per second, for [after, before) (unix seconds).

    Returns (timestamps, {"chart/dimension": values}), every series on the same timestamps (:func:`align`).
    """
    with urllib.request.urlopen(f"{base}/api/v1/charts", timeout=timeout) as r:  # noqa: S310 - loopback
        charts = sorted(json.load(r)["charts"])
    raw: dict[str, tuple[list[str], list[list]]] = {}
    for chart in charts:
        url = f"{base}/api/v1/data?chart={chart}&after={after}&before={before}&format=json&options=seconds,flip"
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            data = json.load(r)
        raw[chart] = (data["labels"][1:], data["data"])
    times, out = align(raw, after, before)
    if not out:
        raise ValueError(f"no data from {base} for {after}..{before}")
    return times, out
