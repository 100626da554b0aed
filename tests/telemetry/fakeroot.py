"""A fake /proc and /sys tree for the collector tests and the daemon tests."""

from __future__ import annotations

import os
from pathlib import Path


def _put(path: Path, text: str) -> None:
    """Replace a file whole, as the kernel's files change: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


class FakeNode:
    """Writes /proc and /sys files under ``root``; tests change them between samples."""

    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.jiffies = [[100.0, 0.0, 50.0, 1000.0, 10.0] for _ in range(cpus)]
        self.net_rx = 1000.0
        self.disk_sectors = 0.0
        self.energy_uj = 5_000_000.0
        self.temp_mc = 45000
        self.mem_available_kb = 6_000_000
        for d in ("proc/net", "sys/class/hwmon/hwmon0", "sys/class/powercap/intel-rapl:0",
                  "sys/devices/system/cpu/cpu0/cpufreq"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "sys/class/hwmon/hwmon0/name").write_text("coretemp\n")
        (root / "sys/class/powercap/intel-rapl:0/name").write_text("package-0\n")
        (root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq").write_text("2400000\n")
        self.write()

    def write(self) -> None:
        r = self.root
        lines = []
        total = [sum(col) for col in zip(*self.jiffies, strict=True)]
        lines.append("cpu  " + " ".join(str(int(v)) for v in total) + " 0 0 0 0 0")
        for i, j in enumerate(self.jiffies):
            lines.append(f"cpu{i} " + " ".join(str(int(v)) for v in j) + " 0 0 0 0 0")
        lines += ["ctxt 12345", "processes 678", "procs_running 3", "procs_blocked 0"]
        _put(r / "proc/stat", "\n".join(lines) + "\n")
        _put(r / "proc/loadavg", "0.50 0.40 0.30 2/345 6789\n")
        _put(r / "proc/meminfo",
            f"MemTotal:       8000000 kB\nMemFree:        1000000 kB\n"
            f"MemAvailable:   {self.mem_available_kb} kB\nBuffers:          10000 kB\n"
            f"Cached:         2000000 kB\nSwapTotal:      1000000 kB\nSwapFree:        900000 kB\n"
        )
        _put(r / "proc/diskstats",
            f"   8       0 sda 100 0 {int(self.disk_sectors)} 0 50 0 {int(self.disk_sectors)} 0 0 10 20 0 0 0 0\n"
            "   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
        _put(r / "proc/net/dev",
            "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n"
            "    lo: 999 9 0 0 0 0 0 0 999 9 0 0 0 0 0 0\n"
            f"  eth0: {int(self.net_rx)} 10 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n"
        )
        hw = r / "sys/class/hwmon/hwmon0"
        if hw.exists():
            _put(hw / "temp1_input", f"{self.temp_mc}\n")
            _put(hw / "fan1_input", "1200\n")
        rapl = r / "sys/class/powercap/intel-rapl:0"
        if rapl.exists():
            _put(rapl / "energy_uj", f"{int(self.energy_uj)}\n")

    def tick(self, seconds: float = 1.0, busy: float = 0.25) -> None:
        """Advance counters as a node at ``busy`` CPU would over ``seconds``."""
        for j in self.jiffies:
            j[0] += 100 * seconds * busy
            j[3] += 100 * seconds * (1 - busy)
        self.net_rx += 1000 * seconds
        self.disk_sectors += 8 * seconds
        self.energy_uj += 30e6 * seconds  # 30 W
        self.write()
