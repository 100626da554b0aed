"""Metric sources: what one node sample is made of.

Theory of operation
-------------------
A *source* reads one family of node metrics and returns a
:class:`Reading`: ``gauges`` (values that mean something on their own:
memory in use, a temperature) and ``counters`` (monotonic totals: bytes
received, RAPL energy, CPU jiffies). Sources do not know about time; the
:class:`Collector` turns counters into per-second rates from two consecutive
readings and the time between them, which the caller passes in, so tests
drive it with fake clocks. CPU utilisation is a ratio of two counters (busy
jiffies over all jiffies), so the CPU source emits both and the collector
divides the deltas (``cpuN_util``, 0..1).

Every source reads files under a ``root`` (``/`` in production), so tests
point it at a fake ``/proc`` and ``/sys`` tree. A source whose files do not
exist at start is *absent*: it is skipped and logged once. A sensor that
vanishes later (a hot-unplugged disk, a hwmon driver unloaded) just stops
appearing in readings; the failure is logged once per source and counted by
the caller through ``on_error``. Windows then have fewer samples for that
metric, and the detector sees the feature missing.

Metric names are flat strings, ``<family>_<instance>_<field>``, made only of
``[a-z0-9_.]``: they become feature names in windows and models.

Sources: ``cpu`` (/proc/stat: utilisation, context switches, run queue),
``cpufreq``, ``load`` (/proc/loadavg), ``memory`` (/proc/meminfo), ``disk``
(/proc/diskstats), ``net`` (/proc/net/dev, per interface and the node's
total), ``pressure`` (/proc/pressure: PSI), ``vmstat`` (/proc/vmstat: faults,
reclaim, swap), ``resctrl`` (memory bandwidth and LLC occupancy where the
kernel monitors them), ``hwmon`` (temperatures and fans), ``rapl``
(/sys/class/powercap energy counters -> watts), ``gpu`` (nvidia-smi, where
installed), ``node_exporter`` (scrape an existing endpoint, optional) and
``cgroup`` (one cgroup's CPU, memory and IO: the node's workload, optional).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("shoal.telemetry")

_SAFE = re.compile(r"[^a-z0-9_.]+")

# A node_exporter page is a few hundred kilobytes; cap what we read.
MAX_SCRAPE_BYTES = 4 << 20
# Bound on metrics one source may add to a sample (a node_exporter with
# thousands of series would otherwise blow up the feature vector).
MAX_METRICS_PER_SOURCE = 2000


def clean(name: str) -> str:
    return _SAFE.sub("_", name.lower()).strip("_")


@dataclass
class Reading:
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)


class Source:
    """Base class: ``name``, ``available()`` at start, ``read()`` per sample."""

    name = "source"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def available(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def read(self) -> Reading:  # pragma: no cover - overridden
        raise NotImplementedError


def _read_text(path: Path) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read(1 << 20)


class CpuSource(Source):
    """/proc/stat: per-CPU busy and total jiffies, context switches, procs."""

    name = "cpu"

    def available(self) -> bool:
        return self.path("proc/stat").is_file()

    def read(self) -> Reading:
        r = Reading()
        for line in _read_text(self.path("proc/stat")).splitlines():
            parts = line.split()
            if not parts:
                continue
            key = parts[0]
            if key.startswith("cpu"):
                vals = [float(v) for v in parts[1:9]]
                if len(vals) < 4:
                    continue
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
                total = sum(vals)
                cpu = "all" if key == "cpu" else key[3:]
                r.counters[f"cpu_{cpu}_busy.jiffies"] = total - idle
                r.counters[f"cpu_{cpu}_total.jiffies"] = total
                if len(vals) > 4:
                    r.counters[f"cpu_{cpu}_iowait.jiffies"] = vals[4]
            elif key == "ctxt":
                r.counters["cpu_ctxt"] = float(parts[1])
            elif key == "processes":
                r.counters["proc_forks"] = float(parts[1])
            elif key == "procs_running":
                r.gauges["proc_running"] = float(parts[1])
            elif key == "procs_blocked":
                r.gauges["proc_blocked"] = float(parts[1])
        return r


class CpuFreqSource(Source):
    """/sys/devices/system/cpu/cpuN/cpufreq/scaling_cur_freq, in MHz."""

    name = "cpufreq"

    def _files(self) -> list[Path]:
        return sorted(self.path("sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))

    def available(self) -> bool:
        return bool(self._files())

    def read(self) -> Reading:
        r = Reading()
        for f in self._files():
            cpu = f.parent.parent.name[3:]
            try:
                r.gauges[f"cpufreq_{cpu}_mhz"] = float(_read_text(f)) / 1000.0
            except (OSError, ValueError):
                continue  # a CPU went offline between glob and read
        return r


class LoadSource(Source):
    """/proc/loadavg: load averages and process counts."""

    name = "load"

    def available(self) -> bool:
        return self.path("proc/loadavg").is_file()

    def read(self) -> Reading:
        parts = _read_text(self.path("proc/loadavg")).split()
        running, _, total = parts[3].partition("/")
        return Reading(gauges={
            "load_1": float(parts[0]), "load_5": float(parts[1]), "load_15": float(parts[2]),
            "proc_runnable": float(running), "proc_total": float(total),
        })


MEMINFO_FIELDS = {
    "MemTotal": "mem_total.bytes", "MemFree": "mem_free.bytes", "MemAvailable": "mem_available.bytes",
    "Buffers": "mem_buffers.bytes", "Cached": "mem_cached.bytes", "Dirty": "mem_dirty.bytes",
    "Shmem": "mem_shmem.bytes", "SwapTotal": "swap_total.bytes", "SwapFree": "swap_free.bytes",
}


class MemorySource(Source):
    """/proc/meminfo (kB) -> bytes, plus used = total - available."""

    name = "memory"

    def available(self) -> bool:
        return self.path("proc/meminfo").is_file()

    def read(self) -> Reading:
        g: dict[str, float] = {}
        for line in _read_text(self.path("proc/meminfo")).splitlines():
            key, _, rest = line.partition(":")
            if key in MEMINFO_FIELDS:
                g[MEMINFO_FIELDS[key]] = float(rest.split()[0]) * 1024
        if "mem_total.bytes" in g and "mem_available.bytes" in g:
            g["mem_used.bytes"] = g["mem_total.bytes"] - g["mem_available.bytes"]
        if "swap_total.bytes" in g and "swap_free.bytes" in g:
            g["swap_used.bytes"] = g["swap_total.bytes"] - g["swap_free.bytes"]
        return Reading(gauges=g)


_SKIP_DISKS = re.compile(r"^(loop|ram|zram|fd|sr)\d*")


class DiskSource(Source):
    """/proc/diskstats: reads, writes, sectors and busy time per device."""

    name = "disk"

    def available(self) -> bool:
        return self.path("proc/diskstats").is_file()

    def read(self) -> Reading:
        c: dict[str, float] = {}
        for line in _read_text(self.path("proc/diskstats")).splitlines():
            p = line.split()
            if len(p) < 14 or _SKIP_DISKS.match(p[2]):
                continue
            dev = clean(p[2])
            c[f"disk_{dev}_reads"] = float(p[3])
            c[f"disk_{dev}_read.bytes"] = float(p[5]) * 512
            c[f"disk_{dev}_writes"] = float(p[7])
            c[f"disk_{dev}_written.bytes"] = float(p[9]) * 512
            c[f"disk_{dev}_busy.ms"] = float(p[12])
        return Reading(counters=c)


class NetSource(Source):
    """/proc/net/dev: bytes, packets, errors and drops per interface (not lo)."""

    name = "net"

    def available(self) -> bool:
        return self.path("proc/net/dev").is_file()

    FIELDS = ((0, "rx.bytes"), (1, "rx_packets"), (2, "rx_errors"), (3, "rx_drops"),
              (8, "tx.bytes"), (9, "tx_packets"), (10, "tx_errors"), (11, "tx_drops"))

    def read(self) -> Reading:
        c: dict[str, float] = {}
        total = [0.0] * len(self.FIELDS)
        for line in _read_text(self.path("proc/net/dev")).splitlines()[2:]:
            name, sep, rest = line.partition(":")
            p = rest.split()
            name = name.strip()
            if not sep or name == "lo" or len(p) < 16:
                continue
            dev = clean(name)
            for j, (i, what) in enumerate(self.FIELDS):
                c[f"net_{dev}_{what}"] = float(p[i])
                total[j] += float(p[i])
        # The node's total over every interface but lo: a feature every model has, whatever
        # interfaces come and go (a veth made for a while, like the netoccupy fault's). An
        # interface that vanishes makes the sum go down: the collector skips that one rate.
        for j, (_, what) in enumerate(self.FIELDS):
            c[f"net_all_{what}"] = total[j]
        return Reading(counters=c)


class PressureSource(Source):
    """/proc/pressure/{cpu,memory,io}: pressure stall information (PSI, Linux >= 4.20).

    ``total`` is the time (us) some (or all: ``full``) runnable tasks were stalled
    on the resource; as a rate it is the share of time stalled, 0..1: what tells
    contention (a hog, a leak that makes the kernel reclaim, an IO storm) from
    plain load, where utilisation is high but nobody waits.
    """

    name = "pressure"
    RESOURCES = ("cpu", "memory", "io")

    def available(self) -> bool:
        return any(self.path(f"proc/pressure/{r}").is_file() for r in self.RESOURCES)

    def read(self) -> Reading:
        c: dict[str, float] = {}
        for res in self.RESOURCES:
            try:
                text = _read_text(self.path(f"proc/pressure/{res}"))
            except FileNotFoundError:
                continue
            c.update(_psi(text, f"psi_{res}"))
        return Reading(counters=c)


def _psi(text: str, prefix: str) -> dict[str, float]:
    """A PSI file ("some|full avg10=.. avg60=.. avg300=.. total=US" lines) -> seconds stalled, as
    counters ``<prefix>_{some,full}.stalled`` (their rate: the share of time stalled, 0..1)."""
    out = {}
    for line in text.splitlines():
        kind, *fields = line.split() or [""]
        for f in fields:
            k, _, v = f.partition("=")
            if k == "total" and kind in ("some", "full"):
                out[f"{prefix}_{kind}.stalled"] = float(v) * 1e-6
    return out


#: /proc/vmstat counters kept: page faults, reclaim, swapping, OOM kills, refaults
VMSTAT_FIELDS = ("pgfault", "pgmajfault", "pswpin", "pswpout", "pgsteal_kswapd", "pgsteal_direct",
                 "pgscan_kswapd", "pgscan_direct", "allocstall_normal", "allocstall_movable", "oom_kill",
                 "workingset_refault_anon", "workingset_refault_file", "pgpgin", "pgpgout")


class VmstatSource(Source):
    """/proc/vmstat: page faults, reclaim scans and steals, swap-ins and -outs, OOM kills (rates)."""

    name = "vmstat"

    def available(self) -> bool:
        return self.path("proc/vmstat").is_file()

    def read(self) -> Reading:
        c: dict[str, float] = {}
        want = set(VMSTAT_FIELDS)
        for line in _read_text(self.path("proc/vmstat")).splitlines():
            k, _, v = line.partition(" ")
            if k in want:
                c[f"vm_{k}"] = float(v)
        return Reading(counters=c)


class ResctrlSource(Source):
    """Memory bandwidth and last-level-cache occupancy from resctrl (Intel RDT / AMD PQoS).

    Where the kernel mounts resctrl (``mount -t resctrl resctrl /sys/fs/resctrl``)
    and the CPU monitors memory bandwidth, the root group's
    ``mon_data/mon_L3_NN/{mbm_total_bytes,mbm_local_bytes,llc_occupancy}`` give
    bytes moved to and from memory (a counter: bytes/s) and bytes of L3 in use
    per cache domain. Hardware cache-miss counters (perf_event) are not read:
    on machines without a CPU PMU exposed (VMs such as this project's CI,
    /sys/bus/event_source/devices has no ``cpu``), neither exists; the source
    is then absent, like any other.
    """

    name = "resctrl"

    def _dirs(self) -> list[Path]:
        return sorted(self.path("sys/fs/resctrl/mon_data").glob("mon_L3_*"))

    def available(self) -> bool:
        return bool(self._dirs())

    def read(self) -> Reading:
        r = Reading()
        for d in self._dirs():
            dom = clean(d.name.removeprefix("mon_"))
            for f, target, name in (("mbm_total_bytes", r.counters, "membw_total.bytes"),
                                    ("mbm_local_bytes", r.counters, "membw_local.bytes"),
                                    ("llc_occupancy", r.gauges, "llc_occupancy.bytes")):
                try:
                    text = _read_text(d / f).strip()
                except FileNotFoundError:
                    continue
                if text != "Unavailable":  # the kernel's word for a counter it cannot read now
                    target[f"resctrl_{dom}_{name}"] = float(text)
        return r


class HwmonSource(Source):
    """/sys/class/hwmon/hwmonN/{temp,fan}*_input: degrees C and RPM."""

    name = "hwmon"

    def _files(self) -> list[Path]:
        base = self.path("sys/class/hwmon")
        return sorted(base.glob("hwmon*/temp*_input")) + sorted(base.glob("hwmon*/fan*_input"))

    def available(self) -> bool:
        return bool(self._files())

    def read(self) -> Reading:
        g: dict[str, float] = {}
        failed = 0
        for f in self._files():
            try:
                raw = float(_read_text(f))
            except (OSError, ValueError):
                failed += 1  # the sensor vanished or returned garbage this time
                continue
            chip = f.parent.name
            with contextlib.suppress(OSError):
                chip = f"{chip}.{clean(_read_text(f.parent / 'name'))}"
            sensor = f.name.removesuffix("_input")
            if sensor.startswith("temp"):
                g[f"hwmon_{chip}_{sensor}.celsius"] = raw / 1000.0
            else:
                g[f"hwmon_{chip}_{sensor}.rpm"] = raw
        if failed and not g:
            raise OSError(f"all {failed} hwmon sensors failed to read")
        return Reading(gauges=g)


class RaplSource(Source):
    """/sys/class/powercap/intel-rapl:*/energy_uj: energy counters -> watts.

    The counter wraps at max_energy_range_uj; the collector treats a decrease
    as a reset and skips that one rate.
    """

    name = "rapl"

    def _files(self) -> list[Path]:
        return sorted(self.path("sys/class/powercap").glob("intel-rapl:*/energy_uj"))

    def available(self) -> bool:
        return bool(self._files())

    def read(self) -> Reading:
        c: dict[str, float] = {}
        for f in self._files():
            try:
                zone = clean(_read_text(f.parent / "name")) or f.parent.name
            except OSError:
                zone = clean(f.parent.name)
            try:
                # microjoules per second -> watts via the rate: store joules.
                c[f"rapl_{clean(f.parent.name)}.{zone}_power.watts"] = float(_read_text(f)) / 1e6
            except (OSError, ValueError):
                continue
        return Reading(counters=c)


GPU_QUERY = "index,utilization.gpu,utilization.memory,memory.used,temperature.gpu,power.draw,clocks.sm,fan.speed"


class GpuSource(Source):
    """NVIDIA GPUs through ``nvidia-smi`` (NVML's command-line face), where installed."""

    name = "gpu"

    def __init__(self, root: Path, exe: str | None = None) -> None:
        super().__init__(root)
        self.exe = exe or shutil.which("nvidia-smi")

    def available(self) -> bool:
        return self.exe is not None

    def read(self) -> Reading:
        assert self.exe is not None  # read only when available()
        out = subprocess.run(
            [self.exe, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> Reading:
    g: dict[str, float] = {}
    names = GPU_QUERY.split(",")[1:]
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(names) + 1:
            continue
        for name, cell in zip(names, cells[1:], strict=True):
            try:
                g[f"gpu_{clean(cells[0])}_{clean(name)}"] = float(cell)
            except ValueError:
                continue  # "[N/A]" for a field this GPU lacks
    return Reading(gauges=g)


class NodeExporterSource(Source):
    """Scrape an existing node_exporter endpoint (sites that run it reuse it).

    Only series whose name starts with one of ``prefixes`` are kept, at most
    MAX_METRICS_PER_SOURCE of them; counters (``*_total`` or TYPE counter)
    become rates.
    """

    name = "node_exporter"

    def __init__(self, root: Path, url: str, prefixes: Iterable[str], timeout: float = 2.0) -> None:
        super().__init__(root)
        self.url = url
        self.prefixes = tuple(prefixes)
        self.timeout = timeout
        self._keys: dict[str, tuple[str, bool]] = {}  # parse_prometheus_text's cache

    def available(self) -> bool:
        return bool(self.url)

    def read(self) -> Reading:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as resp:  # noqa: S310 - operator's URL
            body = resp.read(MAX_SCRAPE_BYTES + 1)
        if len(body) > MAX_SCRAPE_BYTES:
            raise OSError(f"{self.url}: more than {MAX_SCRAPE_BYTES} bytes")
        return parse_prometheus_text(body.decode("utf-8", "replace"), self.prefixes, self._keys)


_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|(?=\}))')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value) if "\\" in value else value


def parse_prometheus_text(text: str, prefixes: tuple[str, ...],
                          cache: dict[str, tuple[str, bool]] | None = None) -> Reading:
    """The Prometheus text exposition format (what node_exporter serves), by hand.

    prometheus_client's parser builds an object per family and sample and cost
    ~10 ms per node_exporter page (1 % of a core at 1 Hz on its own); this one
    looks at a line's metric name first and skips the series it does not keep,
    and with ``cache`` (series text -> feature key, is-counter; the same page
    comes back every second) parses a series' labels only the first time.
    ``# TYPE`` lines say which series are counters (so are ``*_total`` ones);
    ``# HELP`` and other comments are skipped. A kept line that does not parse,
    or a page with no series to keep at all, is a bad page: OSError.
    """
    r = Reading()
    n = 0
    types: dict[str, str] = {}
    if cache is not None and len(cache) > 4 * MAX_METRICS_PER_SOURCE:
        cache.clear()  # series come and go (label values); keep the cache bounded
    for line in text.splitlines():
        if not line or line[0] == "#":
            if line.startswith("# TYPE "):
                parts = line.split()
                if len(parts) >= 4:
                    types[parts[2]] = parts[3]
            continue
        if not line.startswith(prefixes):
            continue
        if n >= MAX_METRICS_PER_SOURCE:
            break
        brace, space = line.find("{"), line.find(" ")
        labelled = brace != -1 and (space == -1 or brace < space)
        end = line.rfind("}") + 1 if labelled else space  # a label value may hold "}", the value never
        series = line[:end]
        try:
            if end <= 0:
                raise ValueError("no value")
            value = float(line[end:].split()[0])
            hit = cache.get(series) if cache is not None else None
            if hit is None:
                hit = _series_key(series, brace if labelled else -1, types)
                if cache is not None:
                    cache[series] = hit
        except (ValueError, IndexError):
            raise OSError(f"bad exposition format: {line[:80]!r}") from None
        key, counter = hit
        (r.counters if counter else r.gauges)[key] = value
        n += 1
    if not n:  # an error page, the wrong URL, or prefixes that match nothing: say so, once
        raise OSError(f"no series starting with {', '.join(prefixes)} (not an exposition page?)")
    return r


def _series_key(series: str, brace: int, types: dict[str, str]) -> tuple[str, bool]:
    """``name{a="x",b="y"}`` -> (``ne_<name>_<x>.<y>``, labels sorted by name; is it a counter)."""
    name = series[:brace] if brace != -1 else series
    pairs = []
    if brace != -1:
        pos = brace + 1
        while series[pos] != "}":
            m = _LABEL.match(series, pos)
            if m is None:
                raise ValueError("bad labels")
            pairs.append((m.group(1), _unescape(m.group(2))))
            pos = m.end()
        if pos != len(series) - 1:
            raise ValueError("text after the labels")
    if not name or " " in name:
        raise ValueError("bad metric name")
    labels = ".".join(clean(v) for _, v in sorted(pairs))
    counter = name.endswith("_total") or types.get(name) == "counter"
    # prometheus_client's parser, used before, named every counter sample *_total: keep its names
    # (they are feature names in models already trained)
    full = name if not counter or name.endswith("_total") else name + "_total"
    key = "ne_" + clean(full) + (f"_{labels}" if labels else "")
    return key, counter


#: cgroup v1 hierarchies the cgroup source reads, each mounted at sys/fs/cgroup/<name>
CGROUP_V1 = ("cpuacct", "cpu", "memory", "blkio")


class CgroupSource(Source):
    """One cgroup's workload: CPU seconds/s, memory in use, IO bytes/s, CPU throttled time/s.

    ``cgroup`` is ``"self"`` (the cgroup this process is in, per hierarchy, from
    /proc/self/cgroup: under systemd its unit, in a container or a lab host the
    node's workload) or an absolute cgroup path ("/", "/system.slice"). cgroup v1
    (cpuacct.usage, cpu.stat throttled_time, memory.usage_in_bytes,
    blkio.throttle.io_service_bytes) is read where its hierarchy is mounted, else
    the unified v2 tree (cpu.stat usage_usec and throttled_usec, memory.current,
    io.stat); on v2 also the cgroup's own pressure stall information
    ({cpu,memory,io}.pressure -> ``cgroup_psi_<res>_{some,full}.stalled_per_s``).
    A file that is missing (the root cgroup has no memory.current on
    v2; a v1 blkio counts no buffered writes, the kernel's flusher writes them
    back from the root cgroup) just leaves its metric out.
    """

    name = "cgroup"

    def __init__(self, root: Path, cgroup: str) -> None:
        super().__init__(root)
        self.cgroup = cgroup
        self._dirs: dict[str, Path] | None = None

    def dirs(self) -> dict[str, Path]:
        """Hierarchy (a v1 controller, or "v2") -> the cgroup's directory there; resolved once."""
        if self._dirs is None:
            base = self.path("sys/fs/cgroup")
            v2 = base if (base / "cgroup.controllers").is_file() else base / "unified"
            own: dict[str, str] = {}
            if self.cgroup == "self":
                for line in _read_text(self.path("proc/self/cgroup")).splitlines():
                    _, _, rest = line.partition(":")  # "ID:controllers:path"; v2's controllers are ""
                    controllers, sep, rel = rest.partition(":")
                    for c in (controllers.split(",") if controllers else ["v2"]) if sep else []:
                        own[c] = rel
            found = {}
            for h in CGROUP_V1 + ("v2",):
                mount = v2 if h == "v2" else base / h
                want = own.get(h) if self.cgroup == "self" else self.cgroup
                if want is not None and (mount / "cgroup.procs").is_file() and (mount / want.lstrip("/")).is_dir():
                    found[h] = mount / want.lstrip("/")
            self._dirs = found
        return self._dirs

    def available(self) -> bool:
        return bool(self.dirs())

    def read(self) -> Reading:
        d = self.dirs()
        r = Reading()
        v2 = d.get("v2")  # read for what the v1 hierarchies do not give
        if "cpuacct" in d:
            _read_into(r.counters, "cgroup_cpu.seconds", d["cpuacct"] / "cpuacct.usage", scale=1e-9)
        if "cpu" in d:
            stat = _keyed(d["cpu"] / "cpu.stat")
            if "throttled_time" in stat:
                r.counters["cgroup_throttled.seconds"] = stat["throttled_time"] * 1e-9
        if "memory" in d:
            _read_into(r.gauges, "cgroup_memory.bytes", d["memory"] / "memory.usage_in_bytes")
        if "blkio" in d:
            io = d["blkio"] / "blkio.throttle.io_service_bytes_recursive"
            io = io if io.is_file() else d["blkio"] / "blkio.throttle.io_service_bytes"
            if io.is_file():
                r.counters.update(_blkio_v1(_read_text(io)))
        if v2 is not None:
            stat = _keyed(v2 / "cpu.stat")
            if "cpuacct" not in d and "usage_usec" in stat:
                r.counters["cgroup_cpu.seconds"] = stat["usage_usec"] * 1e-6
            if "cpu" not in d and "throttled_usec" in stat:
                r.counters["cgroup_throttled.seconds"] = stat["throttled_usec"] * 1e-6
            if "memory" not in d:
                _read_into(r.gauges, "cgroup_memory.bytes", v2 / "memory.current")
            if "blkio" not in d and (v2 / "io.stat").is_file():
                r.counters.update(_io_stat_v2(_read_text(v2 / "io.stat")))
            for res in PressureSource.RESOURCES:  # v2's per-cgroup PSI: the workload's own stalls
                with contextlib.suppress(OSError):  # missing, or PSI off (EOPNOTSUPP)
                    r.counters.update(_psi(_read_text(v2 / f"{res}.pressure"), f"cgroup_psi_{res}"))
        if not r.gauges and not r.counters:
            raise OSError(f"cgroup {self.cgroup}: none of its accounting files can be read (removed?)")
        return r


def _read_into(out: dict[str, float], key: str, path: Path, scale: float = 1.0) -> None:
    """``out[key]`` = the number in ``path`` times ``scale``; nothing when the file is missing."""
    with contextlib.suppress(FileNotFoundError):
        out[key] = float(_read_text(path).split()[0]) * scale


def _keyed(path: Path) -> dict[str, float]:
    """A flat-keyed cgroup file ("key value" lines: cpu.stat); {} when missing."""
    try:
        text = _read_text(path)
    except FileNotFoundError:
        return {}
    return {p[0]: float(p[1]) for p in (line.split() for line in text.splitlines()) if len(p) == 2}


def _blkio_v1(text: str) -> dict[str, float]:
    """blkio.throttle.io_service_bytes ("MAJ:MIN Read|Write|... BYTES" lines) -> bytes read and written."""
    out = {"cgroup_read.bytes": 0.0, "cgroup_written.bytes": 0.0}
    for p in (line.split() for line in text.splitlines()):
        if len(p) == 3 and p[1] in ("Read", "Write"):
            out["cgroup_read.bytes" if p[1] == "Read" else "cgroup_written.bytes"] += float(p[2])
    return out


def _io_stat_v2(text: str) -> dict[str, float]:
    """io.stat ("MAJ:MIN rbytes=N wbytes=N rios=N ..." lines) -> bytes read and written."""
    out = {"cgroup_read.bytes": 0.0, "cgroup_written.bytes": 0.0}
    for line in text.splitlines():
        for kv in line.split()[1:]:
            k, _, v = kv.partition("=")
            if k in ("rbytes", "wbytes"):
                out["cgroup_read.bytes" if k == "rbytes" else "cgroup_written.bytes"] += float(v)
    return out


def default_sources(root: Path, *, gpu: bool = True, node_exporter_url: str = "",
                    node_exporter_prefixes: Iterable[str] = (), cgroup: str = "") -> list[Source]:
    sources: list[Source] = [
        CpuSource(root), CpuFreqSource(root), LoadSource(root), MemorySource(root),
        DiskSource(root), NetSource(root), HwmonSource(root), RaplSource(root),
        PressureSource(root), VmstatSource(root), ResctrlSource(root),
    ]
    if gpu:
        sources.append(GpuSource(root))
    if node_exporter_url:
        sources.append(NodeExporterSource(root, node_exporter_url, node_exporter_prefixes))
    if cgroup:
        sources.append(CgroupSource(root, cgroup))
    return sources


_JIFFY_RATIOS = ("_busy.jiffies", "_iowait.jiffies")
# A metric not read for this many samples is no longer one the node declares (Collector.metric_names).
NAMES_MEMORY = 60


def rate_name(counter: str) -> str | None:
    """The metric a counter becomes: ``X_per_s``; ``.watts`` (energy) as is; CPU jiffies as
    ``_util``/``_iowait`` ratios of the total (which itself gives none)."""
    if counter.endswith("_total.jiffies"):
        return None
    if counter.endswith(_JIFFY_RATIOS):
        base = counter.rsplit("_", 1)[0]
        return f"{base}_{'util' if counter.endswith('_busy.jiffies') else 'iowait'}"
    return counter if counter.endswith(".watts") else counter + "_per_s"


class Collector:
    """Reads every present source and turns counters into rates.

    ``sample(now)`` returns one flat ``{metric: value}`` dict. Rates need two
    readings, so the first sample has only gauges (and CPU utilisation needs
    two as well). A counter that went down (reboot of a device, RAPL wrap)
    gives no rate for that sample.
    """

    def __init__(self, sources: list[Source], on_error: Callable[[str], None] | None = None) -> None:
        self.sources: list[Source] = []
        self.absent: list[str] = []
        for s in sources:
            try:
                present = s.available()
            except OSError:
                present = False
            if present:
                self.sources.append(s)
            else:
                self.absent.append(s.name)
                log.info("telemetry source %s is absent on this node; skipping it", s.name)
        self.on_error = on_error or (lambda name: None)
        self._failing: set[str] = set()
        self._prev: dict[str, float] = {}
        self._prev_time: float | None = None
        # metric name (rates included) -> the number of the last reading that gave it
        self._names: dict[str, int] = {}
        self._readings = 0

    @property
    def sampled(self) -> bool:
        """True once some source has been read (``metric_names`` means something)."""
        return bool(self._names)

    def metric_names(self) -> list[str]:
        """The metrics this node produces: those its sources gave in the last NAMES_MEMORY samples.

        Rates are named from the counters themselves, so a counter's rate is
        declared from the first reading on. A source that fails, or gives a
        partial reading, for a moment does not make the node "lack" a feature;
        a sensor gone for NAMES_MEMORY samples is no longer declared.
        """
        oldest = self._readings - NAMES_MEMORY
        return sorted(n for n, seen in self._names.items() if seen > oldest)

    def declared_features(self) -> list[str]:
        """The window features this node's windows have: ``<metric>:mean`` and ``<metric>:std``."""
        return sorted(f"{m}:{stat}" for m in self.metric_names() for stat in ("mean", "std"))

    def sample(self, now: float) -> dict[str, float]:
        gauges: dict[str, float] = {}
        counters: dict[str, float] = {}
        for s in self.sources:
            try:
                r = s.read()
            except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
                self.on_error(s.name)
                if s.name not in self._failing:
                    self._failing.add(s.name)
                    log.warning("telemetry source %s failed: %s (logged once until it recovers)", s.name, exc)
                continue
            if s.name in self._failing:
                self._failing.discard(s.name)
                log.info("telemetry source %s recovered", s.name)
            gauges.update(r.gauges)
            counters.update(r.counters)
            for n in (*r.gauges, *map(rate_name, r.counters)):
                if n is not None:
                    self._names[n] = self._readings + 1
        self._readings += 1
        if self._readings % NAMES_MEMORY == 0:  # forget names gone for long (bounds the map)
            oldest = self._readings - NAMES_MEMORY
            self._names = {n: seen for n, seen in self._names.items() if seen > oldest}
        out = dict(gauges)
        prev, dt = self._prev, (now - self._prev_time) if self._prev_time is not None else 0.0
        if dt > 0:
            deltas: dict[str, float] = {}
            for k, v in counters.items():
                if k in prev and v >= prev[k]:
                    deltas[k] = v - prev[k]
            for k, d in deltas.items():
                name = rate_name(k)
                if name is None:
                    continue
                if k.endswith(_JIFFY_RATIOS):
                    total = deltas.get(k.rsplit("_", 1)[0] + "_total.jiffies")
                    if total:
                        out[name] = d / total
                    continue
                out[name] = d / dt
        self._prev = counters
        self._prev_time = now
        return out
