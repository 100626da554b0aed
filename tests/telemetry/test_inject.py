"""Fault injectors do what they say, within their bounds; the CLI's time parsing."""

from __future__ import annotations

import resource
import time

import pytest

from shoal.daemons.telemetry.cli import parse_time
from shoal.daemons.telemetry.inject import inject


def test_cpu_hog_burns_cpu_for_its_duration():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.monotonic()
    assert inject("cpu", 1.0, workers=1) == {"kind": "cpu", "workers": 1}
    assert time.monotonic() - start >= 1.0
    # The busy child ran whenever it got a CPU: 0.2 s of 1 s is what it gets even
    # with 8 other runnable processes on 2 cores, and far more than a sleeper.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before >= 0.2


def test_mem_leak_io_and_net_report_what_they_did(tmp_path):
    assert inject("mem", 0.4, mib=20)["mib"] >= 2
    assert inject("io", 0.3, mib=2, directory=str(tmp_path))["written_mib"] >= 2
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone
    assert inject("net", 0.3)["sent_mib"] >= 1


@pytest.mark.parametrize("kind, duration", [("cpu", 0), ("disk", 1.0), ("mem", 1e9)])
def test_bad_requests_are_refused(kind, duration):
    with pytest.raises(ValueError):
        inject(kind, duration)


def test_parse_time_forms():
    now = 1_700_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("now+900", now) == now + 900
    assert parse_time("now-60", now) == now - 60
    assert parse_time("1700000123", now) == 1700000123.0
    assert parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    with pytest.raises(ValueError):
        parse_time("yesterday", now)
