"""The telemetry experiment (seed 000) in a small size: a fedserver host and 3 telemetry nodes.

The lab is real: the fedserver and every telemetry daemon run inside their own
host's namespace on its lab address, Flower's SuperLink and SuperNodes are
real processes, and the nodes reach the SuperLink over TLS with SuperNode
authentication through the fedserver's proxy, with the certificates and keys
the lab's render made. The checks are the experiment's own: the FedAvg run
took every node, every node runs the global weights bit for bit, the nodes'
port refuses the Control API, and the network fault on one node is flagged by
that node's detector and by no other. The test also reads results.json and
the plot. Nothing may be left behind. Times are reported, never asserted.
"""

from __future__ import annotations

import json
import os

import pytest
import trio

from shoal.daemons.runtime.config import ConfigError
from shoal.lab.experiment import run_scenario
from shoal.lab.scenario import parse_scenario
from tests.lab.test_swarm_experiment import assert_nothing_left

root_only = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                               reason="the lab makes network namespaces: root only (CI runs as root)")

SMALL = """
[lab]
ready_timeout = 120.0
[link]
upload = 4.0
download = 16.0
[[host]]
name = "fed"
daemons = ["fedserver"]
[host.config.fedserver.federation]
rounds = 1
local_epochs = 20
lr = 0.003
batch_size = 8
min_nodes = 3
wait_nodes = 120.0
round_timeout = 180.0
[[host]]
name = "node"
count = 3
daemons = ["telemetry"]
[host.config.telemetry.collector]
interval = 0.25
window = 2.0
gpu = false
[host.config.telemetry.federation]
catch_up_interval = 3600.0  # a catch-up downloads the whole model: traffic the net features see
[host.config.telemetry.training]
features = ["net_", "cgroup_"]  # the host's own signals: its interface and its cgroup ...
exclude_features = ["load_", "cgroup_psi_", "cgroup_memory"]  # ... but not its pressure (waits for the
# shared machine) or its memory level (page cache that stays: a CI run flagged the neighbours through it)
threshold_factor = 3.0  # the percentile of ~20 windows is their largest: 0.008 to 0.12 from run to run
[experiment]
kind = "telemetry"
timeout = 360.0
[experiment.params]
normal_windows = 14  # min_windows is 10; a node's first windows may lack a rate feature (no prior sample)
steady_windows = 5
rounds = 1
baseline_windows = 2
fault_host = "node2"
fault_seconds = 8.0
fault_rate = 1.0
after_windows = 2
machine_load = 2.0  # the shared machine's noise during the fault: every core busy from outside the lab's hosts
"""


@root_only
async def test_small_telemetry_run_federates_over_tls_and_flags_the_fault_only_on_its_host(tmp_path, monkeypatch):
    # Flower's SuperExecs look for work every second by default; the lab's daemons inherit this.
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    out = tmp_path / "out"
    with trio.fail_after(400):
        result = await run_scenario(parse_scenario(SMALL, source="telemetry-small.toml"), out, echo=None)
    record = json.loads((out / "results.json").read_text())
    assert_nothing_left(record["run_id"])
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.held]
    assert failed == []
    names = [c.name for c in result.checks]
    assert names[:3] == ["FedAvg over TLS with SuperNode authentication", "the nodes' port refuses the Control API",
                         "every node runs the global model"]
    for name in ("the fault is flagged on node2", "the fault is flagged nowhere else"):
        assert name in names, names

    data = record["data"]
    # The nodes dialled the fedserver's lab address, not loopback, and every one ran run R's weights.
    assert data["nodes_dial"] == [data["superlink"]] and not data["superlink"].startswith("127.")
    assert data["run"]["nodes"] == 3
    assert {m["weights_sha256"] for m in data["models"].values()} == {data["global_weights_sha256"]}
    assert data["proxy"]["control_api_status_from_lan"] == 403
    assert [(r["host"], r["flagged"], r["expected"]) for r in record["rows"]] == [
        ("node1", "no", "no"), ("node2", "yes", "yes"), ("node3", "no", "no")]
    assert data["fault"]["sent_bytes"] > 0 and data["hosts"]["node2"]["during"] > 0
    assert (out / "telemetry_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What flagged the fault host was its own (network) features, not the machine's.
    shares = [w["own_share"] for w in data["hosts"]["node2"]["windows"]
              if w["anomalous"] and w["end"] > data["fault"]["start"] and w["start"] < data["fault"]["end"]]
    assert shares and max(shares) > 0.2, shares


@pytest.mark.parametrize("change, key", [
    ("fault_seconds = 8.0", "experiment.params.fault_seconds"),  # below its minimum
    ("fault_rate = 1.0", "experiment.params.fault_rate"),
    ("after_windows = 2", "experiment.params.sink"),  # an unknown key
])
def test_params_are_validated_by_the_experiment_schema(change, key):
    bad = change.split(" = ")[0] + " = -1.0" if not key.endswith("sink") else change + '\nsink = "fed"'
    with pytest.raises(ConfigError) as e:
        parse_scenario(SMALL.replace(change, bad), source="bad.toml")
    assert e.value.key == key
