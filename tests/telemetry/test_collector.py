"""The collector against a fake /proc and /sys tree, sensors missing and vanishing."""

from __future__ import annotations

import logging
import shutil

import pytest

from shoal.daemons.telemetry.sources import (
    Collector,
    GpuSource,
    HwmonSource,
    NodeExporterSource,
    default_sources,
    parse_nvidia_smi,
    parse_prometheus_text,
)

from .fakeroot import FakeNode


def make(tmp_path, **kw):
    node = FakeNode(tmp_path)
    errors: list[str] = []
    col = Collector(default_sources(tmp_path, gpu=False, **kw), on_error=errors.append)
    return node, col, errors


def test_first_sample_has_gauges_then_rates_follow(tmp_path):
    node, col, errors = make(tmp_path)
    first = col.sample(100.0)
    assert first["mem_total.bytes"] == 8000000 * 1024
    assert first["mem_used.bytes"] == (8000000 - 6000000) * 1024
    assert first["load_1"] == 0.5 and first["proc_total"] == 345
    assert first["hwmon_hwmon0.coretemp_temp1.celsius"] == 45.0
    assert first["hwmon_hwmon0.coretemp_fan1.rpm"] == 1200
    assert first["cpufreq_0_mhz"] == 2400.0
    assert "net_eth0_rx.bytes_per_s" not in first  # a rate needs two readings
    node.tick(2.0, busy=0.25)
    second = col.sample(102.0)
    assert second["net_eth0_rx.bytes_per_s"] == pytest.approx(1000.0)
    assert second["disk_sda_read.bytes_per_s"] == pytest.approx(8 * 512)
    assert second["cpu_0_util"] == pytest.approx(0.25)
    assert second["cpu_all_util"] == pytest.approx(0.25)
    assert second["rapl_intel_rapl_0.package_0_power.watts"] == pytest.approx(30.0)
    assert not any(k.startswith("net_lo") for k in second)
    assert not any("loop0" in k for k in second)
    assert errors == []


def test_absent_sources_are_skipped_and_logged_once(tmp_path, caplog):
    FakeNode(tmp_path)
    shutil.rmtree(tmp_path / "sys")
    caplog.set_level(logging.INFO, "shoal.telemetry")
    col = Collector(default_sources(tmp_path, gpu=False))
    assert {"hwmon", "rapl", "cpufreq"} <= set(col.absent)
    assert "hwmon" not in [s.name for s in col.sources]
    for t in range(3):
        sample = col.sample(float(t))
    assert not any(k.startswith(("hwmon", "rapl", "cpufreq")) for k in sample)
    assert sum("hwmon is absent" in r.message for r in caplog.records) == 1


def test_a_vanishing_sensor_drops_out_and_comes_back(tmp_path, caplog):
    node, col, errors = make(tmp_path)
    col.sample(0.0)
    shutil.rmtree(tmp_path / "sys/class/hwmon/hwmon0")  # driver unloaded
    node.tick()
    s = col.sample(1.0)
    assert not any(k.startswith("hwmon") for k in s)
    assert "mem_total.bytes" in s  # the other sources keep going
    # hwmon is now simply empty (no files), which is not an error; a source
    # whose file vanished is: remove /proc/net/dev.
    node.tick()
    (tmp_path / "proc/net/dev").unlink()
    caplog.set_level(logging.WARNING, "shoal.telemetry")
    col.sample(2.0)
    col.sample(3.0)
    assert errors == ["net", "net"]
    assert sum("net failed" in r.message for r in caplog.records) == 1  # logged once
    (tmp_path / "sys/class/hwmon/hwmon0").mkdir()
    (tmp_path / "sys/class/hwmon/hwmon0/name").write_text("coretemp\n")
    node.tick()
    s = col.sample(4.0)
    assert s["hwmon_hwmon0.coretemp_temp1.celsius"] == 45.0
    node.tick()
    assert "net_eth0_rx.bytes_per_s" in col.sample(5.0)


def test_sensor_file_unreadable_mid_read_is_counted(tmp_path):
    node = FakeNode(tmp_path)
    errors: list[str] = []
    col = Collector([HwmonSource(tmp_path)], on_error=errors.append)
    (tmp_path / "sys/class/hwmon/hwmon0/temp1_input").write_text("garbage\n")
    s = col.sample(0.0)
    assert "hwmon_hwmon0.coretemp_fan1.rpm" in s and not any("temp1" in k for k in s)
    (tmp_path / "sys/class/hwmon/hwmon0/fan1_input").write_text("\n")
    assert col.sample(1.0) == {}
    assert errors == ["hwmon"]
    node.write()
    assert len(col.sample(2.0)) == 2


def test_counter_reset_gives_no_rate(tmp_path):
    node, col, _ = make(tmp_path)
    col.sample(0.0)
    node.net_rx = 10.0  # interface re-created
    node.write()
    assert "net_eth0_rx.bytes_per_s" not in col.sample(1.0)
    node.tick()
    assert col.sample(2.0)["net_eth0_rx.bytes_per_s"] == pytest.approx(1000.0)


