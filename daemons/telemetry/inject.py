"""Live fault injectors: make this node anomalous on purpose, for a bounded time.

Theory of operation
-------------------
The kinds are those of HPAS, the HPC performance anomaly suite detectors like
the seed's are evaluated with:

============== ============================================================
kind           what it does (``intensity`` in (0, 1])
============== ============================================================
``cpuoccupy``  a busy loop per core (``--workers``, default every core), each
               busy ``intensity`` of every 10 ms
``cachecopy``  ``intensity`` of the cores each copy a buffer the size of the
               last-level cache back and forth (cache contention)
``membw``      ``intensity`` of the cores each stream buffers far larger than
               the cache (memory bandwidth)
``memleak``    memory allocated and touched in steps, growing to ``intensity``
               of MemTotal at the end of the duration, never released early
``memeater``   ``intensity`` of MemTotal taken at once and rewritten page by
               page for the whole duration (memory pressure)
``netoccupy``  TCP traffic at up to ``intensity`` of 1 Gbit/s over a veth
               pair into a network namespace the injector makes and removes
               (a real interface the ``net`` source sees, not loopback)
``iobandwidth`` write + fsync of a scratch file at up to ``intensity`` of
               256 MiB/s
``iometadata`` create, fsync, rename, stat and unlink small scratch files at
               up to ``intensity`` of 5000 files/s
============== ============================================================

``cpu``, ``mem``, ``io`` and ``net`` are the old names of cpuoccupy,
memleak, iobandwidth and netoccupy.

**Bounds.** :func:`plan` turns (kind, intensity, duration, the node) into a
:class:`Plan` that bounds *every* resource the fault may take: processes,
memory, bytes written to disk (in total, not only the file size: the old io
injector wrote 62-88 GiB in 20 s), files alive, bytes sent. Memory is sized to
the node (a share of MemTotal) and never more than MemAvailable less a
reserve; disk writes never more than a share of the scratch filesystem's free
space. The injector stops when its duration ends *or* a total bound is hit,
releases everything it took (processes joined or killed, memory freed, scratch
files and the namespace removed, also on Ctrl-C), and reports what it did.
``plan`` is pure (the node's figures are passed in), so tests check the bounds
without running anything.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("cpuoccupy", "cachecopy", "membw", "memleak", "memeater", "netoccupy", "iobandwidth", "iometadata")
ALIASES = {"cpu": "cpuoccupy", "mem": "memleak", "io": "iobandwidth", "net": "netoccupy"}
#: intensity when none is given: full for the rate-bounded kinds, a quarter of the node's memory
DEFAULT_INTENSITY = {"memleak": 0.25, "memeater": 0.25}

MAX_DURATION = 86400.0
# Memory: never leave the node less than this much of MemAvailable (the larger of the two).
MEM_RESERVE_SHARE = 0.10
MEM_RESERVE_MIN = 512 << 20
MAX_MEM_BYTES = 1 << 40                     # 1 TiB: larger than any node's share is a typo
# Cache and bandwidth buffers: this share of MemAvailable at most, all workers together.
COPY_MEM_SHARE = 0.05
DEFAULT_LLC_BYTES = 8 << 20                 # when sysfs does not say
MEMBW_BUFFER_MIN = 64 << 20
# Disk: a rate, a file size, and a total of bytes written bounded by the free space.
IO_MAX_RATE = 256 << 20                     # bytes/s at intensity 1
IO_FILE_MAX = 256 << 20
IO_TOTAL_MAX = 4 << 30                      # never more than 4 GiB written by one injection
IO_FREE_SHARE = 0.10                        # ... nor more than 10 % of the filesystem's free space
META_MAX_RATE = 5000                        # files/s at intensity 1
META_FILES_ALIVE = 1000
META_FILE_BYTES = 4096
META_TOTAL_MAX = 1_000_000                  # files created by one injection at most
# Network: a rate and a total.
NET_MAX_RATE = 125_000_000                  # 1 Gbit/s at intensity 1
NET_TOTAL_MAX = 32 << 30
NET_CHUNK = 64 << 10
# The veth pair and namespace (one net injection at a time: the names are fixed, so the node's
# `net` source sees the same interface every time). Link-local addresses, never routed off it.
NETNS_PREFIX = "shoal-inj-"
VETH_HOST, VETH_PEER = "shoalinj0", "shoalinj1"
NET_HOST_ADDR, NET_PEER_ADDR, NET_PREFIXLEN = "169.254.213.1", "169.254.213.2", 30
NET_PORT = 5201
READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Node:
    """What the plan sizes a fault to: this node's figures (see :func:`this_node`)."""

    cpus: int
    mem_total: int
    mem_available: int
    llc_bytes: int
    disk_free: int


