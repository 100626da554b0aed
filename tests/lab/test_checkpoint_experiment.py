"""The checkpoint experiment (seed 003) in a small size: 4 rank hosts, a whole host failed mid-run.

The lab is real: the coordinator and its backup are daemons on their own
hosts, each rank is a process inside its host bound to the host's lab address,
and the failure is the lab's host-down (every process in the host killed, its
link down). The checks are the experiment's own (every result bit-identical to
the failure-free run and to the app's sequential reference); the test also
reads results.json to see that the failure and the recovery it claims are on
record. Nothing may be left behind. Times are reported, never asserted.
"""

from __future__ import annotations

import pytest

from shoal.daemons.runtime.config import ConfigError
from shoal.lab.scenario import parse_scenario
from tests.lab.experiment_run import root_only, run_small
from tests.lab.test_swarm_experiment import assert_nothing_left

SMALL = """
[lab]
seed = 5
ready_timeout = 120.0  # a shared 2-core machine can take a minute to import a daemon
[link]
upload = 8.0
download = 8.0
[[host]]
name = "coord"
daemons = ["checkpoint"]
[host.config.checkpoint.checkpoint]
heartbeat_interval = 0.5
heartbeat_timeout = 2.0
[[host]]
name = "backup"
daemons = ["checkpoint"]
[[host]]
name = "rank"
count = 5
daemons = []
[experiment]
kind = "checkpoint"
timeout = 150.0
[experiment.params]
app = "apsp"
size = 48
fail_from = 0.1
fail_to = 0.4
ranks = 4
modes = ["enhanced"]
rates = [8.0]
interval = 0.1
run_timeout = 60.0
"""


@root_only
async def test_small_checkpoint_run_recovers_a_failed_host_bit_for_bit(tmp_path):
    out = tmp_path / "out"
    result, record = await run_small(SMALL, "checkpoint-small.toml", out, timeout=280)
    names = [c.name for c in result.checks]
    assert any("byte-identical to the failure-free run" in n for n in names), names
    assert any("sequential reference" in n for n in names), names
    assert (out / "checkpoint.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ref, *retried, failed = record["data"]["runs"]  # a run that finished before its failure is made again
    assert all(r["failed_host"] == "" for r in retried) and failed["attempt"] == len(retried) + 1
    assert ref["failed_host"] == "" and ref["status"]["epoch"] == 0
    # the failure: a rank host went down while the group ran, and the spare took its rank
    assert failed["failed_host"] in ref["hosts"] and failed["replacement"] == "rank5"
    assert failed["phase_at_failure"] == "running"
    assert [f["kind"] for f in record["faults"]] == ["host-down"]
    assert record["faults"][0]["host"] == failed["failed_host"]
    victim = ref["hosts"].index(failed["failed_host"])
    assert failed["victim"] == victim and len(failed["exits"][str(victim)]) == 2  # the killed one, its replacement
    assert failed["stats"][str(victim)]["recovered_bytes"] > 0  # the replacement read the lost image
    assert failed["status"]["epoch"] >= 1 and failed["status"]["samples"][2] >= 1  # an R was measured
    (row,) = record["rows"]
    assert row["mode"] == "enhanced" and row["identical"] is True and row["R ms"] > 0
    assert_nothing_left(record["run_id"])


def test_params_refuse_a_failure_window_that_ends_before_it_starts():
    bad = SMALL.replace("fail_from = 0.1", "fail_from = 0.6")
    with pytest.raises(ConfigError, match="fail_from"):
        parse_scenario(bad, source="bad.toml")
    with pytest.raises(ConfigError, match="experiment.params.modes"):
        parse_scenario(SMALL.replace('modes = ["enhanced"]', 'modes = ["lazy"]'), source="bad.toml")
