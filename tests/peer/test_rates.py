"""RateMeter: a sliding-window byte rate on a fake clock."""

import pytest

from shoal.core.swarm.rates import RateMeter


def test_steady_rate_over_the_window():
    m = RateMeter(20.0)
    for t in range(60):
        m.add(1000, float(t))
    assert m.rate(60.0) == pytest.approx(1000, rel=0.06)
    assert m.total == 60_000


def test_young_meter_divides_by_its_age_not_the_window():
    m = RateMeter(20.0)
    m.add(1_000_000, 0.0)
    m.add(1_000_000, 1.5)
    assert m.rate(2.0) == pytest.approx(1_000_000)


def test_bytes_slide_out_of_the_window():
    m = RateMeter(10.0)
    m.add(50_000, 0.0)
    assert m.rate(5.0) == pytest.approx(10_000)
    assert m.rate(9.5) > 0
    assert m.rate(10.0) == 0.0
    assert m.total == 50_000


def test_empty_meter_and_bad_arguments():
    assert RateMeter().rate(123.0) == 0.0
    with pytest.raises(ValueError):
        RateMeter(0)
    with pytest.raises(ValueError):
        RateMeter(1.0, bucket=2.0)
    with pytest.raises(ValueError):
        RateMeter().add(-1, 0.0)


def test_memory_is_bounded_by_the_window():
    m = RateMeter(20.0)
    for k in range(100_000):
        m.add(10, k * 0.1)
    assert len(m._buckets) <= 21
    assert m.rate(10_000.0) == pytest.approx(100, rel=0.06)


def test_clock_going_backwards_counts_into_the_newest_bucket():
    m = RateMeter(20.0)
    m.add(100, 10.0)
    m.add(100, 5.0)
    assert m.total == 200 and m.rate(10.0) > 0
