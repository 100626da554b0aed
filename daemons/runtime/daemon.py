"""One way to be a daemon: context, app protocol, signals, sd_notify, stop.

Theory of operation
-------------------
``run_daemon`` is the ``main()`` of every daemon: it loads the config (a bad
one is one line on stderr and exit code 2), sets up logging and runs
:func:`serve` under ``trio.run``. ``serve``:

1. installs the SIGTERM/SIGINT/SIGHUP receiver *first*, so a signal that
   arrives during start-up is queued instead of killing us with the default
   action;
2. builds the :class:`DaemonContext` (registry, runtime metrics, state dir);
3. starts ``/metrics`` if ``[daemon] metrics_listen`` is set;
4. starts the app with ``nursery.start(app.run, ctx)``: the app calls
   ``task_status.started()`` once its sockets are bound and has announced
   them with ``ctx.announce(http=addr, ...)``;
5. sends ``READY=1`` with ``STATUS=listening metrics=H:P http=H:P ...``;
6. pings ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` if systemd asks;
7. on SIGHUP reloads (``RELOADING=1`` ... ``READY=1``): a bad file is logged
   in one line, counted as ``config_reloads_total{result="error"}`` and the old
   config stays; a good one goes to ``app.reload(new)``;
8. on SIGTERM/SIGINT sends ``STOPPING=1`` and cancels the app, whose
   ``finally:`` blocks persist state, and waits for it at most
   ``[daemon] stop_timeout`` seconds.

The stop deadline has two layers. Inside trio, the wait for the app is a
``move_on_at`` deadline: an app that is still unwinding when it passes is
logged and the exit code becomes 1 (but trio cannot abandon a task, so serve
still waits for it). That cannot help against a ``finally:`` that blocks
without yielding to trio (a hung fsync on a dead disk), so :func:`run_daemon`
also arms a hard deadline on a thread: one second after ``stop_timeout`` it
logs and calls ``os._exit(EXIT_STOP_TIMEOUT)``. systemd's ``TimeoutStopSec``
should exceed ``stop_timeout`` + 1 s so that our exit, not SIGKILL, wins.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry

from shoal.daemons.runtime.config import ConfigError, ListenAddr, load_config
from shoal.daemons.runtime.logs import set_level, setup_logging
from shoal.daemons.runtime.metrics import RuntimeMetrics, runtime_metrics, serve_metrics
from shoal.daemons.runtime.sdnotify import Notifier

__all__ = [
    "App",
    "DaemonContext",
    "serve",
    "run_daemon",
    "resolve_state_dir",
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    "EXIT_STOP_TIMEOUT",
    "EXIT_CANNOT_LISTEN",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # includes "the graceful stop overran stop_timeout"
EXIT_CONFIG = 2  # bad config at start: a one-line message on stderr
EXIT_STOP_TIMEOUT = 70  # EX_SOFTWARE: the hard deadline fired
#: A listener could not be bound at start (port in use, address not on this host,
#: a privileged port): restarting cannot help, so the units list it, with
#: EXIT_CONFIG, in RestartPreventExitStatus= and systemd does not loop on it.
EXIT_CANNOT_LISTEN = 73  # EX_CANTCREAT
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)

_HARD_DEADLINE_GRACE = 1.0


@dataclass(eq=False)
class DaemonContext:
    """What the runtime gives an app. ``config`` is replaced on every good reload."""

    name: str
    config_path: Path | None
    config: Any
    registry: CollectorRegistry
    state_dir: Path
    notifier: Notifier
    metrics: RuntimeMetrics
    log: logging.Logger
    #: Addresses reported in the STATUS line, in announcement order.
    addresses: dict[str, ListenAddr] = field(default_factory=dict)
    ready: bool = False
    stopping: bool = False
    _stop_requested: trio.Event = field(default_factory=trio.Event, repr=False)
    _reload: Callable[[], Any] | None = field(default=None, repr=False)

    def announce(self, **addresses: ListenAddr) -> None:
        """Report bound addresses (``http=addr``); they go in the STATUS line."""
        for key, addr in addresses.items():
            if not key.isidentifier():
                raise ValueError(f"address key {key!r} must be an identifier")
            self.addresses[key] = ListenAddr(*addr)
        if self.ready and not self.stopping:
            self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """``listening metrics=127.0.0.1:40123 http=127.0.0.1:41235``."""
        state = "stopping" if self.stopping else "listening"
        return " ".join([state] + [f"{k}={a}" for k, a in self.addresses.items()])

    def request_stop(self) -> None:
        """Begin a graceful stop, as SIGTERM does (idempotent)."""
        self._stop_requested.set()

    async def reload_config(self) -> bool:
        """Re-read the config, as SIGHUP does; True if the new one was applied."""
        if self._reload is None:
            raise RuntimeError("the daemon is not running yet")
        return await self._reload()


class App(Protocol):
    """What a daemon implements; the runtime does the rest."""

    async def run(self, ctx: DaemonContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, ``ctx.announce(...)``, ``task_status.started()``, serve until
        cancelled; persist state in ``finally:`` (shielded if it awaits)."""
        ...

    def reload(self, new_config: Any) -> None:
        """Apply a validated new config; ``ctx.config`` is updated after it.

        Raise ConfigError, before changing anything, to refuse a config the
        schema accepted but the app cannot use (a file it names is bad)."""
        ...


