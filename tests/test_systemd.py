"""Every unit under a real systemd 252, booted as PID 1 (tests/systemdlab.py).

Shoal goes in as an operator installs it: a wheel built from this checkout,
``pip install``-ed with its dependencies into a venv outside the paths the
units hide (``/opt/shoal-systemd-test``), ``shoal systemd install``, then
``systemctl enable --now`` of the target and all seven services, on their
shipped default configs (the telemetry daemon's window shortened so a test can
wait for one). The tests then share that machine, in file order, each leaving
every daemon running:

* READY through Type=notify, and the STATUS text naming the listeners;
* ``systemctl reload`` with a good config, then a bad one (kept running on the
  old one, said in one line), both counted;
* a task runs as ``nobody``, and cannot signal a daemon; who submitted is kept;
* a task runs in a cgroup of its own (on this cgroup v1 host, given to the
  worker by its unit's ``ExecStartPre=+``): over its memory limit it is killed
  and reported so;
* the watchdog kills and restarts a SIGSTOPped daemon, all seven at once;
* ``kill -9`` of every main PID: restarted, with the state directory (and the
  dispatcher's jobs) kept;
* the telemetry daemon trains and scores windows inside its sandbox
  (onnxruntime under MemoryDenyWriteExecute=yes);
* ``systemctl stop`` of each unit is clean (exit 0), and ``systemctl stop
  shoal.target`` returns only once every daemon has stopped;
* the static-user steps of docs/operations.md, as written.

Needs root and takes about two minutes, most of it pip and the watchdog's 30 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.daemons.runtime.registry import DAEMONS, METRICS_PORTS
from tests import systemdlab
from tests.harness import sample

ROOT = Path(__file__).resolve().parents[1]
VENV = Path("/opt/shoal-systemd-test")
UNITS = [d.unit for d in DAEMONS.values()]
DYNAMIC_UIDS = range(61184, 65520)  # systemd's DynamicUser= range

pytestmark = pytest.mark.skipif(
    systemdlab.missing() is not None and not os.environ.get("CI"),
    reason=f"a real systemd cannot be booted here: {systemdlab.missing()}")


def _install_venv(tmp: Path) -> None:
    """Build the wheel and pip-install it, with its dependencies, into VENV (as an operator would)."""
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp.glob("shoal-*.whl"))
    # Not the test's own Python: a pyenv build lives under /root, which the units hide.
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(VENV)], check=True)
    proc = subprocess.run([str(VENV / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    assert systemdlab.missing() is None, systemdlab.missing()
    tmp = tmp_path_factory.mktemp("systemd")
    try:
        _install_venv(tmp / "wheel")
        with systemdlab.boot(tmp / "machine", binds=(VENV, ROOT)) as m:
            m.run("ln", "-s", f"{VENV}/bin/shoal", "/usr/local/bin/shoal")
            out = m.run("shoal", "systemd", "install").stdout
            assert "systemctl daemon-reload && systemctl enable --now shoal.target" in out
            # A window every 2 s instead of 15 min, so that one can be waited for.
            m.run("sed", "-i", "-e", "s/^window = 900.0$/window = 2.0/", "-e", "s/^interval = 1.0$/interval = 0.25/",
                  "-e", "s/^min_windows = 10$/min_windows = 5/", "/etc/shoal/telemetry.toml")
            m.run("sh", "-c", "systemctl daemon-reload && systemctl enable --now shoal.target " + " ".join(UNITS))
            yield m
    finally:
        shutil.rmtree(VENV, ignore_errors=True)


def metrics(m: systemdlab.Machine, name: str) -> str:
    return m.run("curl", "-sf", f"http://127.0.0.1:{METRICS_PORTS[name]}/metrics", check=False).stdout


def main_pid(m: systemdlab.Machine, unit: str) -> int:
    return int(m.show(unit, "MainPID")["MainPID"])


def all_running(m: systemdlab.Machine) -> bool:
    return all(m.show(u, "SubState")["SubState"] == "running" for u in UNITS)


def restarted(m: systemdlab.Machine, before: dict[str, dict[str, str]]) -> bool:
    """Every unit has restarted once more than ``before`` and runs again, under a new PID."""
    for unit, old in before.items():
        now = m.show(unit, "NRestarts", "MainPID", "SubState")
        if not (int(now["NRestarts"]) > int(old["NRestarts"]) and now["SubState"] == "running"
                and now["MainPID"] not in ("0", old["MainPID"])):
            return False
    return True


def test_every_unit_is_ready_through_notify_with_its_status(machine):
    for name, d in DAEMONS.items():
        s = machine.show(d.unit, "Type", "ActiveState", "SubState", "StatusText", "NRestarts", "ExecMainStartTimestamp")
        assert (s["Type"], s["ActiveState"], s["SubState"]) == ("notify", "active", "running"), s
        assert s["StatusText"].startswith(f"listening metrics=127.0.0.1:{METRICS_PORTS[name]}"), s
        assert s["NRestarts"] == "0", s
        assert sample(metrics(machine, name), f"shoal_{name}_build_info", version="0.1.0") == 1.0
    assert machine.show("shoal.target", "ActiveState")["ActiveState"] == "active"


def test_reload_takes_a_good_config_and_refuses_a_bad_one(machine):
    for name, d in DAEMONS.items():
        conf = f"/etc/shoal/{d.config_file}"
        pid = main_pid(machine, d.unit)
        machine.run("cp", conf, f"{conf}.orig")

        def reloads(result: str, name=name) -> float | None:
            return sample(metrics(machine, name), f"shoal_{name}_config_reloads_total", result=result)

        machine.run("sed", "-i", 's/^log_level = "info"$/log_level = "debug"/', conf)
        machine.systemctl("reload", d.unit)
        machine.wait(f"{d.unit} to take the good config", lambda: reloads("ok") == 1.0)

        machine.run("sh", "-c", f"echo '[daemon' >> {conf}")
        machine.systemctl("reload", d.unit)
        machine.wait(f"{d.unit} to refuse the bad config", lambda: reloads("error") == 1.0)
        assert main_pid(machine, d.unit) == pid and machine.show(d.unit, "SubState")["SubState"] == "running"
        refused = [line for line in machine.journal(d.unit).splitlines() if "config reload failed" in line]
        assert len(refused) == 1 and conf in refused[0], machine.journal(d.unit)

        machine.run("mv", f"{conf}.orig", conf)
        machine.systemctl("reload", d.unit)
        machine.wait(f"{d.unit} to take the original config back", lambda: reloads("ok") == 2.0)
        assert main_pid(machine, d.unit) == pid


def test_a_task_runs_as_nobody_and_cannot_signal_a_daemon(machine):
    tracker = main_pid(machine, "shoal-tracker.service")
    job = (f'name = "intruder"\n[[tasks]]\nname = "hup"\n'
           f'command = ["sh", "-c", "id -u; kill -HUP {tracker} || echo refused"]\n')
    machine.run("sh", "-c", "cat > /root/job.toml", input=job)
    out = machine.run("shoal", "submit", "--wait", "/root/job.toml", timeout=60).stdout
    number = re.search(r"job (\d+) accepted", out).group(1)
    logs = machine.run("shoal", "job", number, "--logs").stdout
    nobody = machine.run("id", "-u", "nobody").stdout.strip()
    assert f"\n    {nobody}\n" in logs and "refused" in logs, logs
    assert "Operation not permitted" in logs, logs
    assert main_pid(machine, "shoal-tracker.service") == tracker
    assert sample(metrics(machine, "tracker"), "shoal_tracker_config_reloads_total", result="ok") == 2.0
    assert re.search(rf"^\s*{number} intruder .* root\s*$", machine.run("shoal", "jobs").stdout, re.M)
    # On a v1 (hybrid) host the unit's ExecStartPre=+ hands the worker its memory and cpu
    # directories; on v2, Delegate=yes does. Either way the worker says where tasks go.
    cgroup_lines = [line for line in machine.journal("shoal-worker.service").splitlines() if "cgroup" in line]
    assert len([line for line in cgroup_lines if "tasks run in cgroups under" in line]) == 1, cgroup_lines


HOG = """
import sys
for line in open("/proc/self/cgroup").read().splitlines():
    print("cgroup", line)