@dataclass(frozen=True, slots=True)
class Plan:
    """Every resource one injection may take; 0 = none of it."""

    kind: str
    duration: float
    intensity: float
    workers: int = 0          # processes besides the injector
    duty: float = 0.0         # busy share of each worker's time (cpuoccupy)
    memory_bytes: int = 0     # memory held at the peak, all processes together
    buffer_bytes: int = 0     # per-worker buffer (cachecopy, membw)
    disk_bytes: int = 0       # bytes written to disk in total
    file_bytes: int = 0       # the largest scratch file
    files: int = 0            # scratch files alive at once
    rate: float = 0.0         # bytes/s (io, net) or files/s (iometadata) at most
    net_bytes: int = 0        # bytes sent in total
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line: every bound that is not 0, bytes in MiB."""
        unit = "files/s" if self.kind == "iometadata" else "MiB/s"
        parts = []
        for k, v in asdict(self).items():
            if k in ("kind", "notes", "duration") or not v:
                continue
            if k.endswith("_bytes"):
                parts.append(f"{k.removesuffix('_bytes')} {v / (1 << 20):.6g} MiB")
            elif k == "rate":
                parts.append(f"rate {v if unit == 'files/s' else v / (1 << 20):.6g} {unit}")
            else:
                parts.append(f"{k} {v:g}")
        return ", ".join(parts)


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _llc_bytes(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest cache cpu0 sees (the last level), from sysfs; DEFAULT_LLC_BYTES if unknown."""
    best = 0
    for index in Path(cpu_dir).glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        with contextlib.suppress(ValueError):
            best = max(best, int(text.rstrip("KMGkmg")) * mult)
    return best or DEFAULT_LLC_BYTES


def this_node(directory: str | None = None) -> Node:
    mem = _meminfo()
    st = os.statvfs(directory or tempfile.gettempdir())
    return Node(cpus=os.cpu_count() or 1, mem_total=mem.get("MemTotal", 0),
                mem_available=mem.get("MemAvailable", mem.get("MemFree", 0)),
                llc_bytes=_llc_bytes(), disk_free=st.f_bavail * st.f_frsize)


