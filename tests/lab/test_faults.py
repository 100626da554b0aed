"""A scenario's fault schedule is applied at the stated times, as the daemons themselves see it."""

from __future__ import annotations

import os
import time

import pytest
import trio

from shoal.lab.errors import LabError
from shoal.lab.lab import Lab
from shoal.lab.scenario import parse_scenario
from tests.harness import sample

from .test_net import assert_rtt, connect_rtt

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                                reason="the lab makes network namespaces: root only (CI runs as root)")

SCENARIO = """
[lab]
restart_delay = 0.5
[link]
delay = 1.0
[[host]]
name = "a"
daemons = ["tracker"]
[[host]]
name = "b"
daemons = ["dispatcher"]
[[fault]]
at = 1.0
kind = "kill"
host = "a"
daemon = "tracker"
[[fault]]
at = 2.0
kind = "link"
host = "b"
delay = 9.0
duration = 2.0
"""


async def start_time(lab: Lab, host: str, daemon: str) -> float | None:
    try:
        return sample(await lab.metrics(host, daemon), f"shoal_{daemon}_start_time_seconds")
    except LabError:  # not serving (yet): it is restarting
        return None


async def test_faults_take_effect_at_their_times():
    with trio.fail_after(90):
        async with Lab(parse_scenario(SCENARIO, source="faults.toml"), echo=None) as lab:
            first = await start_time(lab, "a", "tracker")
            assert first is not None
            wall0 = time.time()
            lab.start_experiment()
            # the tracker's own metrics: a new process, started about restart_delay after the kill
            # polls the daemon's /metrics: no event to wait on
            while (restarted := await start_time(lab, "a", "tracker")) in (None, first):  # noqa: ASYNC110
                await trio.sleep(0.1)
            tracker = lab.daemons[("a", "tracker")]
            assert tracker.starts == 2 and tracker.exits[0][1] == -9
            # killed at 1.0 s, relaunched restart_delay later; the new process's own
            # start time comes after that (it reports once its imports are done)
            relaunch = tracker.launched[1] - wall0
            assert abs(relaunch - (1.0 + 0.5)) < 0.5, relaunch
            assert restarted >= tracker.launched[1] > first
            # the link fault: b's one-way delay goes from 1 to 9 ms for 2 s, then back
            await lab.wait_faults(2)
            during = await connect_rtt(lab, "a", "b")
            assert_rtt(during, 2 * (1.0 + 9.0))
            restored = (await lab.wait_faults(3))[2]
            assert restored["kind"] == "link-restored" and abs(restored["applied"] - 4.0) < 0.5, restored
            after = await connect_rtt(lab, "a", "b")
            assert_rtt(after, 2 * (1.0 + 1.0))
            applied = {f["kind"]: f["applied"] for f in lab.applied[:2]}
            assert abs(applied["kill"] - 1.0) < 0.5 and abs(applied["link"] - 2.0) < 0.5, applied