sys.stdout.flush()
hog = bytearray(256 << 20)
print("survived")
"""


def test_a_task_runs_in_its_own_cgroup_and_is_killed_over_its_memory_limit(machine):
    machine.run("sh", "-c", "cat > /usr/local/lib/hog.py && chmod 644 /usr/local/lib/hog.py", input=HOG)
    job = ('name = "hog"\n[[tasks]]\nname = "hog"\ncpus = 0.5\nmemory = "64MiB"\n'
           'command = ["python3", "/usr/local/lib/hog.py"]\n')
    machine.run("sh", "-c", "cat > /root/hog.toml", input=job)
    out = machine.run("shoal", "submit", "--wait", "/root/hog.toml", check=False, timeout=60).stdout
    number = re.search(r"job (\d+) accepted", out).group(1)
    logs = machine.run("shoal", "job", number, "--logs").stdout
    assert "memory limit exceeded (64 MiB)" in logs and "survived" not in logs, logs
    # Its own cgroup in each hierarchy that holds a limit (the files in it are the worker's;
    # tests/worker/test_isolation.py reads the limits written there).
    hybrid = any(":memory:" in line for line in Path("/proc/self/cgroup").read_text().splitlines())
    for hierarchy in (["memory", "cpu"] if hybrid else [""]):
        own = rf"cgroup \d+:{hierarchy}:/system\.slice/shoal-worker\.service/task-\d+-\d+$"
        assert re.search(own, logs, re.M), (hierarchy, logs)


def test_the_watchdog_restarts_a_stopped_daemon(machine):
    before = {u: machine.show(u, "NRestarts", "MainPID") for u in UNITS}
    for u in UNITS:
        machine.run("kill", "-STOP", before[u]["MainPID"])
    # WatchdogSec=30, then SIGABRT, TimeoutAbortSec (= TimeoutStopSec) until SIGKILL, RestartSec=5.
    machine.wait("the watchdog to restart every daemon", lambda: restarted(machine, before), timeout=120,
                 units=tuple(UNITS))
    for u in UNITS:
        assert "Watchdog timeout" in machine.journal(u), machine.journal(u)


def test_kill_9_restarts_the_daemon_with_its_state(machine):
    jobs = machine.run("shoal", "jobs").stdout
    assert "intruder" in jobs
    state = {u: set(machine.run("find", f"/var/lib/private/shoal-{d}", "-maxdepth", "1").stdout.split())
             for d, u in zip(DAEMONS, UNITS, strict=True)}
    before = {u: machine.show(u, "NRestarts", "MainPID") for u in UNITS}
    for u in UNITS:
        machine.run("kill", "-9", before[u]["MainPID"])
    machine.wait("systemd to restart every daemon", lambda: restarted(machine, before), timeout=60,
                 units=tuple(UNITS))
    for d, u in zip(DAEMONS, UNITS, strict=True):
        after = set(machine.run("find", f"/var/lib/private/shoal-{d}", "-maxdepth", "1").stdout.split())
        assert state[u] <= after, (u, state[u] - after)
        assert machine.show(u, "Result")["Result"] == "success"
    assert "intruder" in machine.run("shoal", "jobs").stdout


def test_telemetry_trains_and_scores_windows_inside_its_sandbox(machine):
    def stored() -> float:
        return sample(metrics(machine, "telemetry"), "shoal_telemetry_windows_stored") or 0.0

    machine.wait("five stored windows", lambda: stored() >= 5, timeout=60)
    out = machine.run("shoal", "telemetry", "train", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    text = metrics(machine, "telemetry")
    assert sample(text, "shoal_telemetry_model_installs_total", origin="local", outcome="ok") == 1.0, text

    def scored() -> bool:
        t = metrics(machine, "telemetry")
        return (sample(t, "shoal_telemetry_windows_total", result="normal") or 0) + (
            sample(t, "shoal_telemetry_windows_total", result="anomalous") or 0) >= 1
    machine.wait("a scored window", scored, timeout=60)
    assert (sample(metrics(machine, "telemetry"), "shoal_telemetry_score_duration_seconds_count") or 0) >= 1
    assert machine.show("shoal-telemetry.service", "MemoryDenyWriteExecute")["MemoryDenyWriteExecute"] == "yes"


def test_each_unit_stops_cleanly(machine):
    for u in UNITS:
        machine.systemctl("stop", u)
        s = machine.show(u, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, (u, s)
        machine.systemctl("start", u)
    assert all_running(machine)


def test_stopping_the_target_returns_once_every_daemon_has_stopped(machine):
    machine.systemctl("stop", "shoal.target")
    states = {u: machine.show(u, "ActiveState")["ActiveState"] for u in UNITS}
    assert set(states.values()) == {"inactive"}, states
    machine.systemctl("start", "shoal.target")
    machine.wait("every daemon to run again", lambda: all_running(machine), units=tuple(UNITS))


def test_the_static_user_steps_of_the_docs_work_as_written(machine):
    doc = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(r"install the static user; systemd then uses it instead\..*?```sh\n(.*?)```", doc, re.S)
    assert block, "docs/operations.md: the static-user steps moved"
    steps = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    # Each unit has started six times in as many minutes here, more than StartLimitBurst=5
    # allows; the docs say to re-arm it, as an operator in that position would.
    machine.systemctl("reset-failed")
    # "from a checkout": the checkout is where the docs say, so run them from it.
    for step in steps:
        machine.run("sh", "-c", f"cd {ROOT} && {step}")
    machine.wait("every daemon to run again", lambda: all_running(machine), units=tuple(UNITS))
    uid = int(machine.run("id", "-u", "shoal").stdout)
    assert uid not in DYNAMIC_UIDS and uid < 1000, uid
    for u in UNITS:
        pid = main_pid(machine, u)
        owner = machine.run("stat", "-c", "%u", f"/proc/{pid}").stdout.strip()
        assert int(owner) == uid, (u, owner, uid)
