"""Task isolation: who a task runs as, the cgroup that bounds it, and that it dies with the worker.

Theory of operation
-------------------
Every daemon runs as the same user (``User=shoal``), so a task running as the
worker's user could signal every daemon on the node. A worker therefore runs
each command task

* as the **task user** (``task_user``, default ``nobody``; ``task_group``
  default that user's group), set in the child between ``fork`` and ``exec``
  (:meth:`Isolation.preexec`): supplementary groups dropped, gid then uid
  switched, no capabilities kept (ambient set cleared), ``no_new_privs`` set so
  a setuid binary cannot give them back, umask 022 so the worker can read the
  outputs. Its task directory is made writable for it (mode 0777 inside the
  0711 ``work_dir``) rather than given to it, and emptied as the task user
  before a rerun: the worker needs only ``CAP_SETUID`` and ``CAP_SETGID``. A worker that may not switch users
  (not root and without ``CAP_SETUID``/``CAP_SETGID``) refuses to start,
  unless ``when_unprivileged = "self"`` (a developer's laptop): then it says
  once in its log that tasks run as its own user;
* in **its own cgroup** when the worker has one to manage (``cgroup``): a
  child ``task-<pid>-<n>`` of that directory, with the unit's ``memory`` as
  ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) and its ``cpus`` as
  ``cpu.max`` (v2) or ``cpu.cfs_quota_us`` (v1, ``cgroup_cpu``). The child joins
  it before it drops root, so the task cannot leave it. A task the kernel's OOM
  killer stopped in its cgroup (``oom_kill`` in ``memory.events`` or
  ``memory.oom_control``) is reported "memory limit exceeded (N MiB)".
  Under systemd, ``Delegate=yes`` on the worker's unit hands it its own cgroup
  (v2): with ``cgroup = "auto"`` the worker moves itself into a ``daemon``
  leaf, enables the memory, cpu and pids controllers for the subtree and puts
  tasks next to it. On a hybrid host (cgroup v1 controllers), systemd
  delegates only the controller-less v2 directory; the worker's unit runs
  ``shoal worker delegate-cgroups`` as root first (:func:`delegate_v1_cgroups`),
  and the worker puts tasks below its own v1 memory and cpu directories. Off
  systemd (no writable cgroup of its own) it falls back to process groups and
  says so once in its log: limits are then not enforced.
* so that it **dies with the worker**: the task's leader has
  ``PR_SET_PDEATHSIG(SIGKILL)``; when a task ends, whatever it left behind in
  its cgroup (or process group) is killed; and a small *reaper* process
  (:mod:`shoal.daemons.worker.reaper`), started by the worker as the worker's
  user (the task user cannot signal it), holds the read end of a pipe from the
  worker; each task's leader writes its process group there itself, just
  before exec. When the worker dies, even by ``kill -9``, the pipe reaches EOF
  and the reaper kills every task cgroup and every task process group it was
  told about, then exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger("shoal.worker")

__all__ = ["IsolationError", "TaskUser", "CgroupTree", "TaskCgroup", "Isolation", "resolve_user", "can_switch_users",
           "own_v2_cgroup", "own_v1_cgroups", "delegate_v1_cgroups", "kill_cgroup", "Reaper", "check_reachable",
           "task_subprocess_kwargs"]

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_SETGID, CAP_SETUID = 6, 7
CGROUP2_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD = 100_000  # microseconds: the kernel's default CFS period

_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it


class IsolationError(Exception):
    """The worker cannot isolate tasks as configured (one line)."""


@dataclass(frozen=True, slots=True)
class TaskUser:
    uid: int
    gid: int
    name: str


def resolve_user(user: str, group: str = "") -> TaskUser:
    """``user``: a name or a numeric uid; ``group``: a name, a gid, or "" for the user's own group."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid, name = pw.pw_uid, pw.pw_gid, pw.pw_name
    except KeyError:
        if not user.isdigit():
            raise IsolationError(f"task_user: no user {user!r} on this host") from None
        uid = gid = int(user)  # a numeric uid needs no passwd entry
        name = user
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise IsolationError(f"task_group: no group {group!r} on this host") from None
    return TaskUser(uid, gid, name)


