"""The swarm experiment (seed 001) end to end in a small lab, and its bounds.

The shipped configs/lab/swarm.toml cut down to one seed host and four leech
hosts (its links: 2 MiB/s up, 8 MiB/s down, 5 ms): a 4 MiB file goes to all
four with shoal's peer daemons, with libtorrent and client-server, then a
track is streamed from a web seed and peers. Every check must hold (each copy
byte-identical to the original, for every client), the JSON and the plot must
be written, and the run must leave nothing behind. Times are reported by the
experiment, never asserted here (bench/lab/swarm.py measures them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import trio

from shoal.lab import net as labnet
from shoal.lab.agents_swarm import range_of
from shoal.lab.experiment import run_scenario
from shoal.lab.experiments.swarm import bounds
from shoal.lab.lab import RUNS_DIR
from shoal.lab.scenario import Scenario, load_scenario, replace_params

root_only = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                               reason="the lab makes network namespaces: root only (CI runs as root)")

SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "lab" / "swarm.toml"


def small_scenario() -> Scenario:
    """The shipped scenario cut down: its seed, first four leech hosts and its monitor, 4 MiB, N = 4."""
    shipped = load_scenario(SHIPPED)
    assert [h.name for h in shipped.hosts[:5]] == ["seed", "leech1", "leech2", "leech3", "leech4"]
    small = dataclasses.replace(shipped, hosts=(*shipped.hosts[:5], shipped.host(shipped.monitor.host)),
                                experiment=dataclasses.replace(shipped.experiment, timeout=150.0))
    return replace_params(small, file_mib=4.0, sizes=(4,), stream_mib=2.0, stream_peers=2, stream_trials=2,
                          timeout=60.0)


def run_processes(run_id: str) -> list[int]:
    """Processes that belong to the run: its daemons (state under its work directory) and agents."""
    marks = (f"/tmp/shoal-lab-{run_id}".encode(), f"SHOAL_LAB_RUN={run_id}".encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if any(m in text for m in marks):
            found.append(int(entry.name))
    return found


def assert_nothing_left(run_id: str) -> None:
    # This run's, not every run's: other labs may be up on a shared machine.
    assert labnet.lab_namespaces(run_id) == []
    assert not (RUNS_DIR / f"{run_id}.json").exists()
    assert not Path(f"/tmp/shoal-lab-{run_id}").exists()
    assert run_processes(run_id) == []


@root_only
async def test_swarm_experiment_small(tmp_path: Path) -> None:
    scenario = small_scenario()
    out = tmp_path / "out"
    with trio.fail_after(180):
        result = await run_scenario(scenario, out, echo=None)
    failed = [f"{c.name}: {c.detail}" for c in result.checks if not c.held]
    assert failed == []
    names = [c.name for c in result.checks]
    for client in ("shoal", "libtorrent", "client-server"):
        assert f"{client} N=4: every copy is byte-identical to the original" in names
    assert sum(name.startswith("stream on ") for name in names) == 2
    record = json.loads((out / "results.json").read_text())
    assert (out / "swarm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the monitor host's Prometheus scraped the peers during the run: their payload rates are saved
    prom = json.loads((out / "prometheus.json").read_text())
    rates = prom["series"]["peer_payload_bytes_per_s"]["result"]
    assert {r["metric"]["host"] for r in rates} >= {"seed", "leech1"}, rates
    assert "alerts_fired" in record["data"]
    dists = record["data"]["distributions"]
    assert {(d["client"], d["n"]) for d in dists} == {("shoal", 4), ("libtorrent", 4), ("client-server", 4)}
    for d in dists:
        assert sorted(d["times"]) == ["leech1", "leech2", "leech3", "leech4"]
        assert all(d["identical"].values()) and d["errors"] == {}
    assert [r["client"] for r in record["rows"]] == ["shoal", "libtorrent", "client-server", "shoal stream"]
    assert_nothing_left(record["run_id"])


def test_bounds_are_the_seeds_formulas() -> None:
    # N = 4 hosts, F = 16 MiB, 2 MiB/s up everywhere, 8 MiB/s down
    b = bounds(16.0, 4, 2.0, [2.0] * 4, [8.0] * 4)
    assert b == {"client-server": 32.0, "p2p": 8.0}
    # a slow downloader dominates both
    b = bounds(16.0, 4, 2.0, [2.0] * 4, [8.0, 8.0, 8.0, 0.5])
    assert b == {"client-server": 32.0, "p2p": 32.0}
    # leeches that cannot upload: P2P is no better than client-server
    b = bounds(16.0, 4, 2.0, [0.001] * 4, [8.0] * 4)
    assert b["p2p"] == pytest.approx(4 * 16.0 / 2.004)
    # unshaped links are infinitely fast
    assert bounds(16.0, 4, 0.0, [0.0] * 4, [0.0] * 4) == {"client-server": 0.0, "p2p": 0.0}
    assert math.isclose(bounds(1.0, 1, 1.0, [0.0], [0.0])["p2p"], 1.0)


def test_range_header() -> None:
    assert range_of("bytes=0-99", 1000) == (0, 99)
    assert range_of("bytes=900-", 1000) == (900, 999)
    assert range_of("bytes=900-5000", 1000) == (900, 999)
    assert range_of("bytes=1000-1001", 1000) is None
    assert range_of("bytes=5-4", 1000) is None
    with pytest.raises(ValueError):
        range_of("bytes=0-1,5-6", 1000)
    with pytest.raises(ValueError):
        range_of("items=0-1", 1000)
