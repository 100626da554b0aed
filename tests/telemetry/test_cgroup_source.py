"""The cgroup source: one cgroup's CPU, memory and IO, from fixture trees (v1, v2) and a real cgroup."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.daemons.runtime.config import ConfigError, parse_config
from shoal.daemons.telemetry.config import TelemetryConfig
from shoal.daemons.telemetry.sources import CgroupSource, Collector, default_sources

CG = "/shoal-lab-ab12/host1"


def v1_tree(root: Path, cpu_ns: int = 0, mem: int = 0, read: int = 0, written: int = 0, throttled_ns: int = 0,
            blkio: bool = True) -> None:
    """A cgroup v1 machine whose process is in CG (cpu, cpuacct, memory, blkio) and / elsewhere."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(
        f"9:name=systemd:/\n8:pids:{CG}\n7:blkio:{CG}\n4:memory:{CG}\n2:cpuacct:{CG}\n1:cpu:{CG}\n0::/\n")
    for h in ("cpuacct", "cpu", "memory", "blkio", "pids"):
        (root / "sys/fs/cgroup" / h / CG.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / h / "cgroup.procs").write_text("1\n")
    d = root / "sys/fs/cgroup"
    (d / "cpuacct" / CG.lstrip("/") / "cpuacct.usage").write_text(f"{cpu_ns}\n")
    (d / "cpu" / CG.lstrip("/") / "cpu.stat").write_text(
        f"nr_periods 10\nnr_throttled 2\nthrottled_time {throttled_ns}\n")
    (d / "memory" / CG.lstrip("/") / "memory.usage_in_bytes").write_text(f"{mem}\n")
    if blkio:
        (d / "blkio" / CG.lstrip("/") / "blkio.throttle.io_service_bytes_recursive").write_text(
            f"8:0 Read {read - 100}\n8:0 Write {written}\n8:0 Sync 5\n8:0 Async 6\n8:0 Discard 0\n"
            f"8:0 Total {read + written - 100}\n8:16 Read 100\n8:16 Write 0\nTotal {read + written}\n")


