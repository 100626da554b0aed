"""One lab run: the emulated LAN up, every host's daemons started and kept running, then removed.

Theory of operation
-------------------
``async with Lab(scenario) as lab:`` brings a run up:

1. a run id and a work directory (``/tmp/shoal-lab-ID``); a record in
   ``/run/shoal-lab/ID.json`` that names them, which ``shoal lab status``,
   ``exec`` and ``down`` read;
2. a *reaper* process (:mod:`shoal.lab.reaper`) that holds a pipe from this
   one: if this process dies, even by ``kill -9``, the pipe closes and the
   reaper removes the run;
3. the bundle: :func:`shoal.lab.render.render` writes every host's configs,
   tokens, certificates and units, exactly as ``shoal lab render`` does for a
   real LAN, with paths under the work directory;
4. the network (:class:`shoal.lab.net.Network`);
5. every daemon, as ``shoal DAEMON run --config FILE`` inside its host's
   namespace, with ``$STATE_DIRECTORY`` and ``$NOTIFY_SOCKET`` set as systemd
   sets them. The lab is each daemon's service manager: it waits for
   ``READY=1``, keeps the last ``STATUS=``, and restarts a daemon that dies
   (after ``restart_delay``, like ``Restart=on-failure``) unless its host was
   taken down;
6. Prometheus on the monitor host, if the scenario names one.

Leaving the block (normally, by an exception, or by Ctrl-C) removes it all:
every process in the run's namespaces is killed, the namespaces are deleted
(and with them every veth and qdisc), and the work directory is removed. The
results directory is kept.

Experiments get the :class:`Lab`: :meth:`exec` and :meth:`spawn` run commands
inside a host, :meth:`connect` opens a TCP connection from inside a host,
:meth:`apply` applies a fault, :meth:`progress` prints a live line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from shoal.lab import net as labnet
from shoal.lab.cgroups import HostCgroups, remove_cgroups
from shoal.lab.errors import LabError
from shoal.lab.scenario import Fault, Scenario

__all__ = ["Lab", "LabError", "RUNS_DIR", "records", "teardown", "shoal_argv"]

RUNS_DIR = Path("/run/shoal-lab")
START_LIMIT_BURST, START_LIMIT_INTERVAL = 5, 10.0
#: Daemons that others connect to at start: they start (and are ready) first.
FIRST = frozenset({"tracker", "fedserver", "dispatcher", "checkpoint"})


def shoal_argv() -> list[str]:
    """How to run this very shoal: the venv's console script, else ``python -m shoal.cli.main``."""
    exe = Path(sys.executable).with_name("shoal")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "shoal.cli.main"]


def records() -> dict[str, dict]:
    """Every run on record: ``run id -> record``."""
    out = {}
    if RUNS_DIR.is_dir():
        for p in sorted(RUNS_DIR.glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, ValueError):
                out[p.stem] = {"run_id": p.stem, "workdir": ""}
    return out


def teardown(run_id: str) -> list[str]:
    """Remove what run ``run_id`` made: its processes, namespaces and work directory."""
    removed = labnet.remove(run_id)
    rec = RUNS_DIR / f"{run_id}.json"
    try:
        record = json.loads(rec.read_text())
    except (OSError, ValueError):
        record = {}
    workdir = record.get("workdir", "")
    removed += remove_cgroups([t for t in record.get("cgroups", []) if Path(t).name == f"shoal-lab-{run_id}"])
    if workdir and Path(workdir).name.startswith(f"shoal-lab-{run_id}"):
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(workdir)
    rec.unlink(missing_ok=True)
    return removed


@dataclass
class DaemonProc:
    host: str
    daemon: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    notify: Path
    process: trio.Process | None = None
    ready: trio.Event = field(default_factory=trio.Event)
    status: str = ""
    starts: int = 0
    exits: list[tuple[float, int | None]] = field(default_factory=list)  # (lab time, returncode)
    launched: list[float] = field(default_factory=list)  # wall-clock time of each start

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.returncode is None else None


