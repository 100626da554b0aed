"""The live bench's Netdata anchor: per-chart rows on one time grid, window scores (no netdata needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "telemetry"))
from netdata_ml import WARMUP, NodeDetector, align, window_scores  # noqa: E402


def test_charts_on_their_own_timelines_all_land_on_one_grid():
    # As Netdata answers: a kernel chart from 100 on, apps.plugin's from 102 on (it started
    # later), newest first or oldest first, with a gap. The bench used to keep only charts on
    # the first chart's exact timestamps: here it kept apps.cpu alone.
    apps = ["user"], [[t, float(t % 7)] for t in range(102, 120)]
    system = ["busy", "idle"], [[t, float(t), None if t == 110 else 100.0 - t] for t in range(119, 99, -1)]
    times, series = align({"apps.cpu": apps, "system.cpu": system}, 100, 120)
    assert times.tolist() == list(range(100, 120))
    assert set(series) == {"apps.cpu/user", "system.cpu/busy", "system.cpu/idle"}
    assert series["system.cpu/busy"].tolist() == list(range(100, 120))  # placed by timestamp
    assert series["system.cpu/idle"][10] == 100.0 - 109  # the gap holds the previous value
    assert series["apps.cpu/user"][:3].tolist() == [102 % 7] * 3  # before its start: its first value
    assert series["apps.cpu/user"][2:].tolist() == [t % 7 for t in range(102, 120)]
    # A dimension with values at under 90 % of the seconds is left out, not zero-filled.
    _, series = align({"late.chart": (["x"], [[t, 1.0] for t in range(115, 120)])}, 100, 120)
    assert series == {}


def test_window_scores_average_the_seconds_of_each_window():
    times = np.arange(100.0, 130.0)
    rate = np.where((times > 110) & (times <= 115), 0.8, 0.1)
    scores = window_scores(times, rate, [(100.0, 105.0), (110.0, 115.0), (112.5, 117.5), (200.0, 205.0)])
    assert scores[0] == pytest.approx(0.1) and scores[1] == pytest.approx(0.8)
    assert scores[2] == pytest.approx((3 * 0.8 + 2 * 0.1) / 5)
    assert np.isnan(scores[3])
    with pytest.raises(ValueError):
        window_scores(times, rate[:-1], [(100.0, 105.0)])


def test_a_fault_in_aligned_series_scores_its_windows_above_the_normal_ones():
    # End to end on synthetic data: two charts on different timelines; a fault shifts every
    # dimension from t = 300 to 320; Netdata's detector, trained on 100..250, flags those windows.
    rng = np.random.default_rng(0)

    def chart(start: int, end: int, fault: bool) -> tuple[list[str], list[list]]:
        rows = []
        for t in range(start, end):
            hit = fault and 300 <= t < 320
            rows.append([t, *(float(rng.normal(50 + (40 * np.sin(t) if hit else 0), 1)) for _ in range(3))])
        return ["a", "b", "c"], rows[::-1]

    _, train = align({"system.cpu": chart(100, 250, False), "apps.cpu": chart(102, 250, False)}, 100, 250)
    det = NodeDetector(train, seed=1)
    assert len(det.models) == 6
    times, test = align({"system.cpu": chart(260, 360, True), "apps.cpu": chart(261, 360, True)}, 260, 360)
    rate = det.rate(test)
    windows = [(float(s), float(s + 5)) for s in range(270, 355, 5)]
    scores = window_scores(times[WARMUP:], rate, windows)
    fault = np.array([s >= 300 and e <= 320 for s, e in windows])
    normal = np.array([e <= 300 or s >= 320 + WARMUP for s, e in windows])  # lags and smoothing: after-effects
    assert scores[fault].min() > 2 * scores[normal].max()


def test_the_bench_picks_a_threshold_for_a_false_positive_rate_and_survives_no_normal_window():
    from live import threshold_at

    scores = np.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0])
    normal = np.array([True, True, True, True, False, False])
    assert threshold_at(scores, normal, 0.25) == 0.3  # one of the four normal windows above it
    assert threshold_at(scores, normal, 0.0) == 0.4  # flagged means above it: no normal window is
    # a short run can score no normal window at all (it crashed with an IndexError): nothing flagged
    assert threshold_at(scores, np.zeros(6, bool), 0.02) == float("inf")
