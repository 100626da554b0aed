"""The whole suite on one emulated LAN: every daemon of configs/lab/lan.toml up, off loopback, and monitored."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from shoal.lab import net as labnet
from shoal.lab.lab import Lab
from shoal.lab.scenario import load_scenario
from tests.harness import sample

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                       reason="the lab makes network namespaces: root only (CI runs as root)"),
    pytest.mark.skipif(shutil.which("prometheus") is None and not os.environ.get("CI"),
                       reason="Debian's prometheus is not installed (scripts/setup installs it)"),
]

LAN = Path(__file__).parents[2] / "configs" / "lab" / "lan.toml"


def forwarded(text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "shoal_fedserver_proxy_forwarded_total")


async def test_the_shipped_lan_brings_every_daemon_up_and_prometheus_sees_them_all():
    scenario = load_scenario(LAN)
    expected = {f"shoal-{d}/{h.name}" for h in scenario.hosts for d in h.daemons}
    with trio.fail_after(240):
        async with Lab(scenario, echo=None) as lab:
            run_id = lab.run_id
            assert all(p.ready.is_set() for p in lab.daemons.values())
            # every listener is on its host's lab address, never loopback
            for plans in lab.bundle.plans.values():
                for plan in plans:
                    for addr in [plan.metrics, *plan.ports.values()]:
                        assert addr.rsplit(":", 1)[0] == lab.address(plan.host), (plan.daemon, addr)
            # the fedserver knows the three nodes' keys, and their SuperNodes reach it over
            # TLS through its Fleet proxy (requests it forwarded)
            text = await lab.metrics("mon", "fedserver")
            assert sample(text, "shoal_fedserver_authorized_nodes") == 3
            while not forwarded(await lab.metrics("mon", "fedserver")):  # noqa: ASYNC110 - polls /metrics
                await trio.sleep(0.5)
            # the workers reached the dispatcher across the LAN with its token
            while sample(await lab.metrics("ctl", "dispatcher"), "shoal_dispatcher_workers") != 3:  # noqa: ASYNC110
                await trio.sleep(0.5)
            # one scrape config for every daemon of every host
            # polls Prometheus's API (no event to wait on)
            while set(up := await lab.prometheus.targets_up()) != expected or not all(up.values()):  # noqa: ASYNC110
                await trio.sleep(0.5)
    assert labnet.lab_namespaces(run_id) == []