def v2_tree(root: Path, usage_us: int = 0, mem: int = 0, read: int = 0, written: int = 0, memory: bool = True) -> None:
    """A v2-only machine (the unified tree at sys/fs/cgroup), the process in CG."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(f"0::{CG}\n")
    d = root / "sys/fs/cgroup"
    (d / CG.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (d / "cgroup.controllers").write_text("cpu io memory pids\n")
    (d / "cgroup.procs").write_text("1\n")
    (d / CG.lstrip("/") / "cpu.stat").write_text(
        f"usage_usec {usage_us}\nuser_usec 1\nsystem_usec 2\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n")
    if memory:
        (d / CG.lstrip("/") / "memory.current").write_text(f"{mem}\n")
    (d / CG.lstrip("/") / "io.stat").write_text(
        f"8:0 rbytes={read} wbytes={written - 7} rios=3 wios=4 dbytes=0 dios=0\n"
        f"8:16 rbytes=0 wbytes=7 rios=0 wios=1 dbytes=0 dios=0\n")


def test_v1_cgroup_of_self_gives_cpu_memory_io_and_throttling_rates(tmp_path):
    v1_tree(tmp_path, cpu_ns=10**9, mem=5 << 20, read=1000, written=4096, throttled_ns=0)
    col = Collector(default_sources(tmp_path, gpu=False, cgroup="self"))
    first = col.sample(100.0)
    assert first["cgroup_memory.bytes"] == 5 << 20
    assert "cgroup_cpu.seconds_per_s" not in first  # a rate needs two readings
    v1_tree(tmp_path, cpu_ns=4 * 10**9, mem=7 << 20, read=1000 + 2 * 4096, written=4096 + 8 * 4096,
            throttled_ns=10**9)
    s = col.sample(102.0)
    assert s["cgroup_cpu.seconds_per_s"] == pytest.approx(1.5)  # 3 CPU seconds in 2 s
    assert s["cgroup_memory.bytes"] == 7 << 20
    assert s["cgroup_read.bytes_per_s"] == pytest.approx(4096)  # both devices, Total lines not counted twice
    assert s["cgroup_written.bytes_per_s"] == pytest.approx(4 * 4096)
    assert s["cgroup_throttled.seconds_per_s"] == pytest.approx(0.5)


def test_v2_cgroup_reads_the_unified_tree(tmp_path):
    v2_tree(tmp_path, usage_us=0, mem=1 << 20, read=0, written=7)
    col = Collector([CgroupSource(tmp_path, "self")])
    col.sample(10.0)
    v2_tree(tmp_path, usage_us=250_000, mem=3 << 20, read=8192, written=7 + 512)
    s = col.sample(11.0)
    assert s == {"cgroup_memory.bytes": 3 << 20, "cgroup_cpu.seconds_per_s": pytest.approx(0.25),
                 "cgroup_throttled.seconds_per_s": 0.0, "cgroup_read.bytes_per_s": 8192.0,
                 "cgroup_written.bytes_per_s": 512.0}


def test_an_absolute_path_is_read_in_every_hierarchy(tmp_path):
    v1_tree(tmp_path, cpu_ns=5, mem=9)
    src = CgroupSource(tmp_path, CG)  # not "self": /proc/self/cgroup is not read
    (tmp_path / "proc/self/cgroup").unlink()
    assert src.available() and src.read().gauges == {"cgroup_memory.bytes": 9.0}
    assert not CgroupSource(tmp_path, "/no/such/cgroup").available()


def test_missing_files_leave_their_metric_out(tmp_path):
    v2_tree(tmp_path, usage_us=1, memory=False)  # the v2 root cgroup has no memory.current
    r = CgroupSource(tmp_path, "self").read()
    assert "cgroup_memory.bytes" not in r.gauges and r.counters["cgroup_cpu.seconds"] == pytest.approx(1e-6)
    v1_tree(tmp_path / "v1", cpu_ns=7, blkio=False)
    r = CgroupSource(tmp_path / "v1", "self").read()
    assert "cgroup_read.bytes" not in r.counters and r.counters["cgroup_cpu.seconds"] == pytest.approx(7e-9)


def test_no_cgroup_is_absent_and_a_removed_one_is_an_error_not_a_crash(tmp_path, caplog):
    assert Collector(default_sources(tmp_path, gpu=False, cgroup="self")).absent.count("cgroup") == 1
    assert "cgroup" not in [s.name for s in default_sources(tmp_path, gpu=False)]  # off by default
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("garbage without colons\n")
    assert not CgroupSource(tmp_path, "self").available()

    node = tmp_path / "node"
    v1_tree(node, cpu_ns=1)
    errors: list[str] = []
    col = Collector([CgroupSource(node, "self")], on_error=errors.append)
    assert col.sample(1.0)
    for h in ("cpuacct", "cpu", "memory", "blkio"):  # the cgroup goes away (its files first, then it)
        for f in (node / "sys/fs/cgroup" / h / CG.lstrip("/")).iterdir():
            f.unlink()
    assert col.sample(2.0) == {} and col.sample(3.0) == {}
    assert errors == ["cgroup", "cgroup"]
    assert sum("telemetry source cgroup failed" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("bad", ["relative/path", "/a/../b", "selfish"])
def test_bad_cgroup_value_is_one_line_naming_the_key(bad):
    with pytest.raises(ConfigError) as err:
        parse_config(f'[collector]\ncgroup = "{bad}"\n', TelemetryConfig, source="telemetry.toml")
    assert "collector.cgroup" in str(err.value) and "\n" not in str(err.value)
    for good in ("", "self", "/", "/system.slice"):
        assert parse_config(f'[collector]\ncgroup = "{good}"\n', TelemetryConfig).collector.cgroup == good


def test_training_on_feature_prefixes_names_only_those(tmp_path):
    """[training] features = ["cgroup_"]: the model is trained on, and names, the cgroup features only."""
    from shoal.core.telemetry.model import Detector, ModelError
    from shoal.daemons.telemetry.store import StoredWindow
    from shoal.daemons.telemetry.trainer import train_local

    windows = [StoredWindow(float(i), i + 1.0, 10, {"cgroup_cpu.seconds_per_s:mean": 0.01 * (i % 3),
                                                    "cgroup_memory.bytes:mean": 1e6 + i,
                                                    "cpu_all_util:mean": 0.5}, None, None, None, None)
               for i in range(12)]
    kw = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "percentile": 98.0, "min_windows": 10}
    res = train_local(windows, tmp_path / "m.onnx", prefixes=["cgroup_"], **kw)
    assert res.features == 2 and res.windows == 12
    assert sorted(Detector.load(tmp_path / "m.onnx").feature_names) == ["cgroup_cpu.seconds_per_s:mean",
                                                                    "cgroup_memory.bytes:mean"]
    assert train_local(windows, tmp_path / "all.onnx", **kw).features == 3
    with pytest.raises(ModelError, match=r"no feature of this node starts with gpu_ \(\[training\] features\)"):
        train_local(windows, tmp_path / "none.onnx", prefixes=["gpu_"], **kw)


def _own_dir(hierarchy: str) -> Path | None:
    """This process's own cgroup directory in a v1 hierarchy, or in the unified tree (hierarchy "")."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if hierarchy in controllers.split(",") or (hierarchy == "" and controllers == ""):
            base = Path("/sys/fs/cgroup") / hierarchy if hierarchy else Path("/sys/fs/cgroup")
            d = base / rel.lstrip("/")
            return d if (d / "cgroup.procs").exists() else None
    return None


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="makes a cgroup: root only")
def test_a_real_cgroup_charges_a_busy_child_to_itself(tmp_path):
    """A child in a new cgroup under ours burns CPU: the source watching that cgroup sees it, as
    "self" from inside (a lab host's telemetry daemon) and by path from outside."""
    v2_only = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    parent = _own_dir("" if v2_only else "cpuacct")
    assert parent is not None, "no cpu accounting cgroup of our own"
    d = parent / f"shoal-test-{secrets.token_hex(3)}"
    d.mkdir()
    try:
        mount = Path("/sys/fs/cgroup") if v2_only else Path("/sys/fs/cgroup/cpuacct")
        path = "/" + str(d.relative_to(mount))
        outside = Collector([CgroupSource(Path("/"), path)])
        outside.sample(time.monotonic())
        code = ("import json, pathlib, time; from shoal.daemons.telemetry.sources import CgroupSource; "
                "s = CgroupSource(pathlib.Path('/'), 'self'); key = 'v2' if 'cpuacct' not in s.dirs() else 'cpuacct'; "
                "t = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
                "print(json.dumps([str(s.dirs()[key]), s.read().counters['cgroup_cpu.seconds']]))")
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               preexec_fn=lambda: (d / "cgroup.procs").write_text("0"))
        assert child.returncode == 0, child.stderr
        seen_dir, seen_cpu = json.loads(child.stdout)
        assert seen_dir == str(d) and seen_cpu >= 0.5  # "self" is the child's own cgroup, which it charged
        rate = outside.sample(time.monotonic())["cgroup_cpu.seconds_per_s"]
        assert rate > 0
        total = CgroupSource(Path("/"), path).read().counters["cgroup_cpu.seconds"]
        assert total >= 0.5 and total >= seen_cpu
    finally:
        _rmdir(d)