def test_nvidia_smi_parsing_and_missing_gpu(tmp_path):
    r = parse_nvidia_smi("0, 87, 40, 10240, 71, 250.5, 1530, [N/A]\n1, 3, 0, 5, 40, 30.1, 300, 20\n")
    assert r.gauges["gpu_0_utilization.gpu"] == 87.0
    assert r.gauges["gpu_1_fan.speed"] == 20.0
    assert "gpu_0_fan.speed" not in r.gauges
    src = GpuSource(tmp_path)
    src.exe = None  # no nvidia-smi on this node
    assert not src.available()


def test_node_exporter_text_is_filtered_and_typed():
    text = (
        "# TYPE node_network_receive_bytes_total counter\n"
        'node_network_receive_bytes_total{device="eth0"} 1234\n'
        "# TYPE node_load1 gauge\nnode_load1 0.7\n"
        "# TYPE go_goroutines gauge\ngo_goroutines 9\n"
    )
    r = parse_prometheus_text(text, ("node_",))
    assert r.counters == {"ne_node_network_receive_bytes_total_eth0": 1234.0}
    assert r.gauges == {"ne_node_load1": 0.7}
    with pytest.raises(OSError):
        parse_prometheus_text("this is { not the format\n", ("node_",))


def test_unreachable_node_exporter_is_an_error_not_a_crash(tmp_path):
    FakeNode(tmp_path)
    errors: list[str] = []
    # Port 9 on loopback (discard) is closed on a test machine: connection refused.
    src = NodeExporterSource(tmp_path, "http://127.0.0.1:9/metrics", ("node_",), timeout=1.0)
    col = Collector([src], on_error=errors.append)
    assert col.sample(0.0) == {} and errors == ["node_exporter"]


def test_declared_features_from_the_first_reading_and_forgotten_when_gone(tmp_path):
    from shoal.daemons.telemetry.sources import NAMES_MEMORY

    node, col, _ = make(tmp_path)
    assert not col.sampled and col.declared_features() == []
    first = col.sample(0.0)
    declared = col.declared_features()
    # Rates are declared before they can be computed: the node has them from the next sample on.
    assert "net_eth0_rx.bytes_per_s" not in first and "net_eth0_rx.bytes_per_s:mean" in declared
    assert "cpu_0_util:std" in declared and not any("total.jiffies" in n for n in declared)
    node.tick(1.0)
    second = col.sample(1.0)
    assert {f"{m}:mean" for m in second} <= set(declared)
    # A sensor that vanishes stays declared for a while (a flaky read), then is forgotten.
    (tmp_path / "sys/class/hwmon/hwmon0/fan1_input").unlink()
    for t in range(2, NAMES_MEMORY + 1):
        col.sample(float(t))
    assert "hwmon_hwmon0.coretemp_fan1.rpm:mean" in col.declared_features()
    for t in range(NAMES_MEMORY + 1, NAMES_MEMORY + 3):
        col.sample(float(t))
    assert "hwmon_hwmon0.coretemp_fan1.rpm:mean" not in col.declared_features()
    assert "hwmon_hwmon0.coretemp_temp1.celsius:mean" in col.declared_features()


PAGE = r'''# HELP node_cpu_seconds_total Seconds the CPUs spent in each mode.
# TYPE node_cpu_seconds_total counter
node_cpu_seconds_total{cpu="0",mode="idle"} 1234.5
node_cpu_seconds_total{mode="user",cpu="0"} 99
# TYPE node_filesystem_avail_bytes gauge
node_filesystem_avail_bytes{device="/dev/sda1",fstype="ext4",mountpoint="/my dir, with {braces}"} 5.1e+09
node_filesystem_avail_bytes{device="a\"quoted\\path\n",fstype="x",mountpoint="/"} 7 1700000000000
# TYPE node_scrape_collector_success gauge
node_scrape_collector_success{collector="cpu"} 1
node_load1 +Inf
node_weird NaN
# TYPE node_disk_io_time_weighted counter
node_disk_io_time_weighted{device="sda",} 3
# TYPE node_rpc_seconds histogram
node_rpc_seconds_bucket{le="0.1"} 4
node_rpc_seconds_bucket{le="+Inf"} 5
node_rpc_seconds_sum 0.3
node_rpc_seconds_count 5
go_goroutines 8
process_cpu_seconds_total 1.5
'''


def reference_parse(text: str, prefixes: tuple[str, ...]):
    """The previous implementation, prometheus_client's parser: the oracle for the hand-written one."""
    import math

    from prometheus_client.parser import text_string_to_metric_families

    from shoal.daemons.telemetry.sources import clean

    gauges, counters = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefixes):
                labels = ".".join(clean(v) for _, v in sorted(s.labels.items()))
                key = "ne_" + clean(s.name) + (f"_{labels}" if labels else "")
                v = float(s.value)
                target = counters if family.type == "counter" or s.name.endswith("_total") else gauges
                target[key] = "nan" if math.isnan(v) else v
    return gauges, counters


