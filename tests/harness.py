"""Run a real daemon as a subprocess and talk to it the way systemd does.

``start_daemon(argv)`` binds a datagram socket, passes it as NOTIFY_SOCKET,
starts the process and returns once the daemon has sent ``READY=1``, with the
``STATUS=listening key=host:port ...`` pairs parsed into ``addresses``. Later
notifications (READY after a reload, STOPPING) are awaited with
``wait_for``. Nothing here sleeps: every wait is on a datagram or on process
exit, under ``trio.fail_after``.

    async with await start_daemon([sys.executable, script, config]) as d:
        port = d.addresses["http"].port
        ...
        assert await d.terminate() == 0
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from shoal.daemons.runtime.config import ListenAddr

__all__ = ["DaemonFailed", "RunningDaemon", "parse_notification", "parse_status", "start_daemon"]


class DaemonFailed(AssertionError):
    """The daemon exited or stayed silent when it should have notified."""


def parse_notification(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def parse_status(status: str) -> dict[str, ListenAddr]:
    """``listening metrics=127.0.0.1:1 http=[::1]:2`` -> {"metrics": ..., "http": ...}."""
    out: dict[str, ListenAddr] = {}
    for word in status.split():
        key, sep, value = word.partition("=")
        if sep:
            out[key] = ListenAddr.parse(value)
    return out


@dataclass
class RunningDaemon:
    process: trio.Process
    state_dir: Path
    log_path: Path
    addresses: dict[str, ListenAddr]
    ready: dict[str, str]
    _sock: trio.socket.SocketType = field(repr=False)
    _std: socket.socket = field(repr=False)
    _tmp: Path = field(repr=False)
    history: list[dict[str, str]] = field(default_factory=list)

    async def __aenter__(self) -> RunningDaemon:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def log(self) -> str:
        """Everything the daemon wrote to stderr and stdout so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def next_notification(self, timeout: float = 30.0) -> dict[str, str]:
        """The next datagram from the daemon, parsed; DaemonFailed if it exits first."""
        result: dict[str, str] | None = None
        exited = False
        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    nonlocal result
                    result = parse_notification(await self._sock.recv(65536))
                    nursery.cancel_scope.cancel()

                async def watch_exit() -> None:
                    nonlocal exited
                    await self.process.wait()
                    exited = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(receive)
                nursery.start_soon(watch_exit)
        if result is None:
            # The process exited; a datagram it sent just before is still queued.
            try:
                result = parse_notification(self._std.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                raise DaemonFailed(
                    f"daemon exited with {self.process.returncode} before notifying; log:\n{self.log[-4000:]}"
                ) from None
        self.history.append(result)
        return result

    async def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        """Skip notifications until one has ``key`` (with ``value`` if given)."""
        with trio.fail_after(timeout):
            while True:
                fields = await self.next_notification(timeout)
                if key in fields and (value is None or fields[key] == value):
                    return fields

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def reload(self, timeout: float = 30.0) -> dict[str, str]:
        """SIGHUP, then wait for READY=1 (sent after a good *or* a bad reload)."""
        self.send_signal(signal.SIGHUP)
        await self.wait_for("RELOADING", "1", timeout)
        return await self.wait_for("READY", "1", timeout)

    async def wait(self, timeout: float = 30.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code."""
        if self.process.returncode is None:
            self.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self, timeout: float = 30.0) -> int:
        """SIGKILL (no chance to save anything) and wait."""
        if self.process.returncode is None:
            self.send_signal(signal.SIGKILL)
        return await self.wait(timeout)

    async def aclose(self) -> None:
        """Stop if still running (SIGTERM, so it stops its own children: the fedserver's
        SuperLink outlived a SIGKILLed fedserver, see daemons/runtime/supervise.py; SIGKILL
        after 10 s), then remove the socket directory."""
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.terminate()
                with trio.move_on_after(10):
                    await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        self._sock.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


async def start_daemon(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    state_dir: Path | None = None,
    cwd: Path | None = None,
) -> RunningDaemon:
    """Start ``argv`` with a NOTIFY_SOCKET and wait for READY=1."""
    # A short path under /tmp: AF_UNIX paths are limited to 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="shoal-"))
    std = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    std.setblocking(False)
    sock = trio.socket.from_stdlib_socket(std)
    notify_path = tmp / "notify"
    process: trio.Process | None = None
    try:
        await sock.bind(str(notify_path))
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["NOTIFY_SOCKET"] = str(notify_path)
        full_env.pop("WATCHDOG_USEC", None)
        full_env.pop("WATCHDOG_PID", None)
        full_env.pop("JOURNAL_STREAM", None)
        if state_dir is None:
            state_dir = Path(full_env.get("STATE_DIRECTORY") or tmp / "state")
        full_env["STATE_DIRECTORY"] = str(state_dir)
        log_path = tmp / "daemon.log"
        with log_path.open("wb") as log_file:  # a local file, opened once per daemon start
            process = await trio.lowlevel.open_process(
                list(argv), env=full_env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd
            )
        daemon = RunningDaemon(process, state_dir, log_path, {}, {}, sock, std, tmp)
        try:
            daemon.ready = await daemon.wait_for("READY", "1", timeout)
        except trio.TooSlowError:
            raise DaemonFailed(f"no READY=1 within {timeout}s; log:\n{daemon.log[-4000:]}") from None
        daemon.addresses = parse_status(daemon.ready.get("STATUS", ""))
        return daemon
    except BaseException:
        with trio.CancelScope(shield=True):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


async def scrape(addr: ListenAddr) -> str:
    """The body of a daemon's /metrics page, fetched as Prometheus does."""
    from shoal.daemons.peer.announce import http_get

    status, body = await http_get(addr.host, addr.port, b"/metrics")
    assert status == 200, status
    return body.decode()


def sample(text: str | bytes, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` on a /metrics page, or None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None
