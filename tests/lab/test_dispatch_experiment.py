"""The dispatch experiment in a small size: 4 workers, 1 MiB inputs, a worker killed mid-task.

The lab is real (namespaces, shaped veths, every daemon a process on its host's
address); the checks are the experiment's own, read from the dispatcher's
records, and the test also reads results.json to see that what they claim is
there. Nothing may be left behind.
"""

from __future__ import annotations

import io
import json
import os
import tomllib
from pathlib import Path

import pytest
import trio

from shoal.daemons.runtime.config import ConfigError
from shoal.lab.experiment import run_scenario
from shoal.lab.render import render
from shoal.lab.scenario import parse_scenario
from tests.lab.test_net import assert_nothing_left

ANOMALY_SCENARIO = Path(__file__).resolve().parents[2] / "configs" / "lab" / "dispatch-anomaly.toml"

root_only = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                               reason="the lab makes network namespaces: root only (CI runs as root)")

SMALL = """
[lab]
seed = 3
[link]
upload = 2.0
download = 2.0
[[host]]
name = "head"
daemons = ["dispatcher", "tracker"]
[host.config.dispatcher.dispatcher]
lease_seconds = 5.0
[[host]]
name = "store"
daemons = ["peer"]
[[host]]
name = "worker"
count = 4
daemons = ["worker", "peer"]
[host.config.worker.worker]
slots = 1
heartbeat_interval = 0.5
[host.config.peer.choker]
interval = 2.0
optimistic_interval = 4.0
[experiment]
kind = "dispatch"
timeout = 120.0
[experiment.params]
input_mib = 1.0
rounds = 1
work = 0.5
workers = [1, 4]
kill_worker = "worker2"
"""


@root_only
async def test_small_dispatch_run_holds_its_checks_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    echo = io.StringIO()
    with trio.fail_after(150):
        result = await run_scenario(parse_scenario(SMALL, source="dispatch-small.toml"), out, echo=echo)
    assert result.ok, "\n".join(f"{c.name}: {c.detail}" for c in result.checks) + "\n" + echo.getvalue()[-3000:]
    names = [c.name for c in result.checks]
    assert any("exactly once" in n for n in names) and any("exact input" in n for n in names)
    assert any("killed worker (worker2)" in n for n in names), names

    record = json.loads((out / "results.json").read_text())
    assert (out / "dispatch.png").stat().st_size > 0
    runs = record["data"]["runs"]
    assert sorted((r["mode"], r["n"]) for r in runs) == [("store", 1), ("store", 4), ("swarm", 1), ("swarm", 4)]
    for r in runs:
        assert len(r["tasks"]) == r["n"] and all(t["got"] == t["want"] != "" for t in r["tasks"]), r
    killed = [r for r in runs if r["killed"]]
    assert len(killed) == 1 and killed[0]["mode"] == "store" and killed[0]["n"] == 4
    assert [f["kind"] for f in record["faults"]] == ["kill"] and record["faults"][0]["host"] == "worker2"
    assert record["restarts"].get("worker2/worker") == 1

    assert_nothing_left(record["run_id"])  # namespaces (so veths, qdiscs, processes), record, work dir


def test_rendered_worker_fetches_swarm_inputs_through_its_own_peer(tmp_path):
    scenario = parse_scenario(SMALL, source="dispatch-small.toml")
    lab = render(scenario, tmp_path / "lab", config_root=str(tmp_path / "lab") + "/hosts/{host}/etc/shoal")
    for host in ("worker1", "worker4"):
        worker = tomllib.loads(lab.plan(host, "worker").config.read_text())["worker"]
        peer = tomllib.loads(lab.plan(host, "peer").config.read_text())["peer"]
        assert worker["peer_socket"] == peer["control_socket"]
        assert worker["peer_socket"] == str(tmp_path / "lab" / "hosts" / host / "var/lib/shoal-peer/control.sock")
        assert (tmp_path / "lab" / "hosts" / host / "var/lib/shoal-peer").is_dir()  # the peer binds in it
    store_peer = tomllib.loads(lab.plan("store", "peer").config.read_text())["peer"]
    assert "control_socket" not in store_peer  # no worker there: the peer's own default
    lan = render(scenario, tmp_path / "lan")  # for real machines: the peer's systemd default
    worker = tomllib.loads(lan.plan("worker2", "worker").config.read_text())["worker"]
    assert worker["peer_socket"] == "/var/lib/shoal-peer/control.sock"
    assert not (tmp_path / "lan" / "hosts" / "worker2" / "var").exists()


@pytest.mark.parametrize(("line", "bad", "reason"), [
    ("workers = [1, 4]", "workers = [2, 4]", "workers: must include 1"),
    ("rounds = 1", 'modes = ["store", "tape"]', "modes: distinct values among store, swarm"),
    ("rounds = 1", "rounds = 0", "rounds"),
])
def test_bad_params_are_refused_in_one_line(line, bad, reason):
    assert line in SMALL
    with pytest.raises(ConfigError) as err:
        parse_scenario(SMALL.replace(line, bad), source="bad.toml")
    assert reason in str(err.value) and "\n" not in str(err.value)


#: the shipped anomaly-aware dispatch scenario (no live test: see docs/lab.md, "Dispatch")
ANOMALY = (Path(__file__).resolve().parents[2] / "configs" / "lab" / "dispatch-anomaly.toml").read_text()


def test_emulated_render_alone_gives_telemetry_the_host_cgroup(tmp_path):
    scenario = parse_scenario(ANOMALY, source="dispatch-anomaly.toml")
    lab = render(scenario, tmp_path / "lab", config_root=str(tmp_path / "lab") + "/hosts/{host}/etc/shoal",
                 emulated=True)
    assert tomllib.loads(lab.plan("worker1", "telemetry").config.read_text())["collector"]["cgroup"] == "self"
    lan = render(scenario, tmp_path / "lan")
    assert "cgroup" not in tomllib.loads(lan.plan("worker1", "telemetry").config.read_text())["collector"]


@root_only
async def test_anomaly_aware_dispatch_scenario_as_shipped(tmp_path):
    """configs/lab/dispatch-anomaly.toml as a user runs it: a CPU fault on worker2 is flagged by its
    own telemetry, the dispatcher stops using it, and no healthy host is taken out (before the
    node verdict, one lone false-alarm window did that in 2 runs of 4)."""
    from tests.lab.experiment_run import run_small

    text = ANOMALY_SCENARIO.read_text()  # noqa: ASYNC240 - a small file, before anything runs
    result, record = await run_small(text, "dispatch-anomaly.toml", tmp_path / "out", timeout=420)
    names = [c.name for c in result.checks]
    assert "no other host was flagged" in names and any("got no new unit while flagged" in n for n in names)
    runs = {r["exclude_anomalous"]: r for r in record["data"]["anomaly"]["runs"]}
    assert set(runs) == {False, True}
    on, (first, last) = runs[True], runs[True]["flagged"]
    assert first > 0 and not [t for t in on["tasks"] if t["worker"] == "worker2" and first <= t["started"] <= last]
    assert record["data"]["other_hosts_window_false_alarms"]["windows"] > 0
    assert_nothing_left(record["run_id"])