def resolve_state_dir(name: str, configured: str, env: Mapping[str, str]) -> Path:
    """``[daemon] state_directory``, else systemd's $STATE_DIRECTORY, else ./state/<name>."""
    if configured:
        return Path(configured)
    from_systemd = env.get("STATE_DIRECTORY", "")
    if from_systemd:
        # StateDirectory= with several entries yields a colon-separated list.
        return Path(from_systemd.split(":", 1)[0])
    return Path("state") / name


def _make_state_dir(path: Path, env: Mapping[str, str]) -> Path:
    """Create the state directory 0700, unless systemd made it: then StateDirectoryMode= rules
    (the worker's is 0711, so its task user can enter its own task directory)."""
    if str(path) in env.get("STATE_DIRECTORY", "").split(":") and path.is_dir():
        return path
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by umask, and ignored if it existed
    return path


async def serve(
    name: str,
    config: Any,
    config_path: Path | None,
    make_app: Callable[[DaemonContext], App],
    *,
    load: Callable[[Path], Any] | None = None,
    handle_signals: bool = True,
    env: Mapping[str, str] = os.environ,
    hard_stop: Callable[[float], Callable[[], None]] | None = None,
    task_status: trio.TaskStatus[DaemonContext] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run a daemon until it is asked to stop; return the exit code.

    ``load(config_path)`` re-reads the config on reload (None: reload is
    refused). ``hard_stop(seconds)`` arms a backstop for the stop and returns
    its disarm function (``run_daemon`` passes a thread timer; in-process tests
    pass nothing). Started with the :class:`DaemonContext`.
    """
    if handle_signals:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            return await _serve(name, config, config_path, make_app, load, signals, env, hard_stop, task_status)
    return await _serve(name, config, config_path, make_app, load, None, env, hard_stop, task_status)


async def _serve(
    name: str,
    config: Any,
    config_path: Path | None,
    make_app: Callable[[DaemonContext], App],
    load: Callable[[Path], Any] | None,
    signals: Any,
    env: Mapping[str, str],
    hard_stop: Callable[[float], Callable[[], None]] | None,
    task_status: trio.TaskStatus[DaemonContext],
) -> int:
    daemon_cfg = config.daemon
    registry = CollectorRegistry(auto_describe=True)
    metrics = runtime_metrics(registry, name)
    state_dir = _make_state_dir(resolve_state_dir(name, daemon_cfg.state_directory, env), env)
    notifier = Notifier(env)
    log = logging.getLogger(f"shoal.{name}")
    ctx = DaemonContext(name, config_path, config, registry, state_dir, notifier, metrics, log)
    app_done = trio.Event()
    app_scope = trio.CancelScope()
    exit_code = EXIT_OK

    async def run_app(app: App, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with app_scope:
                await app.run(ctx, task_status=task_status)
        finally:
            app_done.set()
            ctx._stop_requested.set()  # an app that returns on its own ends the daemon

    async def reload() -> bool:
        return _reload_once(ctx, app, load, notifier, metrics, log)

    try:
        async with trio.open_nursery() as nursery:
            if daemon_cfg.metrics_listen is not None:
                addr = await nursery.start(
                    partial(serve_metrics, registry, daemon_cfg.metrics_listen, on_error=metrics.count_http_error)
                )
                ctx.addresses["metrics"] = addr
            app = make_app(ctx)
            await nursery.start(run_app, app)
            ctx._reload = reload
            ctx.ready = True
            notifier.ready(ctx.status_line())
            log.info("ready: %s", ctx.status_line())
            interval = notifier.watchdog_interval
            if interval is not None:
                nursery.start_soon(_watchdog, notifier, interval)
            if signals is not None:
                nursery.start_soon(_signal_loop, signals, ctx, log)
            task_status.started(ctx)

            await ctx._stop_requested.wait()
            ctx.stopping = True
            if app_done.is_set():
                # The app is meant to run until cancelled; returning early is
                # a failure, so systemd's Restart=on-failure brings it back.
                log.error("the app returned without being asked to stop")
                exit_code = EXIT_FAILURE
            else:
                stop_timeout = float(daemon_cfg.stop_timeout)
                notifier.notify(STOPPING=1, STATUS=ctx.status_line())
                log.info("stopping (at most %.1fs)", stop_timeout)
                disarm = hard_stop(stop_timeout + _HARD_DEADLINE_GRACE) if hard_stop else None
                try:
                    app_scope.cancel()
                    with trio.move_on_after(stop_timeout) as deadline:
                        await app_done.wait()
                    if deadline.cancelled_caught:
                        log.error("graceful stop overran stop_timeout=%.1fs; still waiting for the app", stop_timeout)
                        exit_code = EXIT_FAILURE
                        await app_done.wait()
                finally:
                    if disarm is not None:
                        disarm()
            nursery.cancel_scope.cancel()
    except* ConfigError as group:
        if ctx.ready:
            raise
        # A file the config names (a token, an access list) read while the app
        # is built: as bad as a bad config file, and as final.
        first = _first_leaf(group)
        log.error("%s", first)
        exit_code = EXIT_CONFIG
    except* OSError as group:
        if ctx.ready:
            raise
        # A failure to start (nearly always a listener that cannot bind) is one
        # line, not the nursery's ExceptionGroup traceback.
        first = _first_leaf(group)
        log.error("cannot start: %s", first)
        notifier.notify(STATUS=f"cannot start: {first}")
        exit_code = EXIT_CANNOT_LISTEN if first.errno in _BIND_ERRNOS else EXIT_FAILURE
    finally:
        notifier.close()
    log.info("stopped")
    return exit_code


def _first_leaf(group: BaseExceptionGroup) -> Any:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _reload_once(
    ctx: DaemonContext,
    app: App,
    load: Callable[[Path], Any] | None,
    notifier: Notifier,
    metrics: RuntimeMetrics,
    log: logging.Logger,
) -> bool:
    if load is None or ctx.config_path is None:
        log.warning("reload requested, but this daemon was started without a reloadable config file")
        metrics.config_reloads.labels(result="error").inc()
        return False
    notifier.reloading()
    try:
        try:
            new = load(ctx.config_path)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            metrics.config_reloads.labels(result="error").inc()
            return False
        # An app refuses a config it cannot apply (a file it names is bad) with
        # ConfigError, before changing anything; any other exception is a bug
        # and propagates, stopping the daemon.
        try:
            app.reload(new)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            metrics.config_reloads.labels(result="error").inc()
            return False
        old_daemon, new_daemon = ctx.config.daemon, new.daemon
        for key in ("metrics_listen", "state_directory"):
            if getattr(old_daemon, key) != getattr(new_daemon, key):
                log.warning("daemon.%s changed; it takes effect at the next restart", key)
        if old_daemon.log_level != new_daemon.log_level:
            set_level(new_daemon.log_level)
        ctx.config = new
        metrics.config_reloads.labels(result="ok").inc()
        log.info("config reloaded from %s", ctx.config_path)
        return True
    finally:
        notifier.ready(ctx.status_line())


async def _watchdog(notifier: Notifier, interval: float) -> None:
    # Pinged from the trio loop itself: a loop blocked by sync code stops the
    # pings and systemd restarts us, which is the point.
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


async def _signal_loop(signals: Any, ctx: DaemonContext, log: logging.Logger) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            if ctx.stopping:
                continue
            log.info("SIGHUP: reloading %s", ctx.config_path)
            await ctx.reload_config()
        elif ctx.stopping:
            log.info("%s received while stopping; still waiting for the app", signal.Signals(signum).name)
        else:
            log.info("%s: stopping", signal.Signals(signum).name)
            ctx.request_stop()


def _thread_hard_stop(seconds: float) -> Callable[[], None]:
    """Arm a thread that ends the process if the stop takes ``seconds``."""
    log = logging.getLogger("shoal.runtime")

    def fire() -> None:
        log.critical("stop did not finish within %.1fs; exiting with code %d", seconds, EXIT_STOP_TIMEOUT)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_STOP_TIMEOUT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer.cancel


def run_daemon(
    name: str,
    config_path: str | Path,
    schema_cls: type,
    make_app: Callable[[DaemonContext], App],
    *,
    env: Mapping[str, str] | None = None,
) -> int:
    """The main() of a daemon; returns the process exit code."""
    env = os.environ if env is None else env
    path = Path(config_path)
    try:
        config = load_config(path, schema_cls)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.daemon.log_level, name, env=env)

    def load(p: Path) -> Any:
        return load_config(p, schema_cls)

    return trio.run(
        lambda: serve(
            name, config, path, make_app, load=load, handle_signals=True, env=env, hard_stop=_thread_hard_stop
        )
    )
