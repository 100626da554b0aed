"""Scenario files: what `shoal lab check` accepts, and one line for each thing it refuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.daemons.runtime.config import ConfigError
from shoal.lab.scenario import parse_scenario

GOOD = """
[lab]
seed = 3
[link]
upload = 2.0
download = 8.0
delay = 5.0
[[host]]
name = "seed"
daemons = ["tracker", "peer"]
[host.link]
upload = 4.0
[[host]]
name = "leech"
count = 3
daemons = ["peer"]
[[fault]]
at = 2.5
kind = "kill"
host = "leech2"
daemon = "peer"
[[fault]]
at = 1.0
kind = "link"
host = "leech1"
delay = 20.0
duration = 3.0
"""


def test_a_good_scenario_expands_hosts_and_merges_link_defaults():
    s = parse_scenario(GOOD, source="good.toml")
    assert [h.name for h in s.hosts] == ["seed", "leech1", "leech2", "leech3"]
    assert s.host("seed").link.upload == 4.0 and s.host("seed").link.download == 8.0
    assert s.host("leech3").link.upload == 2.0 and s.host("leech3").link.delay == 5.0
    assert s.address("seed") == "198.18.0.1" and s.address("leech3") == "198.18.0.4"
    assert [f.kind for f in s.faults] == ["link", "kill"]  # in time order


BAD = {
    "unknown key": (GOOD.replace("seed = 3", "seed = 3\nsede = 4"), "lab.sede: unknown key"),
    "unknown key in a host's link": (GOOD.replace("upload = 4.0", "uplaod = 4.0"), "host[0].link.uplaod: unknown key"),
    "unknown daemon": (GOOD.replace('daemons = ["peer"]', 'daemons = ["peer", "ftpd"]'),
                       "host[1].daemons: unknown daemon 'ftpd'"),
    "negative fault time": (GOOD.replace("at = 2.5", "at = -1.0"), "fault[0].at: must be at least 0.0"),
    "fault on a daemon the host does not run": (GOOD.replace('daemon = "peer"', 'daemon = "tracker"'),
                                                "fault[0].daemon: host 'leech2' runs no 'tracker'"),
    "fault on no host": (GOOD.replace('host = "leech2"', 'host = "leech9"'), "fault[0].host: no host is named"),
    "override for a daemon the host does not run": (
        GOOD + '[[host]]\nname = "x"\ndaemons = ["peer"]\n[host.config.tracker.tracker]\nnumwant = 5\n',
        "host[2].config.tracker: the host does not run this daemon"),
    "two hosts of one name": (GOOD + '[[host]]\nname = "leech1"\n', "host: two hosts are named 'leech1'"),
    "jitter above delay": (GOOD.replace("delay = 5.0", "delay = 5.0\njitter = 9.0"), "link.jitter: 9.0 ms"),
    "bad host name": (GOOD.replace('name = "seed"', 'name = "Seed_1"'), "host[0].name: 'Seed_1'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenarios_are_refused_naming_file_and_key(case):
    text, expected = BAD[case]
    with pytest.raises(ConfigError) as err:
        parse_scenario(text, source="bad.toml")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("bad.toml: ") and expected in line, line


def shoal_lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", "lab", *args], capture_output=True, text=True,
                          timeout=120)


CHECKED = {
    **{case: BAD[case] for case in ("unknown key", "unknown daemon", "negative fault time")},
    # a daemon's own settings are judged on the rendered config, with what the lab adds
    "bad override": (GOOD + '[[host]]\nname = "x"\ndaemons = ["peer"]\n[host.config.peer.peer]\nnumwant = "lots"\n',
                     "host x: config.peer.peer.numwant: expected an integer"),
    "override that no config allows": (
        GOOD + '[[host]]\nname = "x"\ndaemons = ["peer"]\n[host.config.peer.peer]\nnumwnat = 5\n',
        "config.peer.peer.numwnat: unknown key"),
}


@pytest.mark.parametrize("case", sorted(CHECKED))
def test_lab_check_prints_one_line_and_exits_2(tmp_path: Path, case: str):
    f = tmp_path / "s.toml"
    f.write_text(CHECKED[case][0])
    done = shoal_lab("check", str(f))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and CHECKED[case][1] in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_lab_check_refuses_a_subnet_this_machine_routes(tmp_path: Path):
    # 127.0.0.0/8 is routed on every Linux machine (the local table)
    f = tmp_path / "s.toml"
    f.write_text(GOOD.replace("seed = 3", 'seed = 3\nsubnet = "127.0.0.0/16"'))
    done = shoal_lab("check", str(f))
    assert done.returncode == 2, done.stdout
    assert done.stderr.count("\n") == 1 and "lab.subnet: 127.0.0.0/16 overlaps this machine's routes" in done.stderr


def test_lab_check_accepts_a_good_scenario(tmp_path: Path):
    f = tmp_path / "s.toml"
    f.write_text(GOOD)
    done = shoal_lab("check", str(f))
    assert done.returncode == 0, done.stderr
    assert "ok: 4 hosts, 5 daemons, experiment none, 2 faults" in done.stdout


SHIPPED = sorted(str(p) for p in (Path(__file__).parents[2] / "configs" / "lab").glob("*.toml"))


def test_scenarios_are_shipped():
    names = {Path(p).stem for p in SHIPPED}
    assert {"swarm", "dispatch", "checkpoint", "telemetry"} <= names, names


@pytest.mark.parametrize("shipped", SHIPPED)
def test_shipped_scenarios_check(shipped: str):
    done = shoal_lab("check", shipped)
    assert done.returncode == 0, done.stderr
