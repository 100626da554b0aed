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


def fetch(base: str, after: int, before: int, timeout: float = 30.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every chart's dimensions from a Netdata agent, per second, for [after, before] (unix seconds).

    Returns (timestamps, {"chart/dimension": values}); each series is on the same timestamps.
    """
    with urllib.request.urlopen(f"{base}/api/v1/charts", timeout=timeout) as r:  # noqa: S310 - loopback
        charts = sorted(json.load(r)["charts"])
    times: np.ndarray | None = None
    out: dict[str, np.ndarray] = {}
    for chart in charts:
        url = f"{base}/api/v1/data?chart={chart}&after={after}&before={before}&points={before - after}" \
              "&group=average&format=json&options=seconds,flip,null2zero"
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            data = json.load(r)
        rows = np.asarray(data["data"], dtype=np.float64)
        if rows.ndim != 2 or rows.shape[0] < 2:
            continue
        if times is None:
            times = rows[:, 0]
        if rows.shape[0] != times.shape[0] or not np.array_equal(rows[:, 0], times):
            continue  # a chart that started late: left out rather than misaligned
        for k, label in enumerate(data["labels"][1:], start=1):
            out[f"{chart}/{label}"] = rows[:, k]
    if times is None:
        raise ValueError(f"no data from {base} for {after}..{before}")
    return times, out
