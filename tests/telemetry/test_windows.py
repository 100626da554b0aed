"""Window statistics: alignment, mean and std, closing, vanishing metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.telemetry.windows import Disturbances, WindowAccumulator


def test_windows_are_aligned_and_hold_mean_and_std():
    acc = WindowAccumulator(length=10.0)
    values = [1.0, 2.0, 3.0, 4.0]
    closed = []
    for i, v in enumerate(values):
        closed += acc.add(100.0 + i, {"a": v, "b": 5.0})
    assert closed == [] and acc.open_start == 100.0
    (w,) = acc.add(110.0, {"a": 100.0})  # first sample of the next window closes this one
    assert (w.start, w.end, w.n_samples) == (100.0, 110.0, 4)
    assert w.features["a:mean"] == pytest.approx(2.5)
    assert w.features["a:std"] == pytest.approx(np.std(values))
    assert w.features["b:std"] == 0.0
    assert list(w.features) == ["a:mean", "a:std", "b:mean", "b:std"]
    assert acc.open_start == 110.0 and acc.open_samples == 1


def test_alignment_is_to_multiples_of_the_length():
    acc = WindowAccumulator(length=900.0)
    acc.add(1000.0, {"x": 1})
    assert acc.open_start == 900.0


def test_flush_closes_a_quiet_window_and_short_windows_are_dropped():
    acc = WindowAccumulator(length=10.0, min_samples=3)
    acc.add(0.0, {"x": 1.0})
    acc.add(1.0, {"x": 2.0})
    assert acc.flush(9.9) == []
    assert acc.flush(10.0) == []  # two samples < min_samples: dropped
    for t in (20.0, 21.0, 22.0):
        acc.add(t, {"x": t})
    (w,) = acc.flush(35.0)
    assert w.start == 20.0 and w.n_samples == 3 and w.features["x:mean"] == pytest.approx(21.0)


def test_a_metric_missing_from_some_samples_uses_the_samples_that_had_it():
    acc = WindowAccumulator(length=10.0)
    acc.add(0.0, {"x": 1.0, "t": 40.0})
    acc.add(1.0, {"x": 3.0})  # sensor t vanished
    acc.add(2.0, {"x": 5.0, "t": float("nan")})  # and then reads NaN
    (w,) = acc.flush(10.0)
    assert w.n_samples == 3
    assert w.features["t:mean"] == 40.0 and w.features["t:std"] == 0.0
    assert w.features["x:mean"] == pytest.approx(3.0)


def test_bad_length_is_refused():
    with pytest.raises(ValueError):
        WindowAccumulator(length=0)


@given(st.lists(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), min_size=1, max_size=200))
def test_statistics_match_numpy(values):
    acc = WindowAccumulator(length=1e6)
    for i, v in enumerate(values):
        acc.add(float(i), {"m": v})
    (w,) = acc.flush(1e6)
    assert w.features["m:mean"] == pytest.approx(np.mean(values), rel=1e-9, abs=1e-6)
    assert w.features["m:std"] == pytest.approx(np.std(values), rel=1e-6, abs=1e-3)


def test_disturbances_cover_the_windows_overlapping_them_and_the_settling_time():
    d = Disturbances()
    assert not d.covers(0.0, 10.0)
    d.begin(25.0)  # training starts inside the window [20, 30)
    assert not d.covers(10.0, 20.0)
    assert d.covers(20.0, 30.0) and d.covers(30.0, 40.0)  # open: every window from its start on
    assert d.end(42.0, settle=5.0) == (25.0, 47.0)
    assert d.covers(40.0, 50.0)  # holds the end and the settling time
    assert not d.covers(50.0, 60.0)
    d.begin(70.0)
    d.begin(71.0)  # nested: the inner one closes first
    assert d.end(72.0) == (71.0, 72.0) and d.covers(80.0, 90.0)
    assert d.end(95.0) == (70.0, 95.0) and not d.covers(100.0, 110.0)
    with pytest.raises(ValueError):
        d.end(120.0)


def test_a_named_disturbance_another_process_reports_is_open_until_told_then_settles():
    d = Disturbances()
    assert d.put("federated", 25.0, None) == (25.0, math.inf)
    assert d.covers(20.0, 30.0) and d.covers(1000.0, 1010.0)  # open: every window from its start on
    assert d.put("federated", 25.0, 42.0, settle=5.0) == (25.0, 47.0)  # over: replaced, not added
    assert d.covers(40.0, 50.0) and not d.covers(50.0, 60.0)
    d.begin(70.0)  # the daemon's own, alongside
    d.put("federated", 72.0, 75.0)
    assert d.end(80.0) == (70.0, 80.0) and not d.covers(80.0, 90.0)
