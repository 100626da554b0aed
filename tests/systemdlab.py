"""A real systemd booted as PID 1 for the tests, on an overlay of this machine's root.

:func:`boot` follows shared/notes/systemd.md: it makes a cgroup of its own
below the test's in every mounted hierarchy, moves a shell into it, and runs
``unshare --pid --mount --uts --ipc --net --cgroup`` on ``tests/systemd/boot.sh``,
which mounts an overlay of ``/`` (writes go to a tmpfs), fresh ``/proc``,
``/sys``, cgroup trees, ``/dev`` and ``/run``, pivots into it and execs
``/lib/systemd/systemd``. The machine gets its own network namespace (only
``lo``), so every daemon in it talks to 127.0.0.1 of its own.

:meth:`Machine.run` runs a command inside with ``nsenter``; :meth:`Machine.wait`
polls a condition inside, bounded by a deadline (what a daemon does is only
visible through systemctl and its sockets). :meth:`Machine.poweroff` stops it;
the context manager then kills whatever is left and removes the cgroups, so
nothing the boot made outlives the test: mounts and namespaces go with their
last process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOT = HERE / "systemd" / "boot.sh"
SYSTEMD = Path("/lib/systemd/systemd")


def missing() -> str | None:
    """Why a real systemd cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    for tool in ("unshare", "nsenter", "pivot_root"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed (Debian's systemd package)"
    return None


class CommandFailed(AssertionError):
    pass


@dataclass
class Machine:
    pid: int  # systemd's PID on the host
    workdir: Path

    def run(self, *cmd: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the machine, as root; output is returned as text."""
        proc = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "-r", "-w", "env", "-i",
                               "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                               "HOME=/root", "LANG=C.UTF-8", *cmd],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise CommandFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.run("systemctl", *args, check=check, timeout=timeout).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 60,
             units: tuple[str, ...] = ()) -> None:
        """Poll ``condition`` (which asks the machine) until it holds; fail after ``timeout``,
        with the status and recent journal of ``units``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                status = "".join(self.systemctl("status", "--no-pager", "-n", "15", u, check=False) for u in units)
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{status}")
            time.sleep(0.2)

    def poweroff(self, timeout: float = 60) -> None:
        self.run("systemctl", "poweroff", check=False)
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            time.sleep(0.2)


def _own_cgroups(name: str) -> list[Path]:
    """One new cgroup per mounted hierarchy, below this process's own."""
    made = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        base = Path("/sys/fs/cgroup") / (controllers.removeprefix("name=") if controllers else "unified")
        if not base.is_dir():
            continue
        parent = base / path.lstrip("/")
        cg = parent / name
        cg.mkdir()
        made.append(cg)
        if controllers == "cpuset":  # a cpuset cgroup takes no process until it has cpus and mems
            for f in ("cpuset.cpus", "cpuset.mems"):
                (cg / f).write_text((parent / f).read_text())
    return made


def _remove_cgroups(cgroups: list[Path]) -> None:
    """Remove the cgroups (and any left inside them), moving stray processes to the parent."""
    for top in cgroups:
        if not top.exists():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            with contextlib.suppress(OSError):
                for pid in (d / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


@contextlib.contextmanager
def boot(workdir: Path, *, binds: tuple[Path, ...] = (), timeout: float = 90) -> Iterator[Machine]:
    """A running systemd on an overlay of ``/``; powered off and cleaned up at exit.

    ``workdir/share`` (where to put files for the machine) and every path in
    ``binds`` are visible, read-only, at the same place inside.
    """
    (workdir / "share").mkdir(parents=True, exist_ok=True)
    cgroups = _own_cgroups(f"shoal-systemd-test-{os.getpid()}")
    log = open(workdir / "boot.log", "w")  # noqa: SIM115 - closed in finally
    moves = " ".join(f"echo $$ > {cg}/cgroup.procs;" for cg in cgroups)
    shown = " ".join(str(b) for b in (workdir / "share", *binds))
    proc = subprocess.Popen(
        ["sh", "-c", f"{moves} exec unshare --fork --kill-child --pid --mount --uts --ipc --net --cgroup "
                     f"{BOOT} {workdir} {shown}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        machine = None
        deadline = time.monotonic() + timeout
        while machine is None:
            if proc.poll() is not None:
                raise AssertionError(f"systemd did not boot:\n{(workdir / 'boot.log').read_text()}")
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            for pid in children.read_text().split() if children.exists() else ():
                if Path(f"/proc/{pid}/exe").resolve() == SYSTEMD.resolve():
                    machine = Machine(int(pid), workdir)
            if time.monotonic() > deadline:
                raise AssertionError(f"systemd did not start:\n{(workdir / 'boot.log').read_text()}")
            time.sleep(0.1)

        def booted() -> bool:
            state = machine.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        machine.wait("systemd to finish booting", booted, timeout=timeout)
        yield machine
        machine.poweroff()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        _remove_cgroups(cgroups)
