"""Live fault injectors: make this node anomalous on purpose, for a bounded time.

Modelled on the kinds of the HPC performance anomaly suite (HPAS): a CPU hog
(busy loops on N cores), a memory leak (memory allocated and touched in
steps, growing to a bound), I/O contention (write + fsync of a scratch file
in a loop) and network contention (TCP traffic through loopback). Each runs
for ``--duration`` seconds and then releases everything it took; every
resource is bounded by an option (cores, MiB, file size), so a mistyped
command cannot take a node down. With ``--label``, the time range is
labelled in the local telemetry daemon first, so the windows it disturbs are
kept out of training and can be checked against the detector's verdicts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import threading
import time

MAX_MEM_MIB = 1 << 16
MAX_FILE_MIB = 4096


def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        for _ in range(10000):
            x += 1


def cpu(duration: float, workers: int) -> dict:
    deadline = time.time() + duration
    procs = [mp.Process(target=_spin, args=(deadline,), daemon=True) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(duration + 5)
        if p.is_alive():
            p.terminate()
    return {"kind": "cpu", "workers": workers}


def mem(duration: float, mib: int) -> dict:
    """Grow to ``mib`` MiB in ten steps over the first half of the duration (a leak), then hold."""
    mib = min(mib, MAX_MEM_MIB)
    chunks: list[bytearray] = []
    step = max(1, mib // 10)
    start = time.time()
    while sum(len(c) for c in chunks) < mib << 20 and time.time() - start < duration / 2:
        c = bytearray(step << 20)
        for i in range(0, len(c), 4096):  # touch every page so it is resident
            c[i] = 1
        chunks.append(c)
        time.sleep(duration / 20)
    held = sum(len(c) for c in chunks) >> 20
    time.sleep(max(0.0, start + duration - time.time()))
    chunks.clear()
    return {"kind": "mem", "mib": held}


def io(duration: float, file_mib: int, directory: str | None) -> dict:
    file_mib = min(file_mib, MAX_FILE_MIB)
    block = os.urandom(1 << 20)
    written = 0
    deadline = time.time() + duration
    with tempfile.NamedTemporaryFile(dir=directory, prefix="shoal-inject-") as f:
        while time.time() < deadline:
            f.seek(0)
            for _ in range(file_mib):
                f.write(block)
                written += len(block)
                if time.time() >= deadline:
                    break
            f.flush()
            os.fsync(f.fileno())
    return {"kind": "io", "written_mib": written >> 20}


def net(duration: float) -> dict:
    """Push TCP traffic through loopback as fast as it goes (the sink is ours)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    received = [0]
    deadline = time.time() + duration

    def sink() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(1 << 20):
                received[0] += len(data)

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    buf = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as c:
        while time.time() < deadline:
            c.sendall(buf)
    t.join(5)
    srv.close()
    return {"kind": "net", "sent_mib": received[0] >> 20}


def inject(kind: str, duration: float, *, workers: int = 0, mib: int = 512, directory: str | None = None) -> dict:
    if not 0 < duration <= 86400:
        raise ValueError("duration must be in (0, 86400] seconds")
    if kind == "cpu":
        return cpu(duration, workers or os.cpu_count() or 1)
    if kind == "mem":
        return mem(duration, mib)
    if kind == "io":
        return io(duration, min(mib, 256), directory)
    if kind == "net":
        return net(duration)
    raise ValueError(f"unknown fault kind {kind!r}")
