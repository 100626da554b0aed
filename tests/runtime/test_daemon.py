"""The daemon runtime: in-process through serve(), and as a real subprocess."""

from __future__ import annotations

import logging
import signal
import socket
import stat
import sys
import textwrap
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from shoal.daemons.runtime import systemd
from shoal.daemons.runtime.config import ConfigError, DaemonSection, ListenAddr, load_config
from shoal.daemons.runtime.daemon import (
    EXIT_CANNOT_LISTEN,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STOP_TIMEOUT,
    _make_state_dir,
    resolve_state_dir,
    serve,
)
from shoal.daemons.runtime.http import HttpResponse, serve_http
from tests.harness import DaemonFailed, parse_notification, parse_status, sample, start_daemon

LOOPBACK = ListenAddr("127.0.0.1", 0)


@dataclass(frozen=True, slots=True)
class Cfg:
    daemon: DaemonSection = DaemonSection()
    greeting: str = "hi"


class TinyApp:
    def __init__(self, ctx, *, hang: float = 0.0):
        self.ctx = ctx
        self.greeting = ctx.config.greeting
        self.reloaded = []
        self.hang = hang

    async def handle(self, request):
        return HttpResponse(200, [], self.greeting.encode())

    async def run(self, ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(partial(serve_http, self.handle, LOOPBACK))
                ctx.announce(http=addr)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.hang)  # a slow, shielded save
            (ctx.state_dir / "saved").write_text(self.greeting)

    def reload(self, new_config):
        self.reloaded.append(new_config)
        self.greeting = new_config.greeting


async def http_get(addr: ListenAddr, path: str = "/") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Notifications:
    def __init__(self, sock):
        self.sock = sock

    async def next(self) -> dict[str, str]:
        return parse_notification(await self.sock.recv(65536))

    async def until(self, key: str) -> dict[str, str]:
        while True:
            fields = await self.next()
            if key in fields:
                return fields


@pytest.fixture
async def notify(tmp_path):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    with sock:
        yield Notifications(sock), {"NOTIFY_SOCKET": str(tmp_path / "notify")}


def write_config(path: Path, greeting: str, extra: str = "") -> Path:
    path.write_text(f'greeting = "{greeting}"\n{extra}\n[daemon]\nmetrics_listen = "127.0.0.1:0"\nstop_timeout = 5\n')
    return path


def test_state_dir_resolution():
    assert resolve_state_dir("x", "/srv/x", {"STATE_DIRECTORY": "/var/lib/x"}) == Path("/srv/x")
    assert resolve_state_dir("x", "", {"STATE_DIRECTORY": "/var/lib/x:/var/lib/y"}) == Path("/var/lib/x")
    assert resolve_state_dir("x", "", {}) == Path("state/x")


def test_state_dir_mode_is_systemds_when_systemd_made_it(tmp_path):
    # StateDirectoryMode=0711 (the worker's) must survive the daemon's start;
    # a directory the daemon makes itself is 0700.
    given = tmp_path / "given"
    given.mkdir(mode=0o711)
    given.chmod(0o711)
    assert _make_state_dir(given, {"STATE_DIRECTORY": f"{given}:/var/lib/other"}) == given
    assert given.stat().st_mode & 0o777 == 0o711
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    _make_state_dir(own, {"STATE_DIRECTORY": str(given)})
    assert own.stat().st_mode & 0o777 == 0o700