def _cap_effective() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def can_switch_users() -> bool:
    if os.geteuid() == 0:
        return True
    caps = _cap_effective()
    return bool(caps & (1 << CAP_SETUID)) and bool(caps & (1 << CAP_SETGID))


def own_v2_cgroup() -> Path | None:
    """The worker's own cgroup v2 directory, if the host is v2-only and the worker may write it
    (under systemd: ``Delegate=yes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    if len(lines) != 1 or not lines[0].startswith("0::/"):
        return None  # cgroup v1 or hybrid: systemd delegates nothing usable here
    rel = lines[0][3:].strip().lstrip("/")
    path = CGROUP2_ROOT / rel
    if not rel or not (path / "cgroup.subtree_control").exists():
        return None  # the top of the hierarchy is never ours
    return path if os.access(path, os.W_OK) and os.access(path / "cgroup.procs", os.W_OK) else None


def _own_cgroup_lines() -> dict[str, str]:
    """This process's cgroup path per v1 hierarchy (``memory``, ``cpu``, ``name=systemd``, ...; a
    hierarchy mounting several controllers is listed under each); ``""`` is the v2 one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c] = path
    return out


def _v1_dir(controller: str, rel: str) -> Path | None:
    """The v1 directory of ``controller`` for cgroup ``rel``, unless ``rel`` is the top."""
    rel = rel.strip().lstrip("/")
    path = CGROUP2_ROOT / controller / rel
    return path if rel and path.is_dir() else None


def own_v1_cgroups() -> tuple[Path, Path | None] | None:
    """The worker's own v1 memory directory (and cpu, if it has one) when it may write them:
    a hybrid host under systemd, after :func:`delegate_v1_cgroups` ran as ``ExecStartPre=+``."""
    own = _own_cgroup_lines()
    memory = _v1_dir("memory", own["memory"]) if "memory" in own else None
    if memory is None or not _handed_to_us(memory):
        return None
    cpu = _v1_dir("cpu", own["cpu"]) if "cpu" in own else None
    return memory, cpu if cpu is not None and _handed_to_us(cpu) else None


def _handed_to_us(d: Path) -> bool:
    """Owned by our own (non-root) user: given to us, as delegate_v1_cgroups does. Root may
    write every cgroup, but a root worker off systemd shares its cgroup with whatever started
    it (other workers, a test run), so writable alone is not "its own"."""
    euid = os.geteuid()
    return euid != 0 and d.stat().st_uid == euid and os.access(d, os.W_OK)


def delegate_v1_cgroups() -> list[Path]:
    """Give the unit's v1 memory and cpu directories to the user systemd delegated its cgroup to.

    systemd's ``Delegate=yes`` chowns a unit's cgroup only in the ``name=systemd`` and v2
    hierarchies; on a hybrid host the v1 controllers, where memory and cpu limits live, stay
    root's. Run as root in the unit's cgroup (``ExecStartPre=+``), this chowns those two
    directories (only the unit's own, never the top) to the owner of its ``name=systemd``
    directory. Returns what it changed; nothing on a v2-only host or when nothing was delegated.
    """
    own = _own_cgroup_lines()
    ref = _v1_dir("systemd", own.get("name=systemd", ""))
    if ref is None:
        return []
    st = ref.stat()
    if st.st_uid == 0:
        return []  # not delegated (no Delegate=yes, or a root unit): nothing to hand over
    changed = []
    for controller in ("memory", "cpu"):
        d = _v1_dir(controller, own.get(controller, ""))
        if d is not None:
            os.chown(d, st.st_uid, st.st_gid)
            changed.append(d)
    return changed


def _procs(cg: Path) -> list[int]:
    try:
        return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_cgroup(cg: Path) -> None:
    """SIGKILL every process in ``cg`` and its descendants (``cgroup.kill`` where the kernel has it)."""
    kill = cg / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
            return
    for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        kill_cgroup(sub)
    for pid in _procs(cg):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class TaskCgroup:
    """One task's cgroup (one directory per hierarchy: v2, or v1 memory and cpu)."""

    def __init__(self, dirs: list[Path], memory_limit: int, v2: bool) -> None:
        self.dirs = dirs
        self.memory_limit = memory_limit
        self.v2 = v2

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        for d in self.dirs:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit() and int(value) > 0:
                        return True
        return False

    def empty(self) -> bool:
        return not any(_procs(d) for d in self.dirs)

    def kill(self) -> None:
        for d in self.dirs:
            kill_cgroup(d)

    def remove(self) -> bool:
        ok = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok


