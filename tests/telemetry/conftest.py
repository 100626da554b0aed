"""Start real telemetry daemons over a fake /proc and /sys tree."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from shoal.daemons.runtime.rpc import connect_unix
from tests.harness import start_daemon

LAB = """
[daemon]
log_level = "debug"
metrics_listen = "127.0.0.1:0"
stop_timeout = 10.0

[collector]
root = "{root}"
interval = {interval}
window = {window}
min_samples = 2
gpu = false

[training]
min_windows = 5
epochs = 100
batch_size = 4
lr = 0.001

[control]
socket = "{socket}"

{extra}
"""


def write_config(path: Path, root: Path, socket: Path, *, interval: float = 0.05, window: float = 0.5,
                 extra: str = "") -> Path:
    path.write_text(LAB.format(root=root, socket=socket, interval=interval, window=window, extra=extra))
    return path


def telemetry_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "shoal.cli.main", "telemetry", "run", "--config", str(config)]


async def start_telemetry(config: Path, state_dir: Path | None = None):
    return await start_daemon(telemetry_argv(config), state_dir=state_dir)


async def rpc(socket: Path, method: str, params=None, timeout: float = 60.0):
    async with await connect_unix(str(socket)) as client:
        return await client.call(method, params, timeout=timeout)


async def wait_status(socket: Path, predicate, timeout: float = 30.0, windows: int = 50) -> dict:
    """Poll the daemon's status until ``predicate(status)`` holds (bounded by ``timeout``)."""
    with trio.fail_after(timeout):
        while True:
            st = await rpc(socket, "status", {"windows": windows})
            if predicate(st):
                return st
            await trio.sleep(0.1)


async def keep_ticking(node, period: float = 0.02) -> None:
    """Run the fake node until cancelled: CPU load follows a slow wave, and the
    temperature and memory in use follow the load, as on a real node. Counters
    other than CPU time stay put (their rates are constant, so the model
    ignores them). ``node.fault`` breaks the pattern: the load drops while the
    node overheats (a failed fan)."""
    import math

    t0 = trio.current_time()
    while True:
        t = trio.current_time() - t0
        busy = 0.3 + 0.15 * math.sin(2 * math.pi * t / 4.0)
        temp = 40000 + 20000 * busy
        if getattr(node, "fault", False):
            busy, temp = 0.02, 95000
        node.temp_mc = int(temp)
        node.mem_available_kb = int(7_000_000 - 4_000_000 * busy)
        for j in node.jiffies:
            j[0] += 100 * period * busy
            j[3] += 100 * period * (1 - busy)
        node.write()
        await trio.sleep(period)
