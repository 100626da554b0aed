"""Nothing of a lab run outlives it: after a normal end, Ctrl-C, or kill -9 and `shoal lab down`.

Checked: the run's namespaces (and with them every veth and qdisc the lab
made), the root namespace's interfaces, every daemon and delay-line process,
the run's record and its work directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from pyroute2 import IPRoute

from shoal.lab import net as labnet
from shoal.lab.cgroups import HostCgroups
from shoal.lab.lab import RUNS_DIR, Lab
from shoal.lab.scenario import parse_scenario

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"),
                                reason="the lab makes network namespaces: root only (CI runs as root)")

SCENARIO = """
[link]
upload = 4.0
download = 4.0
delay = 1.0
[[host]]
name = "a"
daemons = ["tracker", "dispatcher"]
[[host]]
name = "b"
daemons = ["peer", "worker"]
"""


def root_interfaces() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return b") Z " not in f.read()  # a zombie has released everything
    except FileNotFoundError:
        return False


def lab_pids(run_id: str) -> list[int]:
    """The daemons' and delay lines' processes of a running lab."""
    return labnet.processes_in(labnet.lab_namespaces(run_id))


def assert_nothing_left(run_id: str, pids: list[int], interfaces_before: set[str]) -> None:
    assert labnet.lab_namespaces(run_id) == []
    assert not (RUNS_DIR / f"{run_id}.json").exists()
    assert not Path(f"/tmp/shoal-lab-{run_id}").exists()
    assert [p for p in pids if alive(p)] == []
    assert root_interfaces() == interfaces_before  # no veth, bridge or qdisc'd port left here
    assert [t for t in HostCgroups(run_id, []).tops if t.exists()] == []


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def test_a_normal_end_leaves_nothing():
    before = root_interfaces()
    with trio.fail_after(60):
        async with Lab(parse_scenario(SCENARIO, source="s.toml"), echo=None) as lab:
            run_id = lab.run_id
            pids = lab_pids(run_id)
            assert len(pids) >= 6  # four daemons and two delay lines
            assert all(p.pid for p in lab.daemons.values())
            assert all(t.is_dir() for t in lab.cgroups.tops)
    assert_nothing_left(run_id, pids, before)


def start_up(tmp_path: Path) -> tuple[subprocess.Popen, str, list[int]]:
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "lab", "up", str(f)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if " is up;" in line:
            run_id = line.split()[1]
            break
    else:
        raise AssertionError(f"shoal lab up did not come up: {proc.stderr.read() if proc.stderr else ''}")
    record = json.loads((RUNS_DIR / f"{run_id}.json").read_text())
    assert record["pid"] == proc.pid
    pids = lab_pids(run_id)
    assert len(pids) >= 6
    return proc, run_id, pids


def test_ctrl_c_takes_the_lab_down(tmp_path: Path):
    before = root_interfaces()
    proc, run_id, pids = start_up(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole foreground group
    assert proc.wait(timeout=60) == 0
    assert_nothing_left(run_id, pids, before)


def test_kill_9_then_lab_down_leaves_nothing(tmp_path: Path):
    before = root_interfaces()
    proc, run_id, pids = start_up(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    # the reaper notices its lab is gone and removes the run by itself ...
    wait_for(lambda: not labnet.lab_namespaces(run_id), 60, "the reaper to remove the run's namespaces")
    # ... and `shoal lab down` finds nothing of it left to remove
    done = subprocess.run([sys.executable, "-m", "shoal.cli.main", "lab", "down", "--run", run_id],
                          capture_output=True, text=True, timeout=60)
    assert_nothing_left(run_id, pids, before)
    assert done.returncode in (0, 2), done.stderr


def test_lab_down_removes_a_run_whose_lab_and_reaper_both_died(tmp_path: Path):
    before = root_interfaces()
    proc, run_id, pids = start_up(tmp_path)
    reapers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
               if _cmdline(p)[-2:] == ["shoal.lab.reaper", run_id]]
    assert len(reapers) == 1
    os.kill(reapers[0], signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert labnet.lab_namespaces(run_id)  # nobody cleaned up: everything is still there
    done = subprocess.run([sys.executable, "-m", "shoal.cli.main", "lab", "down", "--run", run_id],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"run {run_id}: its lab process is gone; removed" in done.stdout
    assert_nothing_left(run_id, pids, before)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def test_status_and_exec_see_the_running_lab(tmp_path: Path):
    before = root_interfaces()
    proc, run_id, pids = start_up(tmp_path)
    try:
        lab = [sys.executable, "-m", "shoal.cli.main", "lab"]
        status = subprocess.run([*lab, "status", "--run", run_id], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        out = status.stdout
        assert f"run {run_id}: " in out and "running" in out
        assert "198.18.0.1" in out and "198.18.0.2" in out
        assert "up 4 down 4 MiB/s, delay 1+-0 ms, loss 0%" in out
        assert "daemons: tracker, dispatcher" in out and "daemons: peer, worker" in out and "(down)" not in out
        # a command inside host b: its interfaces are b's (eth0 with b's address), not this machine's
        shown = subprocess.run([*lab, "exec", "--run", run_id, "b", "--", sys.executable, "-c",
                                "import socket, fcntl, struct; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                                "print(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915,"
                                " struct.pack('256s', b'eth0'))[20:24]))"],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == "198.18.0.2"
        missing = subprocess.run([*lab, "exec", "nohost", "--", "true"], capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2 and "no running lab has a host 'nohost'" in missing.stderr
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert_nothing_left(run_id, pids, before)
