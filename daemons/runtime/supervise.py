"""Child processes of a trio daemon, supervised: Flower's, in Shoal today.

:func:`supervise` keeps a child running (restart with back-off), :func:`run_child`
runs one in its own process group and kills the whole group on the way out;
:func:`flower_env`/:func:`flower_exe` are how the fedserver (``flower-superlink``,
``flwr``) and the telemetry daemon (``flower-supernode``) start Flower's
programs: the same plumbing for two daemons, so it lives here and neither
imports the other.

Flower 1.41 has no supported in-process SuperLink or SuperNode, so the
fedserver and telemetry daemons run ``flower-superlink`` / ``flower-supernode``
as child processes, restarted after a delay if they exit. The delay doubles
(up to ``max_delay``) while the child keeps failing within ``STABLE``
seconds of its start, e.g. a SuperNode the SuperLink refuses: each start
costs a couple of CPU-seconds of imports, and a refused node should not
knock every few seconds. Each child gets its
own session (process group): the SuperLink spawns ``flower-superexec`` and
the SuperNode a ``flwr-clientapp`` per message, and those must not outlive
the daemon. Stopping sends SIGTERM to the whole group, waits up to
``grace`` seconds, then SIGKILLs whatever is left of the group.

If the daemon itself is SIGKILLed, its children live on until systemd's
``KillMode=control-group`` (the default) reaps the whole unit. (PR_SET_PDEATHSIG
does not help: trio starts children from a worker thread, and the signal
fires when that *thread* exits, killing a healthy child.)

Flower's own output goes to a log file in the state directory (it is verbose
and would drown the daemon's journal), truncated when it passes
``MAX_LOG_BYTES`` at a (re)start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

log = logging.getLogger("shoal.supervise")

MAX_LOG_BYTES = 20 << 20
STABLE = 60.0  # a child that ran this long was healthy: the restart delay resets

#: Every Flower process gets these: otherwise each tries to reach Flower's servers.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: ours, without Flower's phoning home, and
    PATH starting with this Python's bin directory, where Flower finds the helpers
    it spawns (flower-superexec, flwr-serverapp, flwr-clientapp)."""
    import sys

    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return {**os.environ, **FLOWER_ENV, "PATH": f"{bindir}:{path}", **(extra or {})}


def flower_exe(name: str) -> str:
    """The Flower console script next to this Python (the venv's), else on PATH."""
    import shutil
    import sys

    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (pip install flwr==1.41.0)")
    return found


def free_port(host: str) -> int:
    """A port the kernel just handed out on ``host`` (for children that cannot take port 0).

    The port is released before the child binds it; on a loopback test
    machine the window for another process to take it is tiny, and the child
    fails loudly (and is restarted) if it happens.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_listening(addr, timeout: float, proc_alive: Callable[[], bool] = lambda: True) -> None:
    """Poll until something accepts TCP connections on ``addr`` (a child's port)."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream(addr.host, addr.port)
            except OSError:
                await trio.sleep(0.2)
                continue
            await stream.aclose()
            return


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _open_log(log_path: Path) -> BinaryIO:
    """The child's log file for appending, emptied first if it passed ``MAX_LOG_BYTES``."""
    if log_path.exists() and log_path.stat().st_size > MAX_LOG_BYTES:
        log_path.unlink()
    return open(log_path, "ab")  # noqa: SIM115 -- the caller's `with` closes it


async def run_child(argv: Sequence[str], *, env: dict[str, str], log_path: Path, grace: float = 5.0,
                    task_status=trio.TASK_STATUS_IGNORED) -> int:
    """Run one child in its own session until it exits (-> its code) or we are cancelled."""
    with _open_log(log_path) as out:
        proc = await trio.lowlevel.open_process(
            list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        task_status.started(proc)
        return await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                _kill_group(proc.pid, signal.SIGTERM)
                with trio.move_on_after(grace):
                    await proc.wait()
            _kill_group(proc.pid, signal.SIGKILL)  # superexec / clientapp leftovers
            if proc.returncode is None:
                await proc.wait()


def next_delay(previous: float | None, ran: float, *, base: float, max_delay: float) -> float:
    """The delay before restarting a child that ran ``ran`` seconds: ``base`` after its
    first exit or a healthy run, else the previous delay doubled, up to ``max_delay``."""
    if previous is None or ran >= STABLE:
        return base
    return min(max_delay, previous * 2)


async def supervise(name: str, make_argv: Callable[[], Sequence[str]], *, env: dict[str, str], log_path: Path,
                    restart_delay: float = 5.0, max_delay: float = 60.0, on_restart: Callable[[], None] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep a child running: restart it after it exits, ``restart_delay`` s later at
    first, backing off to ``max_delay`` while it keeps failing. Runs until cancelled."""
    first = True
    delay: float | None = None
    while True:
        argv = make_argv()
        started = trio.current_time()
        if first:
            code = await run_child(argv, env=env, log_path=log_path, task_status=task_status)
            first = False
        else:
            if on_restart:
                on_restart()
            code = await run_child(argv, env=env, log_path=log_path)
        delay = next_delay(delay, trio.current_time() - started, base=restart_delay, max_delay=max_delay)
        log.warning("%s exited with code %s; restarting in %.0f s (its log: %s)", name, code, delay, log_path)
        await trio.sleep(delay)