class CgroupTree:
    """Where task cgroups are made: a v2 directory, or v1 memory (and optionally cpu) directories."""

    def __init__(self, base: Path, cpu_base: Path | None = None) -> None:
        self.base = base
        self.v2 = (base / "cgroup.subtree_control").exists()
        self.cpu_base = None if self.v2 else cpu_base
        self.count = 0
        for d in (base, cpu_base) if cpu_base else (base,):
            if not d.is_dir() or not os.access(d, os.W_OK):
                raise IsolationError(f"cgroup: {d} is not a cgroup directory the worker may write")

    def prepare(self) -> None:
        """Clean task cgroups a killed worker left behind; on v2 move the worker into a leaf and
        enable the controllers for its task cgroups."""
        for root in (self.base, self.cpu_base):
            if root is None:
                continue
            for stale in root.glob("task-*"):
                kill_cgroup(stale)
                with contextlib.suppress(OSError):
                    stale.rmdir()
        if not self.v2:
            return
        if _procs(self.base):
            leaf = self.base / "daemon"
            leaf.mkdir(exist_ok=True)
            for pid in _procs(self.base):  # the worker itself (and anything it started so far)
                with contextlib.suppress(OSError):
                    (leaf / "cgroup.procs").write_text(str(pid))
        available = (self.base / "cgroup.controllers").read_text().split()
        wanted = [c for c in ("memory", "cpu", "pids") if c in available]
        try:
            (self.base / "cgroup.subtree_control").write_text(" ".join("+" + c for c in wanted))
        except OSError as exc:
            raise IsolationError(f"cgroup: cannot enable {', '.join(wanted)} in {self.base}: {exc.strerror}") from None

    def create(self, cpus: float, memory: int) -> TaskCgroup:
        self.count += 1
        name = f"task-{os.getpid()}-{self.count}"
        dirs = [self.base / name]
        if self.cpu_base is not None:
            dirs.append(self.cpu_base / name)
        for d in dirs:
            d.mkdir()
        cg = TaskCgroup(dirs, memory, self.v2)
        if self.v2:
            if memory > 0:
                _write(dirs[0] / "memory.max", str(memory))
                _write(dirs[0] / "memory.swap.max", "0", optional=True)
            if cpus > 0:
                _write(dirs[0] / "cpu.max", f"{max(1000, int(cpus * CPU_PERIOD))} {CPU_PERIOD}", optional=True)
        else:
            if memory > 0:
                _write(dirs[0] / "memory.limit_in_bytes", str(memory))
                _write(dirs[0] / "memory.memsw.limit_in_bytes", str(memory), optional=True)
            if cpus > 0 and self.cpu_base is not None:
                _write(dirs[1] / "cpu.cfs_period_us", str(CPU_PERIOD))
                _write(dirs[1] / "cpu.cfs_quota_us", str(max(1000, int(cpus * CPU_PERIOD))))
        return cg


