"""Fault injectors: every HPAS kind bounded on every resource and sized to the node, each doing
what it says within its bounds; the network fault over a real veth pair; the CLI's time parsing."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.daemons.telemetry import inject as inj
from shoal.daemons.telemetry.cli import parse_time
from shoal.daemons.telemetry.inject import KINDS, VETH_HOST, Node, inject, plan, run
from shoal.daemons.telemetry.sources import Collector, NetSource

GiB = 1 << 30
# This machine's shape, and a big node and a small one: plans are pure functions of these.
SMALL = Node(cpus=2, mem_total=4 * GiB, mem_available=3 * GiB, llc_bytes=8 << 20, disk_free=20 * GiB)
BIG = Node(cpus=128, mem_total=1024 * GiB, mem_available=900 * GiB, llc_bytes=256 << 20, disk_free=10 << 40)


@pytest.mark.parametrize("node", [SMALL, BIG], ids=["small", "big"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_bounded_on_every_resource_even_at_full_intensity_for_a_day(kind, node):
    p = plan(kind, 86400.0, node, intensity=1.0)
    assert p.kind == kind and p.duration == 86400.0
    assert p.workers <= 4 * node.cpus
    # memory: never more than MemAvailable less the reserve
    assert p.memory_bytes <= node.mem_available - max(inj.MEM_RESERVE_MIN, inj.MEM_RESERVE_SHARE * node.mem_total)
    assert p.disk_bytes <= min(inj.IO_TOTAL_MAX, inj.IO_FREE_SHARE * node.disk_free)
    assert p.file_bytes <= inj.IO_FILE_MAX and p.files <= inj.META_FILES_ALIVE
    assert p.net_bytes <= inj.NET_TOTAL_MAX
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        assert not isinstance(v, float) or v == v and v != float("inf")


def test_the_io_fault_writes_a_bounded_total_not_62_gib_in_20_s():
    # The old injector rewrote its file as fast as the disk took it: 62-88 GiB in 20 s.
    p = plan("io", 20.0, BIG)
    assert p.kind == "iobandwidth" and p.disk_bytes <= 20 * inj.IO_MAX_RATE <= 6 * GiB
    assert plan("iobandwidth", 20.0, BIG, intensity=0.25).disk_bytes == 20 * inj.IO_MAX_RATE // 4
    # ... and never a tenth of the free space or more
    tight = dataclasses.replace(BIG, disk_free=100 << 20)
    assert plan("iobandwidth", 20.0, tight).disk_bytes == 10 << 20


def test_faults_are_sized_to_the_node():
    leak_small, leak_big = plan("memleak", 10, SMALL), plan("memleak", 10, BIG)
    assert leak_small.memory_bytes == SMALL.mem_total // 4  # a share of the node, not a fixed 512 MiB
    assert leak_big.memory_bytes == BIG.mem_total // 4
    assert plan("memeater", 10, SMALL, intensity=0.5).memory_bytes == SMALL.mem_total // 2
    capped = plan("memleak", 10, SMALL, intensity=1.0)  # all of MemTotal: capped, and it says so
    assert capped.memory_bytes == SMALL.mem_available - inj.MEM_RESERVE_MIN and capped.notes
    assert plan("cpuoccupy", 10, BIG).workers == 128 and plan("cpuoccupy", 10, BIG, intensity=0.3).duty == 0.3
    assert plan("cachecopy", 10, BIG, intensity=0.5).workers == 64
    assert plan("cachecopy", 10, SMALL).buffer_bytes == SMALL.llc_bytes  # the cache's size: contention
    assert plan("membw", 10, SMALL).buffer_bytes >= 4 * SMALL.llc_bytes  # far past it: bandwidth
    assert plan("netoccupy", 10, SMALL, intensity=0.5).rate == inj.NET_MAX_RATE / 2


@pytest.mark.parametrize("kind, kw, what", [
    ("cpu", {"duration": 0}, "duration"),
    ("disk", {"duration": 1.0}, "unknown fault kind"),
    ("mem", {"duration": 1e9}, "duration"),
    ("membw", {"duration": 1.0, "intensity": 0.0}, "intensity"),
    ("membw", {"duration": 1.0, "intensity": 1.5}, "intensity"),
    ("cpuoccupy", {"duration": 1.0, "workers": 10_000}, "workers"),
    ("memleak", {"duration": 1.0, "mib": -1}, "mib"),
])
def test_bad_requests_are_refused(kind, kw, what):
    with pytest.raises(ValueError, match=what):
        plan(kind, node=SMALL, **{"duration": 1.0, **kw})


def test_a_node_without_room_is_refused_not_squeezed():
    full = dataclasses.replace(SMALL, mem_available=256 << 20)
    for kind in ("memleak", "memeater"):
        with pytest.raises(ValueError, match="MemAvailable"):
            plan(kind, 10, full)
    with pytest.raises(ValueError, match="free space"):
        plan("iobandwidth", 10, dataclasses.replace(SMALL, disk_free=1 << 20))


def test_cpu_hog_burns_cpu_for_its_duration():
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    start = time.monotonic()
    assert inject("cpu", 1.0, workers=1) == {"kind": "cpuoccupy", "workers": 1}
    assert time.monotonic() - start >= 1.0
    # The busy child ran whenever it got a CPU: 0.2 s of 1 s is what it gets even
    # with 8 other runnable processes on 2 cores, and far more than a sleeper.
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before >= 0.2


def test_a_partial_duty_cpu_hog_sleeps_the_rest_of_each_period():
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    inject("cpuoccupy", 1.0, workers=1, intensity=0.2)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert 0.0 < used <= 0.2 + 0.15  # its duty, plus the start-up of the child


@pytest.mark.parametrize("kind", ["memleak", "memeater"])
def test_memory_faults_hold_their_share_of_the_node_and_release_it(kind):
    node = dataclasses.replace(SMALL, mem_total=1 * GiB)  # 64 MiB at intensity 1/16
    want = plan(kind, 0.6, node, intensity=1 / 16).memory_bytes
    q = mp.get_context("fork").Queue()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    p = mp.get_context("fork").Process(
        target=lambda: q.put(inject(kind, 0.6, node=node, intensity=1 / 16)))
    p.start()
    r = q.get(timeout=30)
    p.join(30)
    assert p.exitcode == 0 and r["kind"] == kind and r["peak_mib"] << 20 <= want
    assert r["peak_mib"] >= (want >> 20) * 0.9
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(peak_kib, before) * 1024 >= want * 0.9  # resident, not only reserved


@pytest.mark.parametrize("kind", ["cachecopy", "membw"])
def test_copy_faults_run_their_workers(kind):
    node = dataclasses.replace(SMALL, llc_bytes=1 << 20, mem_available=2 * GiB)
    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime  # page faults on its buffers are system time

    before = cpu()
    r = inject(kind, 0.8, node=node, workers=1)
    assert r["kind"] == kind and r["workers"] == 1 and r["buffer_mib"] >= 1
    assert cpu() - before > 0.02  # it ran (a sleeper would use ~0), even on a loaded machine


def test_io_faults_stop_at_their_total_and_leave_nothing(tmp_path):
    # A rate bound: 8 MiB/s for 0.5 s is ~4 MiB, not what the disk could take.
    node = dataclasses.replace(SMALL, disk_free=100 * GiB)
    r = inject("iobandwidth", 0.5, node=node, intensity=8 / 256, directory=str(tmp_path))
    assert 1 << 20 <= r["written_bytes"] <= 5 << 20
    # A total bound: a filesystem with 30 MiB free may take 3 MiB from the fault, however long.
    small_disk = dataclasses.replace(SMALL, disk_free=30 << 20)
    p = plan("iobandwidth", 30.0, small_disk)
    start = time.monotonic()
    r = run(p, directory=str(tmp_path))
    assert r["written_bytes"] == p.disk_bytes == 3 << 20 and time.monotonic() - start < 20
    r = inject("iometadata", 0.5, node=node, intensity=0.1, directory=str(tmp_path))
    assert 10 <= r["files_created"] <= 0.5 * 0.1 * inj.META_MAX_RATE + 1
    assert list(tmp_path.iterdir()) == []  # scratch files and directories are gone


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30).stdout


def test_network_fault_crosses_a_real_interface_the_net_source_sees():
    col = Collector([NetSource(Path("/"))])
    rates: list[float] = []
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(inject("net", 2.0, intensity=0.2)))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not Path(f"/sys/class/net/{VETH_HOST}").exists():  # the pair exists: the fault is on
            assert time.monotonic() < deadline and t.is_alive()
            time.sleep(0.01)
        col.sample(time.time())
        tx0 = int(Path(f"/sys/class/net/{VETH_HOST}/statistics/tx_bytes").read_text())
        while int(Path(f"/sys/class/net/{VETH_HOST}/statistics/tx_bytes").read_text()) < tx0 + (2 << 20):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        s = col.sample(time.time())
        rates = [s.get(f"net_{VETH_HOST}_tx.bytes_per_s", 0.0), s.get("net_all_tx.bytes_per_s", 0.0)]
    finally:
        t.join(30)
    assert rates[0] > 1e6 and rates[1] >= rates[0]  # per interface and in the node's total
    assert result["received_bytes"] == result["sent_bytes"] > 0
    assert result["interface_tx_bytes"] >= result["sent_bytes"]
    assert result["sent_bytes"] <= 2.0 * 0.2 * inj.NET_MAX_RATE
    # Everything it made is gone: the pair and the namespace.
    assert not Path(f"/sys/class/net/{VETH_HOST}").exists()
    assert not [ns for ns in _ip("netns", "list").split() if ns.startswith(inj.NETNS_PREFIX)]


def test_a_namespace_left_by_a_killed_injector_is_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ns = f"{inj.NETNS_PREFIX}{dead.pid}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        assert ns in inj.remove_stale_netns()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    assert ns not in _ip("netns", "list")


def test_cli_dry_run_prints_the_bounds():
    out = subprocess.run([sys.executable, "-m", "shoal.cli.main", "telemetry", "inject", "io", "--duration", "20",
                          "--dry-run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "iobandwidth" in out.stdout and "disk " in out.stdout
    bad = subprocess.run([sys.executable, "-m", "shoal.cli.main", "telemetry", "inject", "membw", "--duration",
                          "5", "--intensity", "2", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "shoal: intensity must be in (0, 1]"


def test_parse_time_forms():
    now = 1_700_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("now+900", now) == now + 900
    assert parse_time("now-60", now) == now - 60
    assert parse_time("1700000123", now) == 1700000123.0
    assert parse_time("2023-11-14T22:13:20Z", now) == 1_700_000_000.0
    with pytest.raises(ValueError):
        parse_time("yesterday", now)


def test_a_leak_too_large_to_grow_in_time_stops_at_its_duration():
    # 20 steps of 256 MiB in 0.3 s: no node allocates and touches that fast; the leak stops growing
    # at its deadline instead of overrunning it (a 6 s leak of 4 GiB took 10.7 s before).
    p = dataclasses.replace(plan("memleak", 0.3, BIG), memory_bytes=5 * GiB)
    start = time.monotonic()
    r = run(p)
    assert time.monotonic() - start < 0.3 + 1.0 and r["peak_mib"] < 5 * 1024