def _rmdir(d: Path, timeout: float = 10.0) -> None:
    """Remove an emptied cgroup: a reaped process may still be leaving it (EBUSY) for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # polled under the deadline above


async def test_federated_training_data_holds_the_same_features_as_a_local_model(tmp_path):
    """[training] features applies to what a FedAvg round trains on too, not only to `shoal telemetry train`.

    Before, the daemon wrote every feature into fed/train.npz: a lab host's global
    model then learned the machine-wide signals its neighbours share.
    """
    import dataclasses
    import logging

    from prometheus_client import CollectorRegistry

    from shoal.core.telemetry.formats import decode_training_npz
    from shoal.core.telemetry.windows import Window
    from shoal.daemons.runtime.daemon import DaemonContext
    from shoal.daemons.runtime.metrics import runtime_metrics
    from shoal.daemons.runtime.sdnotify import Notifier
    from shoal.daemons.telemetry.daemon import TelemetryApp

    base = TelemetryConfig()
    cfg = dataclasses.replace(base, training=dataclasses.replace(base.training, features=("cgroup_",)))
    registry = CollectorRegistry()
    ctx = DaemonContext("telemetry", None, cfg, registry, tmp_path, Notifier({}),
                        runtime_metrics(registry, "telemetry"), logging.getLogger("test"))
    app = TelemetryApp(ctx)
    for i in range(3):
        app.store.add(Window(float(i), i + 1.0, 4,
                             {"cgroup_cpu.seconds_per_s:mean": 0.1 * i, "cpu_all_util:mean": 0.5}))
    await app._write_training_data()
    X, names = decode_training_npz(app.train_npz.read_bytes())
    assert names == ["cgroup_cpu.seconds_per_s:mean"] and X.shape == (3, 1)
    # a node with none of the features offers no data rather than crashing
    cfg = dataclasses.replace(base, training=dataclasses.replace(base.training, features=("gpu_",)))
    app.config = cfg
    app.train_npz.unlink()
    await app._write_training_data()
    assert not app.train_npz.exists()


def test_v2_cgroup_pressure_is_the_workloads_own_stall_share(tmp_path):
    v2_tree(tmp_path, usage_us=0, mem=1 << 20)
    cg = tmp_path / "sys/fs/cgroup" / CG.lstrip("/")

    def pressure(us: int) -> None:
        for res in ("cpu", "memory", "io"):
            (cg / f"{res}.pressure").write_text(
                f"some avg10=0.00 avg60=0.00 avg300=0.00 total={us}\n"
                f"full avg10=0.00 avg60=0.00 avg300=0.00 total={us // 4}\n")

    pressure(0)
    col = Collector([CgroupSource(tmp_path, "self")])
    col.sample(10.0)
    pressure(400_000)  # 0.4 s of 2 s stalled
    s = col.sample(12.0)
    assert s["cgroup_psi_cpu_some.stalled_per_s"] == pytest.approx(0.2)
    assert s["cgroup_psi_memory_full.stalled_per_s"] == pytest.approx(0.05)
    assert s["cgroup_psi_io_some.stalled_per_s"] == pytest.approx(0.2)
    (cg / "io.pressure").unlink()  # a kernel without it: left out, the rest goes on
    assert "cgroup_psi_io_some.stalled" not in CgroupSource(tmp_path, "self").read().counters


def test_training_leaves_out_excluded_feature_prefixes(tmp_path):
    """[training] exclude_features (default ["load_"]): the load averages are not trained on."""
    from shoal.core.telemetry.model import Detector, ModelError
    from shoal.daemons.telemetry.config import TelemetryConfig
    from shoal.daemons.telemetry.store import StoredWindow
    from shoal.daemons.telemetry.trainer import train_local

    assert TelemetryConfig().training.exclude_features == ("load_",)
    windows = [StoredWindow(float(i), i + 1.0, 10, {"load_15:mean": 1.0 + 0.01 * i, "proc_running:mean": i % 3,
                                                    "cpu_all_util:mean": 0.1 * (i % 4)}, None, None, None, None)
               for i in range(12)]
    kw = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "percentile": 98.0, "min_windows": 10}
    res = train_local(windows, tmp_path / "m.onnx", exclude=["load_"], **kw)
    assert res.features == 2
    assert sorted(Detector.load(tmp_path / "m.onnx").feature_names) == ["cpu_all_util:mean", "proc_running:mean"]
    assert train_local(windows, tmp_path / "p.onnx", prefixes=["cpu_", "load_"], exclude=["load_"], **kw).features == 1
    with pytest.raises(ModelError, match=r"starts with load_ and not with load_ \(exclude_features\)"):
        train_local(windows, tmp_path / "none.onnx", prefixes=["load_"], exclude=["load_"], **kw)