def _write(path: Path, value: str, *, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        if not optional:
            raise IsolationError(f"cgroup: cannot write {value} to {path}: {exc.strerror}") from None


class Isolation:
    """How this worker isolates tasks; built once at start (:func:`make_isolation`)."""

    def __init__(self, user: TaskUser | None, cgroups: CgroupTree | None) -> None:
        self.user = user  # None: tasks run as the worker's own user
        self.cgroups = cgroups  # None: process groups only
        self.reaper: Reaper | None = None

    def preexec(self, cgroup: TaskCgroup | None, *, task: bool = False) -> Callable[[], None]:
        """What the child does between fork and exec (it runs as the worker's user until then).

        ``task``: a task's leader in process-group mode tells the reaper its group itself, last
        before exec, so the group is known before the task can fork. The worker's own
        :meth:`started` comes only after the spawn returns; a worker killed in between left the
        task's children running (a CI run of test_a_killed_worker_leaves_no_task_process_behind).
        An exec that fails after this leaves the reaper one stale group, killed only if the
        worker dies and the number was reused as a process group.
        """
        procs = cgroup.procs_files() if cgroup is not None else []
        user = self.user
        parent = os.getpid()
        tell = self.reaper.fd if task and self.reaper is not None and self.cgroups is None else None

        def child() -> None:
            for path in procs:  # join the task's cgroup while still allowed to
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)
            os.umask(0o022)  # the worker reads the task's outputs (the unit's UMask is 0077)
            if user is not None:
                os.setgroups([])
                os.setgid(user.gid)
                os.setuid(user.uid)
            _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
            _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            # After the uid change (which clears it): die with the worker.
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(137)  # the worker died before the death signal was armed
            if tell is not None:  # the group's id: start_new_session made this its leader
                pipe = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # restored to default by now
                try:
                    os.write(tell, b"+%d\n" % os.getpid())
                except OSError:
                    pass  # a dead reaper must not stop the task (the worker's tell() says the same)
                finally:
                    signal.signal(signal.SIGPIPE, pipe)

        return child

    def prepare_dir(self, path: Path) -> None:
        """Let the task user write its own task directory (no chown: the worker needs no CAP_CHOWN).
        Its parent is not listable (work_dir is 0711), and every task runs as the same user anyway."""
        if self.user is not None:
            os.chmod(path, 0o777)

    async def clean_dir(self, path: Path) -> None:
        """Empty and remove a task directory the task user wrote into: what it made is deleted as
        that user (the worker has no CAP_DAC_OVERRIDE), the rest by the worker."""
        try:
            names = await trio.to_thread.run_sync(os.listdir, path)
        except FileNotFoundError:
            return
        if self.user is not None and names:
            with contextlib.suppress(OSError):
                await trio.run_process(["rm", "-rf", "--", *(str(path / n) for n in names)], check=False,
                                       start_new_session=True, preexec_fn=self.preexec(None),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await trio.to_thread.run_sync(shutil.rmtree, path)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        if self.user is None:
            return base
        return dict(base, USER=self.user.name, LOGNAME=self.user.name)

    def started(self, pgid: int) -> None:
        if self.reaper is not None and self.cgroups is None:
            self.reaper.tell(f"+{pgid}")

    def ended(self, pgid: int) -> None:
        if self.reaper is not None and self.cgroups is None:
            self.reaper.tell(f"-{pgid}")


def check_reachable(path: Path, user: TaskUser) -> None:
    """Refuse a work_dir the task user cannot reach (a directory on the way is not searchable for it)."""
    for d in [path, *path.parents]:
        try:
            st = d.stat()
        except OSError:
            continue
        mode = st.st_mode
        if st.st_uid == user.uid:
            ok = mode & stat.S_IXUSR
        elif st.st_gid == user.gid:
            ok = mode & stat.S_IXGRP
        else:
            ok = mode & stat.S_IXOTH
        if not ok:
            raise IsolationError(f"work_dir: {path}: the task user {user.name} cannot enter {d} "
                                 f"(mode {stat.S_IMODE(mode):o}); choose a work_dir it can reach")


class Reaper:
    """The worker's reaper process: kills every task when the worker's end of its pipe closes."""

    def __init__(self, proc: trio.Process, fd: int) -> None:
        self.proc = proc
        self.fd = fd

    @classmethod
    async def start(cls, cgroup_dirs: list[Path]) -> Reaper:
        r, w = os.pipe()  # both ends close-on-exec: no task inherits the write end
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "shoal.daemons.worker.reaper", *map(str, cgroup_dirs)],
                stdin=r, start_new_session=True)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return cls(proc, w)

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # a dead reaper must not stop the worker
            os.write(self.fd, (line + "\n").encode())

    async def stop(self) -> None:
        """The worker is stopping: the reaper kills what is left and exits."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self.proc.wait()


def task_subprocess_kwargs(isolation: Isolation | None, cgroup: TaskCgroup | None) -> dict:
    if isolation is None:
        return {"start_new_session": True}
    return {"start_new_session": True, "preexec_fn": isolation.preexec(cgroup, task=True)}

