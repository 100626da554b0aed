"""Shared by the benchmarks: start a shoal daemon the way systemd would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def start_daemon(name: str, config: Path, notify_dir: Path, *, cpu: int | None = None,
                 timeout: float = 30.0) -> tuple[subprocess.Popen, dict[str, tuple[str, int]]]:
    """Run ``shoal NAME run --config CONFIG``; wait for READY=1 on a NOTIFY_SOCKET.

    Returns the process and the addresses from its STATUS line (``http``,
    ``udp``, ``metrics``...), which is how a benchmark learns ports it asked
    the kernel to choose. ``cpu`` pins the daemon to one core.
    """
    notify = notify_dir / f"{name}.notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(timeout)
    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", name, "run", "--config", str(config)],
                            env=env, preexec_fn=pin)
    fields: dict[str, str] = {}
    try:
        while fields.get("READY") != "1":
            msg = sock.recv(4096).decode()
            fields.update(line.split("=", 1) for line in msg.splitlines() if "=" in line)
    finally:
        sock.close()
    addresses = {}
    for item in fields.get("STATUS", "").split()[1:]:
        key, _, value = item.partition("=")
        host, _, port = value.rpartition(":")
        addresses[key] = (host.strip("[]"), int(port))
    return proc, addresses