def test_hand_parser_agrees_with_prometheus_clients_and_caches_series(tmp_path):
    import math

    def norm(d):
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}

    cache: dict = {}
    for _ in range(2):  # the second page is served from the cache
        r = parse_prometheus_text(PAGE, ("node_",), cache)
        assert (norm(r.gauges), norm(r.counters)) == reference_parse(PAGE, ("node_",))
    assert r.counters["ne_node_cpu_seconds_total_0.idle"] == 1234.5
    assert r.counters["ne_node_cpu_seconds_total_0.user"] == 99  # labels sorted by name, not by order
    assert r.counters["ne_node_disk_io_time_weighted_total_sda"] == 3  # TYPE counter: named *_total
    assert r.gauges["ne_node_filesystem_avail_bytes_dev_sda1.ext4.my_dir_with_braces"] == 5.1e9
    assert not any(k.startswith(("ne_go_", "ne_process_")) for k in {**r.gauges, **r.counters})
    assert len(cache) == 12  # one entry per node_ series
    both = parse_prometheus_text(PAGE, ("node_", "go_"))
    assert both.gauges["ne_go_goroutines"] == 8


@pytest.mark.parametrize("page", [
    "node_load1{cpu=\"0\" 1\n",            # labels never closed
    "node_load1{cpu=0} 1\n",               # unquoted label value
    "node_load1 one\n",                    # not a number
    "node_load1\n",                        # no value
    "<html><body>404 page not found</body></html>\n",  # the wrong URL: nothing to keep
    "# TYPE node_load1 gauge\n",           # no sample at all
])
def test_a_bad_page_is_an_error_not_a_wrong_reading(page):
    with pytest.raises(OSError):
        parse_prometheus_text(page, ("node_",), {})


def test_pressure_vmstat_resctrl_and_the_net_total(tmp_path):
    node, _, _ = make(tmp_path)
    (tmp_path / "proc/pressure").mkdir()
    mon = tmp_path / "sys/fs/resctrl/mon_data/mon_L3_00"
    mon.mkdir(parents=True)

    def write(stall_us: int, faults: int, membw: int) -> None:
        for res in ("cpu", "memory", "io"):
            (tmp_path / f"proc/pressure/{res}").write_text(
                f"some avg10=1.00 avg60=0.50 avg300=0.10 total={stall_us}\n"
                f"full avg10=0.00 avg60=0.00 avg300=0.00 total={stall_us // 2}\n")
        (tmp_path / "proc/vmstat").write_text(f"nr_free_pages 5\npgfault {faults}\npgmajfault 3\noom_kill 0\n")
        (mon / "mbm_total_bytes").write_text(f"{membw}\n")
        (mon / "llc_occupancy").write_text("1048576\n")
        (mon / "mbm_local_bytes").write_text("Unavailable\n")

    write(1_000_000, 100, 10 << 30)
    errors: list[str] = []
    col = Collector(default_sources(tmp_path, gpu=False), on_error=errors.append)
    assert {"pressure", "vmstat", "resctrl"} <= {s.name for s in col.sources}
    col.sample(10.0)
    write(1_500_000, 400, (10 << 30) + (3 << 30))  # over 2 s: 0.5 s stalled, 300 faults, 3 GiB moved
    node.tick(2.0)
    s = col.sample(12.0)
    assert s["psi_cpu_some.stalled_per_s"] == pytest.approx(0.25)  # a quarter of the time stalled
    assert s["psi_io_full.stalled_per_s"] == pytest.approx(0.125)
    assert s["psi_memory_some.stalled_per_s"] == pytest.approx(0.25)
    assert s["vm_pgfault_per_s"] == pytest.approx(150.0) and s["vm_pgmajfault_per_s"] == 0.0
    assert "vm_nr_free_pages_per_s" not in s
    assert s["resctrl_l3_00_membw_total.bytes_per_s"] == pytest.approx(1.5 * (1 << 30))
    assert s["resctrl_l3_00_llc_occupancy.bytes"] == 1048576
    assert not any("membw_local" in k for k in s)  # "Unavailable": left out, not 0
    # The node's network total: every interface but lo, one feature whatever comes and goes.
    assert s["net_all_rx.bytes_per_s"] == pytest.approx(s["net_eth0_rx.bytes_per_s"]) == pytest.approx(1000.0)
    assert errors == []


def test_run_queue_and_context_switches_are_read(tmp_path):
    node, col, _ = make(tmp_path)
    col.sample(0.0)
    (tmp_path / "proc/stat").write_text((tmp_path / "proc/stat").read_text().replace("ctxt 12345", "ctxt 22345"))
    s = col.sample(2.0)
    assert s["cpu_ctxt_per_s"] == pytest.approx(5000.0)
    assert s["proc_running"] == 3 and s["proc_runnable"] == 2  # /proc/stat and /proc/loadavg
