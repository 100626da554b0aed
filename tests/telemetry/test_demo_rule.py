"""The telemetry demo's pass rule counts false alarms: a flagged normal window fails it."""

from __future__ import annotations

from demo.telemetry import judge


def w(score: float, anomalous: bool, label: str | None = None) -> dict:
    return {"score": score, "anomalous": anomalous, "label": label}


def test_a_caught_fault_without_false_alarms_passes():
    ok, summary = judge([w(0.1, False), w(0.2, False), w(0.9, True, "fault"), w(0.5, False, "fault"),
                         w(0.1, False)])
    assert ok and "1 of 2 windows inside the fault" in summary and "0 of 3 windows outside" in summary


def test_a_false_alarm_fails_even_when_the_fault_is_caught():
    # The first window after training flagged (the 2 runs in 3), the fault caught too.
    ok, summary = judge([w(0.3, True), w(0.1, False), w(0.9, True, "fault"), w(0.1, False)])
    assert not ok and "1 of 3 windows outside" in summary and "FAIL" in summary
    # A false alarm after the fault counts as well.
    assert not judge([w(0.1, False), w(0.9, True, "fault"), w(0.4, True)])[0]


def test_a_missed_fault_fails():
    assert not judge([w(0.1, False), w(0.2, False, "fault")])[0]
    assert not judge([w(0.5, False), w(0.4, True, "fault"), w(0.9, False)])[0]  # flagged but scores lower


def test_the_faults_after_effects_count_neither_way():
    ok, summary = judge([w(0.1, False), w(0.9, True, "fault"), w(0.5, True, "recovery"), w(0.1, False)])
    assert ok and "0 of 2 windows outside" in summary
    assert not judge([w(0.1, False), w(0.2, False, "recovery"), w(0.9, True, "recovery")])[0]  # no fault caught
