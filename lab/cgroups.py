"""A cgroup per lab host, so that each host's processes are one workload the kernel accounts for.

The hosts of an emulated lab share one kernel: its /proc/stat, /proc/meminfo
and /proc/diskstats are the machine's, whatever namespace reads them. What
does separate the hosts is the cgroup: every process the lab starts on host H
(its daemons, the commands of ``lab.exec``/``lab.spawn``, and whatever those
start) is put into ``shoal-lab-RUN/H`` in each accounting hierarchy (cpu,
cpuacct, memory, blkio, pids on cgroup v1; the unified tree on v2), below the
lab process's own cgroup. ``cpuacct.usage`` of that cgroup is then host H's
CPU time and nobody else's, which is what a telemetry collector told to watch
its own cgroup reads (``[collector] cgroup = "self"``).

The directories are listed in the run's record, so ``shoal lab down`` removes
them even when the lab's process is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["HostCgroups", "remove_cgroups"]

ROOT = Path("/sys/fs/cgroup")
#: v1 hierarchies that account for a workload (cpuset needs cpus and mems set first;
#: freezer and devices account for nothing)
ACCOUNTING = ("cpu", "cpuacct", "memory", "blkio", "pids")


def _bases() -> list[Path]:
    """This process's own cgroup in each accounting hierarchy (v1), or in the unified tree (v2)."""
    out = []
    v2_only = (ROOT / "cgroup.controllers").exists()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if v2_only and not controllers:
            out.append(ROOT / path.lstrip("/"))
        for c in controllers.split(","):
            if c in ACCOUNTING and (ROOT / c).is_dir():
                out.append(ROOT / c / path.lstrip("/"))
    # cpu and cpuacct are one hierarchy mounted twice on some machines: keep one of each directory
    seen: set[tuple[int, int]] = set()
    unique = []
    for p in out:
        st = p.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            unique.append(p)
    return unique


class HostCgroups:
    """The run's cgroups: ``dirs(host)`` per hierarchy, made by :meth:`create`."""

    def __init__(self, run_id: str, hosts: list[str]) -> None:
        self.tops = [base / f"shoal-lab-{run_id}" for base in _bases()]
        self.hosts = hosts

    def create(self) -> None:
        for top in self.tops:
            top.mkdir()
            for h in self.hosts:
                (top / h).mkdir()

    def dirs(self, host: str) -> list[Path]:
        return [top / host for top in self.tops]

    def enter(self, host: str) -> None:
        """Move the calling process into the host's cgroups (a ``preexec_fn`` step, after fork)."""
        for d in self.dirs(host):
            with open(d / "cgroup.procs", "w") as f:
                f.write("0")  # "0": the writing process itself


def remove_cgroups(tops: list[str | Path]) -> list[str]:
    """Remove a run's cgroup trees (their processes must be gone: the lab killed them); what was removed."""
    removed = []
    for top in map(Path, tops):
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.iterdir() if p.is_dir()), reverse=True):
            _rmdir(d)
        _rmdir(top)
        removed.append(str(top))
    return removed


def _rmdir(d: Path) -> None:
    # A killed process leaves its cgroup a moment after it is reaped (EBUSY until then).
    for _ in range(200):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            time.sleep(0.01)
    d.rmdir()  # raise: something keeps it busy