async def test_serve_ready_status_reload_and_stop(tmp_path, notify):
    notes, env = notify
    config_path = write_config(tmp_path / "d.toml", "hi")
    config = Cfg(DaemonSection(metrics_listen=LOOPBACK, state_directory=str(tmp_path / "st")), "hi")
    apps = []

    def make_app(ctx):
        apps.append(TinyApp(ctx))
        return apps[0]

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            result = []

            async def run(task_status=trio.TASK_STATUS_IGNORED):
                result.append(
                    await serve("tiny", config, config_path, make_app, load=partial(load_config, schema=Cfg),
                                handle_signals=False, env=env, task_status=task_status)
                )
                done.set()

            ctx = await nursery.start(run)
            ready = await notes.until("READY")
            addrs = parse_status(ready["STATUS"])
            assert ready["STATUS"].startswith("listening ")
            assert set(addrs) == {"metrics", "http"} and addrs == ctx.addresses
            assert all(a.port != 0 for a in addrs.values())
            assert stat.S_IMODE((tmp_path / "st").stat().st_mode) == 0o700
            assert await http_get(addrs["http"]) == (200, b"hi")
            status, body = await http_get(addrs["metrics"], "/metrics")
            assert status == 200 and sample(body, "shoal_tiny_config_reloads_total", result="ok") == 0

            # a good reload
            write_config(config_path, "hello")
            assert await ctx.reload_config()
            assert (await notes.next())["RELOADING"] == "1"
            assert (await notes.next())["READY"] == "1"
            assert await http_get(addrs["http"]) == (200, b"hello")
            assert ctx.config.greeting == "hello" and len(apps[0].reloaded) == 1
            # a bad one keeps the old config
            config_path.write_text('greeting = 5\n')
            assert not await ctx.reload_config()
            assert (await notes.next())["RELOADING"] == "1"
            assert (await notes.next())["READY"] == "1"
            assert ctx.config.greeting == "hello" and len(apps[0].reloaded) == 1
            assert ctx.registry.get_sample_value("shoal_tiny_config_reloads_total", {"result": "error"}) == 1
            assert ctx.registry.get_sample_value("shoal_tiny_config_reloads_total", {"result": "ok"}) == 1

            # a late announcement updates STATUS
            ctx.announce(udp=ListenAddr("127.0.0.1", 5533))
            assert (await notes.next())["STATUS"].endswith(" udp=127.0.0.1:5533")

            ctx.request_stop()
            stopping = await notes.until("STOPPING")
            assert stopping["STATUS"].startswith("stopping ")
            await done.wait()
    assert result == [EXIT_OK]
    assert (tmp_path / "st" / "saved").read_text() == "hello"


async def test_a_stop_that_overruns_stop_timeout_is_logged_and_fails(tmp_path, autojump_clock, caplog):
    config = Cfg(DaemonSection(metrics_listen=None, stop_timeout=2.0, state_directory=str(tmp_path / "st")))
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            result = []

            async def run(task_status=trio.TASK_STATUS_IGNORED):
                result.append(await serve("slow", config, None, partial(TinyApp, hang=5.0), handle_signals=False,
                                          env={}, task_status=task_status))

            ctx = await nursery.start(run)
            start = trio.current_time()
            ctx.request_stop()
    assert result == [EXIT_FAILURE]
    assert trio.current_time() - start == pytest.approx(5.0)
    assert any("overran stop_timeout" in r.message for r in caplog.records if r.levelno == logging.ERROR)
    assert (tmp_path / "st" / "saved").exists()


async def test_reload_without_a_config_file_is_refused(tmp_path):
    config = Cfg(DaemonSection(metrics_listen=None, state_directory=str(tmp_path / "st")))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(partial(serve, "noreload", config, None, TinyApp, handle_signals=False, env={}))
            assert not await ctx.reload_config()
            assert ctx.registry.get_sample_value("shoal_noreload_config_reloads_total", {"result": "error"}) == 1
            ctx.request_stop()


# -- a real daemon process, through tests/harness.py ------------------------------

DAEMON_SCRIPT = """
import os, sys, time
from dataclasses import dataclass
from functools import partial

import trio

from shoal.daemons.runtime.config import DaemonSection, ListenAddr
from shoal.daemons.runtime.daemon import run_daemon
from shoal.daemons.runtime.http import HttpResponse, serve_http


@dataclass(frozen=True, slots=True)
class Cfg:
    daemon: DaemonSection = DaemonSection()
    greeting: str = "hi"
    hang_on_stop: bool = False


class App:
    def __init__(self, ctx):
        self.greeting = ctx.config.greeting

    async def handle(self, request):
        return HttpResponse(200, [], self.greeting.encode())

    async def run(self, ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        path = ctx.state_dir / "stops"
        stops = int(path.read_text()) if path.exists() else 0
        try:
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(partial(serve_http, self.handle, ListenAddr("127.0.0.1", 0)))
                ctx.announce(http=addr)
                task_status.started()
        finally:
            if ctx.config.hang_on_stop:
                time.sleep(60)  # stuck without yielding to trio: only the hard deadline helps
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(stops + 1))
            os.replace(tmp, path)

    def reload(self, new_config):
        self.greeting = new_config.greeting


sys.exit(run_daemon("testd", sys.argv[1], Cfg, App))
"""


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "testd.py"
    path.write_text(textwrap.dedent(DAEMON_SCRIPT))
    return path


