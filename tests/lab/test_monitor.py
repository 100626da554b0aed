"""The monitor host: Debian's Prometheus scrapes every daemon of the lab, runs the shipped alerts, is saved."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from shoal.lab.lab import Lab
from shoal.lab.scenario import Fault, parse_scenario

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                       reason="the lab makes network namespaces: root only (CI runs as root)"),
    pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                       reason="Debian's prometheus is not installed (scripts/setup installs it)"),
]

SCENARIO = """
[lab]
restart_delay = 0.3
[monitor]
host = "mon"
scrape_interval = 0.5
[[host]]
name = "mon"
[[host]]
name = "a"
daemons = ["tracker", "dispatcher"]
[[host]]
name = "b"
daemons = ["worker"]
"""
KILL = Fault(at=0.0, kind="kill", host="a", daemon="tracker")


async def test_prometheus_scrapes_every_daemon_and_the_shipped_alerts_fire(tmp_path: Path):
    with trio.fail_after(120):
        async with Lab(parse_scenario(SCENARIO, source="monitor.toml"), echo=None) as lab:
            prom = lab.prometheus
            # every daemon on every host is a target, scraped across the lab's network
            while len(up := await prom.targets_up()) < 3 or not all(up.values()):  # noqa: ASYNC110 - polls the API
                await trio.sleep(0.2)
            assert set(up) == {"shoal-tracker/a", "shoal-dispatcher/a", "shoal-worker/b"}, up
            changes = 'changes(shoal_tracker_start_time_seconds{host="a"}[1h])'
            for n in (1, 2, 3):
                # kill the tracker once Prometheus has scraped its current process
                await lab.apply(KILL)
                while not [r for r in (await prom.api("query", query=changes))["result"]  # noqa: ASYNC110
                           if float(r["value"][1]) >= n]:
                    await trio.sleep(0.2)
            # three restarts in 15 minutes: the shipped ShoalDaemonRestarting rule
            while "ShoalDaemonRestarting" not in await prom.fired():  # noqa: ASYNC110 - polls the API
                await trio.sleep(0.5)
            saved = await prom.save(tmp_path, {"tracker_starts": 'shoal_tracker_start_time_seconds{host="a"}'})
    doc = json.loads((tmp_path / "prometheus.json").read_text())
    assert doc == json.loads(json.dumps(saved))
    assert "ShoalDaemonRestarting" in doc["alerts_fired"]
    starts = {v for r in doc["series"]["tracker_starts"]["result"] for _, v in r["values"]}
    assert len(starts) >= 4  # the first start and three restarts, each seen by a scrape