class Lab:
    def __init__(self, scenario: Scenario, *, out: Path | None = None, echo: TextIO | None = sys.stdout) -> None:
        self.scenario = scenario
        self.run_id = secrets.token_hex(3)
        self.out = out
        self.echo = echo
        self.workdir = Path(f"/tmp/shoal-lab-{self.run_id}")
        self.t0 = time.monotonic()
        self.exp_t0: float | None = None
        self.daemons: dict[tuple[str, str], DaemonProc] = {}
        self.down_hosts: set[str] = set()
        self.applied: list[dict] = []  # the fault log: what was applied (or restored) when
        self._applied_changed = trio.Event()
        self.shoal = shoal_argv()
        self._nursery: trio.Nursery | None = None
        self._reaper: subprocess.Popen | None = None
        self._stopping = False
        self.net = labnet.Network(self.run_id, scenario, self.workdir)
        self.cgroups = HostCgroups(self.run_id, [h.name for h in scenario.hosts])
        self.bundle: Any = None
        self.prometheus: Any = None

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab makes network namespaces and qdiscs: run it as root")
        conflicts = labnet.subnet_conflicts(self.scenario.subnet)
        if conflicts:
            raise LabError(f"{self.scenario.source}: lab.subnet: {self.scenario.subnet} overlaps this machine's "
                           f"routes ({', '.join(conflicts)}); choose another")
        self.workdir.mkdir(mode=0o711)  # task users pass through to their task directories
        self.workdir.chmod(0o711)
        RUNS_DIR.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- a tmpfs directory, at start
        self._write_record()
        self._start_reaper()
        self.cgroups.create()
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        try:
            await self._up()
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        self._stopping = True
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._teardown)
        finally:
            return bool(await self._cm.__aexit__(*exc))  # noqa: B012 - the nursery must close whatever happened

    def _teardown(self) -> None:
        teardown(self.run_id)
        if self._reaper is not None:
            assert self._reaper.stdin is not None
            self._reaper.stdin.close()  # the reaper sees the run is gone and exits
            self._reaper.wait(timeout=30)

    def _write_record(self) -> None:
        rec = {
            "run_id": self.run_id, "pid": os.getpid(), "scenario": self.scenario.source,
            "workdir": str(self.workdir), "started": time.time(),
            "hosts": {h.name: {"address": self.scenario.address(h), "daemons": list(h.daemons),
                               "netns": f"shoal-{self.run_id}.{h.name}"} for h in self.scenario.hosts},
            "pids": {f"{h}/{d}": p.pid for (h, d), p in self.daemons.items()},
            "down": sorted(self.down_hosts),
            "cgroups": [str(t) for t in self.cgroups.tops],
            "links": {name: {**dataclasses.asdict(h.link), "port": h.port}
                      for name, h in self.net.hosts.items()},
        }
        tmp = RUNS_DIR / f".{self.run_id}.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.rename(RUNS_DIR / f"{self.run_id}.json")

    def _start_reaper(self) -> None:
        self._reaper = subprocess.Popen([sys.executable, "-m", "shoal.lab.reaper", self.run_id],
                                        stdin=subprocess.PIPE, start_new_session=True)

    async def _up(self) -> None:
        from shoal.lab.render import render

        t = time.monotonic()
        bundle_dir = self.workdir / "bundle"
        self.bundle = render(self.scenario, bundle_dir, config_root=str(bundle_dir) + "/hosts/{host}/etc/shoal",
                             exe=self.shoal[0], emulated=True)
        await trio.to_thread.run_sync(self.net.up)
        self.progress(f"network up: {len(self.scenario.hosts)} hosts on {self.scenario.subnet} "
                      f"in {time.monotonic() - t:.1f}s")
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_delaylines)
        (self.workdir / "logs").mkdir()
        (self.workdir / "notify").mkdir()
        for host, plans in self.bundle.plans.items():
            for plan in plans:
                self.daemons[(host, plan.daemon)] = self._daemon_proc(host, plan)
        # Start in the bundle's order, host by host; each daemon's dependencies
        # (fedserver before telemetry, dispatcher before workers) come first.
        for level in (FIRST, None):
            procs = [p for p in self.daemons.values() if (p.daemon in FIRST) == (level is FIRST)]
            for p in procs:
                self._nursery.start_soon(self._supervise, p)
            with trio.move_on_after(self.scenario.ready_timeout) as scope:
                for p in procs:
                    await p.ready.wait()
            if scope.cancelled_caught:
                late = [f"{p.host}/{p.daemon}" for p in procs if not p.ready.is_set()]
                raise LabError(f"not ready after {self.scenario.ready_timeout:.0f}s: {', '.join(late)} "
                               f"(logs in {self.workdir / 'logs'}): {self._last_log_line(late[0])}")
        self._write_record()
        if self.scenario.monitor.host:
            from shoal.lab.monitor import Prometheus

            self.prometheus = Prometheus(self)
            await self.prometheus.start()
        self.progress(f"lab up: {len(self.daemons)} daemons ready in {time.monotonic() - self.t0:.1f}s "
                      f"(run {self.run_id})")

    def _last_log_line(self, key: str) -> str:
        host, daemon = key.split("/")
        try:
            lines = self.daemons[(host, daemon)].log.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "(no output)"
        except OSError:
            return "(no log)"

    def _daemon_proc(self, host: str, plan: Any) -> DaemonProc:
        state = self.workdir / "state" / host / plan.daemon
        # as systemd makes a StateDirectory: the unit's mode (the worker's task
        # user must enter its own; 0700 otherwise), its parents passable
        (self.workdir / "state" / host).mkdir(parents=True, exist_ok=True, mode=0o711)
        state.mkdir(mode=_state_mode(plan.daemon))
        state.chmod(_state_mode(plan.daemon))
        env = dict(os.environ)
        env.update({
            "STATE_DIRECTORY": str(state),
            "NOTIFY_SOCKET": str(self.workdir / "notify" / f"{host}.{plan.daemon}"),
            "SHOAL_LAB_HOST": host,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        })
        env.pop("INVOCATION_ID", None)
        return DaemonProc(host, plan.daemon, [*self.shoal, plan.daemon, "run", "--config", str(plan.config)], env,
                          self.workdir / "logs" / f"{host}.{plan.daemon}.log", Path(env["NOTIFY_SOCKET"]))

    async def _supervise(self, p: DaemonProc) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(str(p.notify))
        assert self._nursery is not None
        self._nursery.start_soon(self._notifications, p, sock)
        recent: list[float] = []
        while not self._stopping and p.host not in self.down_hosts:
            with open(p.log, "ab") as log:  # noqa: ASYNC230 -- a local log file; opening does not block
                p.process = await trio.lowlevel.open_process(
                    p.argv, env=p.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    preexec_fn=self._enter(p.host), start_new_session=True)
            p.starts += 1
            p.launched.append(time.time())
            started = time.monotonic()
            self._write_record()
            code = await p.process.wait()
            p.exits.append((self.now(), code))
            if self._stopping or p.host in self.down_hosts:
                return
            # systemd's default start limit: 5 starts in 10 s, then the unit fails
            recent.append(started)
            if len(recent) >= START_LIMIT_BURST and started - recent[-START_LIMIT_BURST] < START_LIMIT_INTERVAL:
                last = self._last_log_line(f"{p.host}/{p.daemon}")
                raise LabError(f"{p.host}/{p.daemon} failed {START_LIMIT_BURST} times in "
                               f"{START_LIMIT_INTERVAL:g}s ({_describe(code)}): {last}")
            self.progress(f"{p.host}/{p.daemon} exited ({_describe(code)}); restarting in "
                          f"{self.scenario.restart_delay:g}s")
            await trio.sleep(self.scenario.restart_delay)

    async def _notifications(self, p: DaemonProc, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                data = await sock.recv(4096)
                for line in data.decode(errors="replace").splitlines():
                    key, _, value = line.partition("=")
                    if key == "READY" and value == "1":
                        p.ready.set()
                    elif key == "STATUS":
                        p.status = value

    async def _watch_delaylines(self) -> None:
        while True:
            await trio.sleep(0.5)
            # a host taken down loses its delay line with everything else it ran
            dead = [h for h in self.net.failed_delaylines() if h not in self.down_hosts]
            if dead:
                log = (self.workdir / f"delayline-{dead[0]}.log").read_text(errors="replace").strip().splitlines()
                raise LabError(f"the delay line of {', '.join(dead)} died (exit "
                               f"{self.net.delaylines[dead[0]].returncode}): its link no longer behaves as "
                               f"configured: {log[-1] if log else '(no output)'}")

    def _enter(self, host: str) -> Callable[[], None]:
        """The ``preexec_fn`` of every process the lab starts on ``host``: its namespace and cgroups."""
        netns = labnet.enter_netns(self.net.hosts[host].netns)

        def enter() -> None:
            netns()
            self.cgroups.enter(host)

        return enter

    # -- time and output -------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since the experiment started (or since the lab started, before it)."""
        return time.monotonic() - (self.exp_t0 if self.exp_t0 is not None else self.t0)

    def progress(self, text: str) -> None:
        if self.echo is not None:
            print(f"[{self.now():6.1f}s] {text}", file=self.echo, flush=True)

    def address(self, host: str) -> str:
        return self.scenario.address(host)

    # -- running things inside hosts -------------------------------------------------------
    def host_env(self, host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"SHOAL_LAB_HOST": host, "SHOAL_LAB_RUN": self.run_id,
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
        env.update(extra or {})
        return env

    async def exec(self, host: str, argv: list[str], *, timeout: float = 60.0, check: bool = True,
                   env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run a command inside ``host`` to its end; its output captured. ``check`` raises LabError on failure."""
        with trio.fail_after(timeout):
            done = await trio.run_process(argv, stdin=input, capture_stdout=True, capture_stderr=True, check=False,
                                          env=self.host_env(host, env),
                                          preexec_fn=self._enter(host),
                                          start_new_session=True)
        if check and done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise LabError(f"{host}: {' '.join(argv[:4])}...: exit {done.returncode}: {err[-1] if err else ''}")
        return done

    async def spawn(self, host: str, argv: list[str], *, name: str, env: dict[str, str] | None = None,
                    stdout: int | None = None) -> trio.Process:
        """Start a command inside ``host``; its output goes to the run's logs unless ``stdout`` says otherwise.

        The lab kills it at the end of the run if it is still running.
        """
        log = self.workdir / "logs" / f"{host}.{name}.log"
        with open(log, "ab") as f:  # noqa: ASYNC230 -- a local log file; opening does not block
            return await trio.lowlevel.open_process(
                argv, env=self.host_env(host, env), stdin=subprocess.DEVNULL,
                stdout=f if stdout is None else stdout, stderr=f,
                preexec_fn=self._enter(host), start_new_session=True)

    async def connect(self, host: str, address: str, port: int) -> trio.SocketStream:
        """A TCP connection made from inside ``host`` (the root namespace has no route into the lab)."""
        raw = await trio.to_thread.run_sync(labnet.netns_socket, self.net.hosts[host].netns)
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            await sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def http_get(self, host: str, url_host: str, port: int, path: str, *, timeout: float = 10.0) -> bytes:
        """GET ``path`` from ``url_host:port`` from inside ``host``: the body.

        Anything but a whole 200 answer in time (refused, reset, cut short,
        not HTTP, another status) raises :class:`LabError`, one line.
        """
        import h11

        url = f"http://{url_host}:{port}{path}"
        try:
            return await self._get(host, url_host, port, path, timeout)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise LabError(f"GET {url} from {host}: {exc}") from None
        except trio.TooSlowError:
            raise LabError(f"GET {url} from {host}: no answer in {timeout:g}s") from None

    async def _get(self, host: str, url_host: str, port: int, path: str, timeout: float) -> bytes:
        import h11

        with trio.fail_after(timeout):
            stream = await self.connect(host, url_host, port)
            async with stream:
                conn = h11.Connection(h11.CLIENT)
                await stream.send_all(conn.send(h11.Request(method="GET", target=path,
                                                            headers=[("Host", f"{url_host}:{port}"),
                                                                     ("Connection", "close")])))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                body = b""
                status = 0
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(1 << 16))
                    elif isinstance(ev, h11.Response):
                        status = ev.status_code
                    elif isinstance(ev, h11.Data):
                        body += bytes(ev.data)
                    elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                        break
        if status != 200:
            raise LabError(f"GET http://{url_host}:{port}{path} from {host}: HTTP {status}")
        return body

    async def metrics(self, host: str, daemon: str) -> str:
        """The daemon's own /metrics, scraped from its host."""
        addr, _, port = self.bundle.plan(host, daemon).metrics.rpartition(":")
        return (await self.http_get(host, addr, int(port), "/metrics")).decode()

    # -- faults ----------------------------------------------------------------------------
    async def apply(self, fault: Fault) -> None:
        """Apply one fault now, and log it with the time it took effect."""
        entry: dict[str, Any] = {"at": fault.at, "kind": fault.kind, "host": fault.host}
        if fault.kind == "kill":
            p = self.daemons[(fault.host, fault.daemon)]
            entry["daemon"] = fault.daemon
            entry["pid"] = p.pid
            if p.process is not None and p.process.returncode is None:
                p.process.send_signal(signal.SIGKILL)
        elif fault.kind == "host-down":
            self.down_hosts.add(fault.host)
            names = [self.net.hosts[fault.host].netns]
            killed = await trio.to_thread.run_sync(labnet.kill_namespace_processes, names)
            await trio.to_thread.run_sync(self.net.set_carrier, fault.host, False)
            entry["killed"] = killed
            self._write_record()
        elif fault.kind == "link-down":
            await trio.to_thread.run_sync(self.net.set_carrier, fault.host, False)
            if fault.duration > 0:
                assert self._nursery is not None
                self._nursery.start_soon(partial(self._later, fault.duration, self.net.set_carrier, fault.host, True,
                                                 entry={"kind": "link-up", "host": fault.host}))
        elif fault.kind == "link":
            changes = {k: getattr(fault, k) for k in ("upload", "download", "delay", "jitter", "loss")
                       if getattr(fault, k) >= 0}
            before = self.net.hosts[fault.host].link
            await trio.to_thread.run_sync(lambda: self.net.set_link(fault.host, **changes))
            entry["changes"] = changes
            if fault.duration > 0:
                restore = {k: getattr(before, k) for k in changes}
                assert self._nursery is not None
                self._nursery.start_soon(partial(self._later, fault.duration,
                                                 lambda: self.net.set_link(fault.host, **restore),
                                                 entry={"kind": "link-restored", "host": fault.host,
                                                        "changes": restore}))
        elif fault.kind == "inject":
            argv = [*self.shoal, "telemetry", "inject", fault.inject, "--duration", f"{fault.duration:g}"]
            assert self._nursery is not None
            await self.spawn(fault.host, argv, name=f"inject-{fault.inject}")
            entry["inject"] = fault.inject
        self._log_fault(entry)
        self.progress(f"fault: {fault.kind} on {fault.host}"
                      + (f" ({fault.daemon})" if fault.daemon else "")
                      + (f" for {fault.duration:g}s" if fault.duration else ""))

    def _log_fault(self, entry: dict[str, Any]) -> None:
        entry["applied"] = round(self.now(), 3)
        self.applied.append(entry)
        self._applied_changed.set()
        self._applied_changed = trio.Event()

    async def wait_faults(self, count: int) -> list[dict]:
        """Wait until ``count`` entries (faults applied, links restored) are in the fault log."""
        while len(self.applied) < count:
            await self._applied_changed.wait()
        return self.applied

    async def _later(self, delay: float, fn: Callable[..., Any], *args: Any, entry: dict[str, Any]) -> None:
        await trio.sleep(delay)
        await trio.to_thread.run_sync(fn, *args)
        self._log_fault(entry)

    async def _schedule(self) -> None:
        assert self.exp_t0 is not None
        for fault in self.scenario.faults:
            await trio.sleep_until(trio.current_time() + max(0.0, fault.at - self.now()))
            await self.apply(fault)

    def start_experiment(self) -> None:
        """Start the experiment's clock and the fault schedule."""
        self.exp_t0 = time.monotonic()
        assert self._nursery is not None
        self._nursery.start_soon(self._schedule)

    # -- status ----------------------------------------------------------------------------
    def rates(self, interval: float = 1.0) -> dict[str, tuple[float, float]]:
        """``host -> (upload, download)`` in MiB/s over ``interval`` seconds (blocking)."""
        return measure_rates(self.net, interval)


def measure_rates(network: labnet.Network, interval: float) -> dict[str, tuple[float, float]]:
    a = network.counters()
    time.sleep(interval)
    b = network.counters()
    return {h: ((b[h][0] - a[h][0]) / interval / labnet.MIB, (b[h][1] - a[h][1]) / interval / labnet.MIB)
            for h in a if h in b}


def _state_mode(daemon: str) -> int:
    from shoal.daemons.runtime.registry import DAEMONS

    modes = [v for k, v, _ in DAEMONS[daemon].service if k == "StateDirectoryMode" and v]
    return int(modes[0], 8) if modes else 0o700


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"