async def test_subprocess_daemon_reloads_on_sighup_and_stops_on_sigterm(tmp_path, script):
    config = write_config(tmp_path / "d.toml", "hi")
    with trio.fail_after(30):
        async with await start_daemon([sys.executable, str(script), str(config)], timeout=20) as d:
            assert set(d.addresses) == {"metrics", "http"}
            assert await http_get(d.addresses["http"]) == (200, b"hi")

            write_config(config, "hello")
            await d.reload()
            assert await http_get(d.addresses["http"]) == (200, b"hello")

            config.write_text("greeting = [\n")  # broken TOML
            await d.reload()
            assert await http_get(d.addresses["http"]) == (200, b"hello")
            _, metrics = await http_get(d.addresses["metrics"], "/metrics")
            assert sample(metrics, "shoal_testd_config_reloads_total", result="error") == 1
            assert sample(metrics, "shoal_testd_config_reloads_total", result="ok") == 1

            d.send_signal(signal.SIGTERM)
            await d.wait_for("STOPPING", "1")
            assert await d.wait() == EXIT_OK
            assert (d.state_dir / "stops").read_text() == "1"
            assert "d.toml: -: invalid TOML" in d.log


async def test_subprocess_sigkill_and_a_stop_stuck_past_the_hard_deadline(tmp_path, script):
    config = write_config(tmp_path / "d.toml", "hi", "hang_on_stop = true")
    config.write_text(config.read_text().replace("stop_timeout = 5", "stop_timeout = 0.2"))
    with trio.fail_after(30):
        async with await start_daemon([sys.executable, str(script), str(config)], timeout=20) as d:
            assert await d.kill() == -signal.SIGKILL
        async with await start_daemon([sys.executable, str(script), str(config)], timeout=20) as d:
            assert await d.terminate() == EXIT_STOP_TIMEOUT
            assert "did not finish within 1.2s" in d.log
            assert not (d.state_dir / "stops").exists()


async def test_subprocess_port_in_use_is_one_line_and_a_no_restart_status(tmp_path, script):
    # Before: a 35-line ExceptionGroup traceback and exit 1, which Restart=on-failure loops on.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path / "d.toml", "hi")
        config.write_text(config.read_text().replace('metrics_listen = "127.0.0.1:0"',
                                                     f'metrics_listen = "127.0.0.1:{port}"'))
        with trio.fail_after(30):
            result = await trio.run_process([sys.executable, str(script), str(config)], capture_stdout=True,
                                            capture_stderr=True, check=False)
    assert result.returncode == EXIT_CANNOT_LISTEN
    errors = [line for line in result.stderr.decode().splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1, result.stderr.decode()
    assert "cannot start" in errors[0] and "address already in use" in errors[0].lower()
    assert "Traceback" not in result.stderr.decode()
    unit = systemd.render_units("/usr/local/bin/shoal")["shoal-tracker.service"]
    assert f"RestartPreventExitStatus={EXIT_CONFIG} {EXIT_CANNOT_LISTEN}" in unit


async def test_subprocess_bad_config_is_one_line_and_exit_code_2(tmp_path, script):
    config = tmp_path / "d.toml"
    config.write_text("[daemon]\nstop_timeout = -1\n")
    with trio.fail_after(30):
        result = await trio.run_process([sys.executable, str(script), str(config)], capture_stdout=True,
                                        capture_stderr=True, check=False)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.decode().splitlines() == [f"{config}: daemon.stop_timeout: must be at least 0.1, got -1.0"]
    with trio.fail_after(30):
        with pytest.raises(DaemonFailed, match="exited with 2"):
            await start_daemon([sys.executable, str(script), str(config)], timeout=20)


async def test_a_bad_file_named_by_the_config_is_a_config_error_at_start(tmp_path, notify):
    # A token file is read when the app is built; a short one used to escape
    # serve() as an ExceptionGroup traceback. Now: one line, EXIT_CONFIG.
    _, env = notify
    config = Cfg(DaemonSection(metrics_listen=LOOPBACK, state_directory=str(tmp_path / "st")), "hi")

    def make_app(ctx):
        raise ConfigError(str(tmp_path / "tok"), "x.token_file", "the token must be at least 16 bytes, got 5")

    with trio.fail_after(10):
        code = await serve("tiny", config, None, make_app, handle_signals=False, env=env)
    assert code == EXIT_CONFIG