def plan(kind: str, duration: float, node: Node, *, intensity: float | None = None, workers: int = 0,
         mib: int = 0) -> Plan:
    """The bounds of one injection (pure: ``node`` is passed in). ValueError for a bad request.

    ``workers`` overrides the process count of cpuoccupy, cachecopy and membw; ``mib`` the
    memory of memleak/memeater (still capped by MemAvailable less the reserve) or the scratch
    file of iobandwidth.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; kinds: {', '.join(KINDS)} "
                         f"(or {', '.join(ALIASES)})")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION:g}] seconds")
    x = DEFAULT_INTENSITY.get(kind, 1.0) if intensity is None else intensity
    if not 0 < x <= 1:
        raise ValueError("intensity must be in (0, 1]")
    if workers < 0 or workers > 4 * node.cpus:
        raise ValueError(f"workers must be in [0, {4 * node.cpus}] (0: sized to the node)")
    if mib < 0:
        raise ValueError("mib must be >= 0")
    share_of_cores = workers or max(1, round(x * node.cpus))
    free_mem = max(0, node.mem_available - max(MEM_RESERVE_MIN, math.ceil(MEM_RESERVE_SHARE * node.mem_total)))
    def mk(**bounds) -> Plan:
        return Plan(kind, float(duration), float(x), **bounds)

    if kind == "cpuoccupy":
        return mk(workers=workers or node.cpus, duty=x)
    if kind in ("cachecopy", "membw"):
        want = node.llc_bytes if kind == "cachecopy" else max(MEMBW_BUFFER_MIN, 4 * node.llc_bytes)
        cap = int(COPY_MEM_SHARE * node.mem_available) // (2 * share_of_cores)
        buf = min(want, cap)
        if buf < 1 << 20:
            raise ValueError(f"{kind}: under 1 MiB per worker left in MemAvailable; not injecting")
        return mk(workers=share_of_cores, buffer_bytes=buf, memory_bytes=2 * buf * share_of_cores)
    if kind in ("memleak", "memeater"):
        want = (mib << 20) if mib else int(x * node.mem_total)
        target = min(want, free_mem, MAX_MEM_BYTES)
        notes = [f"capped at MemAvailable less the reserve ({free_mem >> 20} MiB)"] if target < want else []
        if target < 1 << 20:
            raise ValueError(f"{kind}: under 1 MiB of MemAvailable beyond the reserve; not injecting")
        return mk(memory_bytes=target, notes=notes)
    if kind == "iobandwidth":
        rate = x * IO_MAX_RATE
        total = int(min(rate * duration, IO_TOTAL_MAX, IO_FREE_SHARE * node.disk_free))
        fsize = min((mib << 20) if mib else IO_FILE_MAX, IO_FILE_MAX, total)
        if fsize < 1 << 20:
            raise ValueError("iobandwidth: under 1 MiB may be written here (free space); not injecting")
        return mk(rate=rate, disk_bytes=total, file_bytes=fsize, files=1)
    if kind == "iometadata":
        rate = x * META_MAX_RATE
        total_files = int(min(rate * duration, META_TOTAL_MAX,
                              min(IO_TOTAL_MAX, IO_FREE_SHARE * node.disk_free) // META_FILE_BYTES))
        if total_files < 1:
            raise ValueError("iometadata: no room for a file here (free space); not injecting")
        return mk(rate=rate, files=META_FILES_ALIVE, file_bytes=META_FILE_BYTES,
                    disk_bytes=total_files * META_FILE_BYTES)
    # netoccupy
    rate = x * NET_MAX_RATE
    return mk(rate=rate, net_bytes=int(min(rate * duration, NET_TOTAL_MAX)), workers=1)


# -- running a plan ---------------------------------------------------------------------------


def _spin(deadline: float, duty: float) -> None:
    period = 0.01
    x = 0
    while (now := time.time()) < deadline:
        busy_until = now + period * duty
        while time.time() < busy_until:
            for _ in range(1000):
                x += 1
        if duty < 1.0:
            time.sleep(period * (1 - duty))


def _copy(deadline: float, nbytes: int) -> None:
    import numpy as np

    a = np.ones(nbytes // 8, np.float64)
    b = np.empty_like(a)
    while time.time() < deadline:
        np.copyto(b, a)
        np.copyto(a, b)


def _run_workers(target, args: tuple, n: int, duration: float) -> int:
    procs = [mp.Process(target=target, args=args, daemon=True) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(duration + 5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return n


def _touch(buf: bytearray, value: int = 1) -> None:
    """Write one byte of every page, so it is resident (a slice assignment: C speed)."""
    n = len(range(0, len(buf), 4096))
    buf[::4096] = bytes([value]) * n


def run_memleak(p: Plan) -> dict:
    """Grow to ``memory_bytes`` in 20 steps over the duration (the last step at its end)."""
    steps = 20
    step = max(1 << 20, p.memory_bytes // steps)
    chunks: list[bytearray] = []
    start = time.time()
    held = 0
    try:
        for i in range(steps):
            if held + step > p.memory_bytes or time.time() >= start + p.duration:
                break  # at its size, or out of time (a slow node): never past the duration
            c = bytearray(step)
            _touch(c)
            chunks.append(c)
            held += step
            wait = start + p.duration * (i + 1) / steps - time.time()
            if wait > 0:
                time.sleep(wait)
        time.sleep(max(0.0, start + p.duration - time.time()))
    finally:
        chunks.clear()
    return {"peak_mib": held >> 20}


def run_memeater(p: Plan) -> dict:
    """Take ``memory_bytes`` at once, then rewrite every page over and over until the end."""
    deadline = time.time() + p.duration
    chunk = 64 << 20
    bufs = [bytearray(min(chunk, p.memory_bytes - off)) for off in range(0, p.memory_bytes, chunk)]
    passes = 0
    try:
        while time.time() < deadline:
            for b in bufs:
                _touch(b, value=passes & 0xFF)
                if time.time() >= deadline:
                    break
            passes += 1
    finally:
        held = sum(len(b) for b in bufs)
        bufs.clear()
    return {"peak_mib": held >> 20, "passes": passes}


def run_iobandwidth(p: Plan, directory: str | None) -> dict:
    block = os.urandom(1 << 20)
    written = 0
    start = time.time()
    deadline = start + p.duration
    with tempfile.NamedTemporaryFile(dir=directory, prefix="shoal-inject-") as f:
        while time.time() < deadline and written < p.disk_bytes:
            f.seek(0)
            pos = 0
            while pos < p.file_bytes and written < p.disk_bytes and time.time() < deadline:
                n = min(len(block), p.file_bytes - pos, p.disk_bytes - written)
                f.write(block[:n])
                pos += n
                written += n
                ahead = start + written / p.rate - time.time()  # at most `rate` bytes/s
                if ahead > 0:
                    f.flush()
                    time.sleep(min(ahead, max(0.0, deadline - time.time())))
            f.flush()
            os.fsync(f.fileno())
    return {"written_mib": written >> 20, "written_bytes": written}


def run_iometadata(p: Plan, directory: str | None) -> dict:
    created = 0
    start = time.time()
    deadline = start + p.duration
    limit = p.disk_bytes // META_FILE_BYTES
    payload = b"\0" * META_FILE_BYTES
    with tempfile.TemporaryDirectory(dir=directory, prefix="shoal-inject-meta-") as d:
        alive: list[str] = []
        while time.time() < deadline and created < limit:
            name = os.path.join(d, f"f{created}")
            fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            try:
                os.write(fd, payload)
                if created % 16 == 0:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(name, name + ".r")
            os.stat(name + ".r")
            alive.append(name + ".r")
            created += 1
            if len(alive) >= p.files:
                for old in alive[: p.files // 2]:
                    os.unlink(old)
                del alive[: p.files // 2]
            ahead = start + created / p.rate - time.time()
            if ahead > 0:
                time.sleep(min(ahead, max(0.0, deadline - time.time())))
    return {"files_created": created, "written_bytes": created * META_FILE_BYTES}


# -- the network fault: a veth pair into a namespace of its own --------------------------------

_SINK = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
total = 0
while data := conn.recv(1 << 20):
    total += len(data)
print(total, flush=True)
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_stale_netns() -> list[str]:
    """Namespaces left by a net injector that was killed (its pid is gone): removed."""
    removed = []
    for ns in _netns_list():
        if ns.startswith(NETNS_PREFIX) and ns[len(NETNS_PREFIX):].isdigit():
            pid = int(ns[len(NETNS_PREFIX):])
            try:
                os.kill(pid, 0)
                continue  # its injector is alive
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def _iface_counter(name: str, what: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{name}/statistics/{what}").read_text())
    except (OSError, ValueError):
        return 0


def run_netoccupy(p: Plan) -> dict:
    if shutil.which("ip") is None:
        raise OSError("netoccupy needs iproute2's `ip` (apt-get install iproute2)")
    if os.geteuid() != 0:
        raise OSError("netoccupy makes a network namespace and a veth pair: run it as root")
    remove_stale_netns()
    if Path(f"/sys/class/net/{VETH_HOST}").exists():
        raise OSError(f"interface {VETH_HOST} exists: another net injection is running (or remove it: "
                      f"ip link del {VETH_HOST})")
    ns = f"{NETNS_PREFIX}{os.getpid()}"
    sink = None
    sent = 0
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_PEER)
        _ip("link", "set", VETH_PEER, "netns", ns)
        _ip("addr", "add", f"{NET_HOST_ADDR}/{NET_PREFIXLEN}", "dev", VETH_HOST)
        _ip("link", "set", VETH_HOST, "up")
        _ip("-n", ns, "addr", "add", f"{NET_PEER_ADDR}/{NET_PREFIXLEN}", "dev", VETH_PEER)
        _ip("-n", ns, "link", "set", VETH_PEER, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        sink = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", _SINK, NET_PEER_ADDR,
                                 str(NET_PORT)], stdout=subprocess.PIPE, text=True)
        out_pipe = sink.stdout
        assert out_pipe is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(out_pipe.readline()), daemon=True)
        reader.start()
        reader.join(READY_TIMEOUT)
        if not ready or ready[0].strip() != "ready":
            raise OSError(f"the traffic sink in namespace {ns} did not start")
        tx0 = _iface_counter(VETH_HOST, "tx_bytes")
        buf = b"\0" * NET_CHUNK
        start = time.time()
        deadline = start + p.duration
        with socket.create_connection((NET_PEER_ADDR, NET_PORT), timeout=READY_TIMEOUT) as c:
            c.settimeout(max(1.0, p.duration))
            while time.time() < deadline and sent < p.net_bytes:
                n = min(NET_CHUNK, p.net_bytes - sent)
                c.sendall(buf[:n])
                sent += n
                ahead = start + sent / p.rate - time.time()
                if ahead > 0:
                    time.sleep(min(ahead, max(0.0, deadline - time.time())))
        tx = _iface_counter(VETH_HOST, "tx_bytes") - tx0
        out, _ = sink.communicate(timeout=READY_TIMEOUT)
        received = int(out.strip() or 0)
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait(5)
        _ip("link", "del", VETH_HOST, check=False)
        _ip("netns", "del", ns, check=False)
    return {"sent_mib": sent >> 20, "sent_bytes": sent, "received_bytes": received,
            "interface": VETH_HOST, "interface_tx_bytes": tx}


def run(p: Plan, *, directory: str | None = None) -> dict:
    """Run a plan to its end (or to a total bound); release everything; report what it did."""
    if p.kind == "cpuoccupy":
        done = {"workers": _run_workers(_spin, (time.time() + p.duration, p.duty), p.workers, p.duration)}
    elif p.kind in ("cachecopy", "membw"):
        done = {"workers": _run_workers(_copy, (time.time() + p.duration, p.buffer_bytes), p.workers, p.duration),
                "buffer_mib": p.buffer_bytes >> 20}
    elif p.kind == "memleak":
        done = run_memleak(p)
    elif p.kind == "memeater":
        done = run_memeater(p)
    elif p.kind == "iobandwidth":
        done = run_iobandwidth(p, directory)
    elif p.kind == "iometadata":
        done = run_iometadata(p, directory)
    else:
        done = run_netoccupy(p)
    return {"kind": p.kind, **done}


def inject(kind: str, duration: float, *, intensity: float | None = None, workers: int = 0, mib: int = 0,
           directory: str | None = None, node: Node | None = None) -> dict:
    """Plan (sized to this node unless ``node`` is given) and run one fault."""
    p = plan(kind, duration, node or this_node(directory), intensity=intensity, workers=workers, mib=mib)
    return run(p, directory=directory)
