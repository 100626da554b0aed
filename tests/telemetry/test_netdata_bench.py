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


def test_a_replay_trains_on_the_kept_normal_period_with_the_settings_given():
    # A kept run as live.py writes it: 40 normal windows (two disturbed by the daemon's own
    # training), training, then 20 normal windows and one 30 s fault that moves feature "b".
    from replay import replay

    rng = np.random.default_rng(3)

    def window(start: float, fault: bool, label: str | None = None) -> dict:
        return {"start": start, "end": start + 5.0, "n_samples": 5, "label": label,
                "features": {"a:mean": float(rng.normal(10, 1)), "b:mean": float(rng.normal(5 + 20 * fault, 1))}}

    normal = [window(1000.0 + 5 * i, False, "shoal-disturbed" if i in (3, 4) else None) for i in range(40)]
    after = [window(1300.0 + 5 * i, 1400.0 <= 1300 + 5 * i < 1430) for i in range(30)]
    kept = {"normal_start": 1000.0, "train_start": 1200.0, "train_end": 1210.0, "windows": normal + after}
    run = {"injections": [{"kind": "memleak", "intensity": "high", "start": 1400.0, "end": 1430.0}],
           "windows": [{"start": w["start"], "end": w["end"], "netdata_rate": 0.5 if 1400 <= w["start"] < 1430 else 0.1}
                       for w in after if not 1430 <= w["start"] < 1435]}  # the window after a fault: unscored
    out = replay(run, kept, "")
    assert out["trained_windows"] == 38 and out["features"] == 2  # the disturbed windows left out
    shoal = out["results"]["shoal"]
    assert shoal["kinds"]["memleak/high"]["recall"] == 1.0 and shoal["normal_windows"] == 23
    assert out["results"]["netdata_at_shoal_fpr"]["kinds"]["memleak/high"]["recall"] == 1.0
    # The settings given are the recipe's: a threshold 1000 times higher flags nothing.
    high = replay(run, kept, "threshold_factor = 1000.0")
    assert high["threshold"] == pytest.approx(1000 * out["threshold"], rel=1e-6)
    assert high["results"]["shoal"]["kinds"]["memleak/high"]["recall"] == 0.0
    with pytest.raises(Exception, match="threshold_factor"):
        replay(run, kept, "threshold_factor = 0.5")


def test_a_live_run_keeps_every_stored_window_with_its_features_and_labels(tmp_path):
    import gzip
    import json

    from live import keep_store, windows_file

    from shoal.core.telemetry.windows import Window
    from shoal.daemons.telemetry.store import WindowStore

    store = WindowStore(tmp_path / "windows.db")
    try:
        for i in range(3):
            store.add(Window(100.0 + 5 * i, 105.0 + 5 * i, 5, {"a:mean": float(i)}))
        store.label(105.0, 110.0, "shoal-disturbed")
        path = windows_file(tmp_path / "live.json")
        keep_store(tmp_path / "windows.db", path, {"train_start": 110.0})  # read while the daemon has it open
    finally:
        store.close()
    with gzip.open(path, "rt") as f:
        kept = json.load(f)
    assert path.name == "live-windows.json.gz" and kept["train_start"] == 110.0
    assert [(w["start"], w["label"], w["features"]) for w in kept["windows"]] == [
        (100.0, None, {"a:mean": 0.0}), (105.0, "shoal-disturbed", {"a:mean": 1.0}), (110.0, None, {"a:mean": 2.0})]


def test_the_replays_deviation_feature_returns_to_zero_after_a_level_moves_and_stays():
    from replay import with_deviations

    windows = [{"start": float(i), "features": {"m:mean": 100.0 if i < 12 else 160.0, "m:std": 1.0}}
               for i in range(30)]
    dev = [w["features"].get("m:dev") for w in with_deviations(windows, 8)]
    assert dev[:6] == [None] * 6 and dev[6:12] == [0.0] * 6  # fewer than 6 windows before: none
    assert dev[12:16] == [60.0] * 4 and dev[16] == 30.0 and dev[17:] == [0.0] * 13
    assert all("m:std:dev" not in w["features"] and w["features"]["m:std"] == 1.0 for w in with_deviations(windows, 8))
