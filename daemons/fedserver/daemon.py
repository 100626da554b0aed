"""The fedserver daemon: a supervised Flower SuperLink and FedAvg runs over the nodes.

Theory of operation
-------------------
At start the daemon writes, under its state directory:

* ``app/``: the Flower app (pyproject.toml and a shim module importing
  ``shoal.daemons.fedserver.flowerapp``), submitted for every run;
* ``flwr-home/config.toml``: the ``flwr`` CLI's connection profile for its own
  SuperLink (insecure on loopback, ``root-certificates`` with TLS);

then runs ``flower-superlink`` as a child (restarted if it exits) with its
state in ``superlink.db`` (without it a SuperLink restart makes every
SuperNode exit with 401) and runtime dependency installation disabled (no
``uv sync`` against the package index per run).

A **run** (``shoal fed run --rounds R``, the RPC ``run``, or every
``[federation] interval`` seconds) is ``flwr run app shoal --run-config ...
--format json``, which returns the run id at once. The daemon then waits for
the ServerApp to write ``global/latest.npz`` carrying that run id (success),
checking ``flwr ls`` every ``LS_INTERVAL`` seconds for a run that finished
any other way (failure). One run at a time: a second request while one is in
progress is answered ``busy``. The ServerApp's log is in ``superlink.log``.

The RPC ``latest`` serves ``latest.npz`` to telemetry daemons that were down
during a run, so they catch up. RPC off loopback requires a token (the
runtime refuses to start otherwise), and Flower off loopback requires TLS
and SuperNode authentication (config validation refuses to start otherwise).

**SuperNode authentication.** With ``[superlink] supernode_auth`` the
SuperLink runs with TLS and ``--enable-supernode-auth``: a SuperNode may only
activate with a private key whose public key was registered through the
Control API (``flwr supernode register``). The daemon registers every key
listed in ``[superlink] authorized_keys`` at start, before it reports ready,
through the same ``flwr`` CLI profile it submits runs with. A node with an
unknown key is refused at activation (its ``flower-supernode`` exits with
code 305) and never receives a message.

**The Control API stays on loopback.** Flower 1.41 serves Fleet, Control and
Runtime APIs on one port, and its open-source Control API has no
authentication. So with TLS the SuperLink listens on a free 127.0.0.1 port
(``superlink_internal`` in the ready STATUS) and ``[superlink] listen`` is
served by :mod:`.proxy`, which forwards only the SuperNodes' Fleet API paths
and refuses everything else with 403. The daemon's own ``flwr`` CLI dials the
loopback SuperLink directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from functools import partial
from pathlib import Path

import trio

from shoal.core.telemetry.formats import decode_model_npz
from shoal.daemons.fedserver.config import FedserverConfig
from shoal.daemons.fedserver.metrics import FedserverMetrics
from shoal.daemons.fedserver.proxy import FleetProxy, client_context, server_context
from shoal.daemons.runtime.config import ListenAddr, read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcError, RpcServer, handlers_of, rpc_method
from shoal.daemons.runtime.state import atomic_write
from shoal.daemons.runtime.supervise import flower_env, flower_exe, free_port, supervise, wait_listening
from shoal.protocol.telemetry import Run

log = logging.getLogger("shoal.fedserver")

CONNECTION = "shoal"
LS_INTERVAL = 30.0  # seconds between `flwr ls` checks while a run is in progress (each costs ~1-3 s of CPU)
SUBMIT_TIMEOUT = 120.0
STARTUP_TIMEOUT = 120.0  # flower-superlink imports a lot; on a loaded 2-core node it takes ~10 s
MAX_KEYS = 100_000  # authorized_keys lines read
REGISTER_PARALLEL = 4  # `flwr supernode register` processes at once

APP_PYPROJECT = """\
# Written by the shoal fedserver at start; see shoal/daemons/fedserver/flowerapp.py.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "shoalfed"
version = "1.0.0"
description = "Shoal telemetry: federated averaging of the per-node anomaly autoencoders"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "shoal"

[tool.flwr.app.components]
serverapp = "shoalfed.app:server_app"
clientapp = "shoalfed.app:client_app"

[tool.flwr.app.config]
rounds = 1
epochs = 1
lr = 0.001
batch-size = 32
min-nodes = 1
wait-nodes = 60.0
timeout = 600.0
seed = 0
out = ""
"""

APP_MODULE = """\
from shoal.daemons.fedserver import flowerapp

server_app = flowerapp.server_app
client_app = flowerapp.client_app
"""


class FedRunError(Exception):
    pass


def check_names_loopback(certfile: str) -> None:
    """Refuse to start unless the SuperLink certificate names 127.0.0.1 (an IP SAN): the
    proxy, the fedserver's `flwr` CLI and Flower's SuperExec all dial the SuperLink there
    over TLS and verify its name."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"ssl_certfile: cannot read {certfile}: {exc}") from None
    try:
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress)
    except x509.ExtensionNotFound:
        ips = []
    if ipaddress.ip_address("127.0.0.1") not in ips:
        raise RuntimeError(f"ssl_certfile: {certfile} must name 127.0.0.1 (subjectAltName IP:127.0.0.1): the "
                           "SuperLink runs on loopback behind the fedserver's proxy and is dialled there over TLS")


class FedserverApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: FedserverConfig = ctx.config
        self.ctx = ctx
        self.config = cfg
        self.metrics = FedserverMetrics(ctx.registry)
        state = ctx.state_dir
        self.app_dir = state / "app"
        self.home = state / "flwr-home"
        self.out_dir = state / "global"
        self.latest = self.out_dir / "latest.npz"
        self.run_lock = trio.Lock()
        self.superlink_addr: ListenAddr | None = None  # where flower-superlink listens
        self.public_addr: ListenAddr | None = None  # where the SuperNodes dial (the proxy, with TLS)
        self.last_run: dict | None = None
        self.token = read_token(cfg.rpc.token_file, "rpc.token_file")
        self._write_app()
        meta = self._latest_meta()
        if meta:
            self.metrics.features.set(len(meta["features"]))

    def _write_app(self) -> None:
        (self.app_dir / "shoalfed").mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir(mode=0o700, exist_ok=True)
        self.home.mkdir(mode=0o700, exist_ok=True)
        atomic_write(self.app_dir / "pyproject.toml", APP_PYPROJECT.encode(), mode=0o644)
        atomic_write(self.app_dir / "shoalfed" / "__init__.py", b"", mode=0o644)
        atomic_write(self.app_dir / "shoalfed" / "app.py", APP_MODULE.encode(), mode=0o644)

    def _write_connection(self, addr: ListenAddr) -> None:
        s = self.config.superlink
        tls = f'root-certificates = "{s.ssl_ca_certfile}"' if s.ssl_certfile else "insecure = true"
        if addr.host in ("0.0.0.0", "::"):  # listening everywhere: the CLI dials loopback
            addr = ListenAddr("::1" if addr.host == "::" else "127.0.0.1", addr.port)
        text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{addr}"\n{tls}\n'
        atomic_write(self.home / "config.toml", text.encode())

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        s = cfg.superlink
        async with trio.open_nursery() as nursery:
            listen = s.listen
            if s.ssl_certfile:  # the SuperLink goes behind the Fleet-only proxy, on loopback
                check_names_loopback(s.ssl_certfile)
                self.superlink_addr = ListenAddr("127.0.0.1", free_port("127.0.0.1"))
            else:  # loopback without TLS (config validation allows nothing else): no proxy
                self.superlink_addr = ListenAddr(listen.host, listen.port or free_port(listen.host))
            fresh_db = not (ctx.state_dir / "superlink.db").exists()
            self._write_connection(self.superlink_addr)
            await nursery.start(partial(
                supervise, "flower-superlink", self._superlink_argv, env=flower_env({"FLWR_HOME": str(self.home)}),
                log_path=ctx.state_dir / "superlink.log", on_restart=self.metrics.superlink_restarts.inc))
            try:
                await wait_listening(self.superlink_addr, STARTUP_TIMEOUT)
            except trio.TooSlowError:
                raise RuntimeError(f"flower-superlink did not listen on {self.superlink_addr} within "
                                   f"{STARTUP_TIMEOUT:.0f} s; see {ctx.state_dir / 'superlink.log'}") from None
            if s.authorized_keys:
                await self.register_keys(s.authorized_keys, fresh_db)
            if s.ssl_certfile:
                m = self.metrics
                proxy = FleetProxy(self.superlink_addr, upstream_tls=client_context(s.ssl_ca_certfile),
                                   on_forwarded=lambda path: m.proxy_forwarded.labels(path).inc(),
                                   on_refused=m.proxy_refused.inc, on_upstream_error=m.proxy_upstream_errors.inc,
                                   on_http_error=ctx.metrics.count_http_error)
                self.public_addr = await nursery.start(partial(
                    proxy.serve, listen, server_context(s.ssl_certfile, s.ssl_keyfile)))
            else:
                self.public_addr = self.superlink_addr
            server = RpcServer(handlers_of(self), metrics=ctx.metrics, token=self.token, name="fedserver",
                               request_timeout=86400.0)
            rpc_addr = await nursery.start(partial(server.serve_tcp, cfg.rpc.listen))
            ctx.announce(rpc=rpc_addr, superlink=self.public_addr)
            if self.public_addr != self.superlink_addr:
                ctx.announce(superlink_internal=self.superlink_addr)
            if cfg.federation.interval > 0:
                nursery.start_soon(self._schedule)
            log.info("SuperLink on %s (nodes dial %s), RPC on %s", self.superlink_addr, self.public_addr, rpc_addr)
            task_status.started()

    def reload(self, new: FedserverConfig) -> None:
        """[federation] applies to the next run; listeners and TLS at restart."""
        if (new.superlink, new.rpc) != (self.config.superlink, self.config.rpc):
            log.warning("[superlink]/[rpc] changed; they take effect at the next restart")
        self.config = new

    def _superlink_argv(self) -> list[str]:
        s = self.config.superlink
        assert self.superlink_addr is not None
        argv = [flower_exe("flower-superlink"), "--database", str(self.ctx.state_dir / "superlink.db"),
                "--disable-runtime-dependency-installation",
                "--host", self.superlink_addr.host, "--port", str(self.superlink_addr.port)]
        if s.ssl_certfile:
            argv += ["--ssl-certfile", s.ssl_certfile, "--ssl-keyfile", s.ssl_keyfile,
                     "--ssl-ca-certfile", s.ssl_ca_certfile]
        else:
            argv.append("--insecure")
        if s.supernode_auth:
            argv.append("--enable-supernode-auth")
        return argv

    # -- SuperNode authentication --------------------------------------------------------

    async def register_keys(self, path: str, fresh_db: bool) -> int:
        """Register every public key in ``path`` with the SuperLink (``flwr supernode
        register``, at most ``REGISTER_PARALLEL`` at once: each is a CLI process of a
        CPU-second or two). Keys registered at an earlier start (``node-keys/registered``,
        forgotten when ``superlink.db`` was new) or already known to the SuperLink count
        as registered. A bad key or an unreadable file is logged, counted, and does not
        stop the daemon. -> keys registered."""
        try:
            lines = (await trio.to_thread.run_sync(Path(path).read_text)).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            self.metrics.key_errors.inc()
            log.error("authorized_keys: cannot read %s: %s", path, exc)
            return 0
        keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")][:MAX_KEYS]
        key_dir = self.ctx.state_dir / "node-keys"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        record = key_dir / "registered"
        if fresh_db:
            record.unlink(missing_ok=True)
        done = set(record.read_text().split()) if record.exists() else set()
        limiter = trio.CapacityLimiter(REGISTER_PARALLEL)
        registered = 0

        async def register(i: int, key: str) -> None:
            nonlocal registered
            blob = key.split()[1] if len(key.split()) > 1 else key  # the key itself, without its comment
            if blob not in done:
                key_file = key_dir / f"{i}.pub"
                atomic_write(key_file, key.encode() + b"\n", mode=0o600)
                try:
                    async with limiter:
                        await self._flwr("supernode", "register", str(key_file), CONNECTION)
                except FedRunError as exc:
                    if "already in use" not in str(exc):
                        self.metrics.key_errors.inc()
                        log.error("authorized_keys: key %d in %s (%s...) not registered: %s",
                                  i + 1, path, key[:40], exc)
                        return
                finally:
                    key_file.unlink(missing_ok=True)
                done.add(blob)
            registered += 1

        async with trio.open_nursery() as nursery:
            for i, key in enumerate(keys):
                nursery.start_soon(register, i, key)
        atomic_write(record, "".join(f"{b}\n" for b in sorted(done)).encode(), mode=0o600)
        self.metrics.authorized_nodes.set(registered)
        log.info("SuperNode authentication: %d of %d keys in %s registered", registered, len(keys), path)
        return registered

    async def _schedule(self) -> None:
        while True:
            await trio.sleep(self.config.federation.interval)
            with contextlib.suppress(FedRunError):  # logged and counted in federate()
                await self.federate(self.config.federation.rounds, "schedule")

    # -- runs ------------------------------------------------------------------------

    async def federate(self, rounds: int, trigger: str) -> dict:
        if self.run_lock.locked():
            raise FedRunError("busy: a run is already in progress")
        async with self.run_lock:
            self.metrics.running.set(1)
            start = time.monotonic()
            try:
                result = await self._run(rounds)
            except FedRunError as exc:
                self.metrics.runs.labels(trigger, "error").inc()
                log.error("federated run failed: %s", exc)
                self.last_run = {"ok": False, "error": str(exc), "time": time.time()}
                raise
            finally:
                self.metrics.running.set(0)
            took = time.monotonic() - start
            self.metrics.run_seconds.observe(took)
            self.metrics.runs.labels(trigger, "ok").inc()
            self.metrics.last_success.set(time.time())
            self.metrics.features.set(result["features"])
            result["seconds"] = round(took, 1)
            self.last_run = {"ok": True, **result, "time": time.time()}
            log.info("federated run %s done: %d rounds, %d features, %.1f s",
                     result["run_id"], rounds, result["features"], took)
            return result

    def _run_config(self, rounds: int) -> str:
        f = self.config.federation
        return (f"rounds={rounds} epochs={f.local_epochs} lr={f.lr!r} batch-size={f.batch_size} "
                f"min-nodes={f.min_nodes} wait-nodes={f.wait_nodes!r} timeout={f.round_timeout!r} "
                f'seed={f.seed} out="{self.out_dir}"')

    async def _flwr(self, *args: str) -> dict:
        env = flower_env({"FLWR_HOME": str(self.home)})
        try:
            with trio.fail_after(SUBMIT_TIMEOUT):
                proc = await trio.run_process([flower_exe("flwr"), *args, "--format", "json"], env=env,
                                              capture_stdout=True, capture_stderr=True, check=False)
        except trio.TooSlowError:
            raise FedRunError(f"flwr {args[0]} did not answer in {SUBMIT_TIMEOUT:.0f} s") from None
        try:
            out = json.loads(proc.stdout.decode("utf-8", "replace"))
        except ValueError:
            lines = (proc.stderr or proc.stdout).decode("utf-8", "replace").splitlines()
            text = [" ".join(ln.strip(" │╭╮╰╯─").split()) for ln in lines]  # rich's error box
            tail = [t for t in text if any(c.isalnum() for c in t) and t != "Error"][-1:] or [""]
            raise FedRunError(f"flwr {args[0]} failed (exit {proc.returncode}): {tail[0]}") from None
        if not out.get("success", False):
            msg = " ".join(str(out.get("error-message", "unknown error")).split())
            raise FedRunError(f"flwr {args[0]}: {msg}")
        return out

    def _latest_meta(self) -> dict | None:
        try:
            return decode_model_npz(self.latest.read_bytes())[1]
        except (OSError, ValueError):
            return None

    def _log_error_since(self, offset: int) -> str:
        """The last error line the ServerApp (or SuperLink) logged since ``offset``."""
        path = self.ctx.state_dir / "superlink.log"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                text = f.read(4 << 20).decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines()
                 if ("Error" in ln or "Exception" in ln) and "retrying" not in ln and ln.strip()]
        return lines[-1][:300] if lines else ""

    async def _run(self, rounds: int) -> dict:
        log_path = self.ctx.state_dir / "superlink.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        try:
            return await self._run_and_wait(rounds)
        except FedRunError as exc:
            detail = self._log_error_since(offset)
            raise FedRunError(f"{exc}" + (f" ({detail})" if detail else "")) from None

    async def _run_and_wait(self, rounds: int) -> dict:
        submitted = await self._flwr("run", str(self.app_dir), CONNECTION, "--run-config", self._run_config(rounds))
        run_id = int(submitted["run-id"])
        log.info("federated run %s submitted (%d rounds)", run_id, rounds)
        f = self.config.federation
        deadline = trio.current_time() + f.wait_nodes + 2 * rounds * f.round_timeout + 60
        ended: list[str] = []  # set by the `flwr ls` watcher when the run finished without a model

        async def watch_status() -> None:
            # Each `flwr ls` is a 1-3 s process: run it beside the fast file check, not in its way.
            while True:
                await trio.sleep(LS_INTERVAL)
                status = await self._run_status(run_id)
                if status.startswith("finished"):
                    ended.append(status)
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_status)
            outcome = await self._wait_model(run_id, rounds, ended, deadline)
            nursery.cancel_scope.cancel()
        if isinstance(outcome, str):
            raise FedRunError(outcome)
        return outcome

    async def _wait_model(self, run_id: int, rounds: int, ended: list[str], deadline: float) -> dict | str:
        """Poll for ``latest.npz`` of ``run_id`` -> the run's result, or an error message."""
        while True:
            meta = await trio.to_thread.run_sync(self._latest_meta)
            if meta and int(meta["run_id"]) == run_id:
                return {"run_id": run_id, "rounds": rounds, "features": len(meta["features"]),
                        "nodes": int(meta.get("nodes", 0))}
            if ended:
                if "completed" not in ended[0]:
                    return f"run {run_id} ended {ended[0]}; see superlink.log"
                # finished:completed: the model file is written before that; look once more.
                meta = await trio.to_thread.run_sync(self._latest_meta)
                if not (meta and int(meta["run_id"]) == run_id):
                    return f"run {run_id} completed without writing a model; see superlink.log"
                continue
            if trio.current_time() > deadline:
                return f"run {run_id} did not finish in time"
            await trio.sleep(0.5)

    async def _run_status(self, run_id: int) -> str:
        try:
            out = await self._flwr("ls", CONNECTION, "--run-id", str(run_id))
        except FedRunError as exc:
            log.warning("flwr ls: %s", exc)
            return ""
        for r in out.get("runs", []):
            if str(r.get("run-id")) == str(run_id):
                return str(r.get("status", ""))
        return ""

    # -- RPC ---------------------------------------------------------------------------

    @rpc_method("run", Run)
    async def rpc_run(self, params: Run) -> dict:
        rounds = self.config.federation.rounds if params.rounds is None else params.rounds
        try:
            return await self.federate(rounds, "rpc")
        except FedRunError as exc:
            code = "busy" if str(exc).startswith("busy") else "run_failed"
            raise RpcError(code, str(exc)) from None

    @rpc_method("latest")
    async def rpc_latest(self) -> dict | None:
        meta = await trio.to_thread.run_sync(self._latest_meta)
        if meta is None:
            return None
        self.metrics.catch_ups.inc()
        data = await trio.to_thread.run_sync(self.latest.read_bytes)
        return {"run_id": int(meta["run_id"]), "round": int(meta["round"]), "model": data}

    @rpc_method("status")
    async def rpc_status(self) -> dict:
        meta = await trio.to_thread.run_sync(self._latest_meta)
        return {
            "superlink": str(self.public_addr),
            "running": self.run_lock.locked(),
            "last_run": self.last_run,
            "latest": None if meta is None else {k: meta[k] for k in ("run_id", "round", "time")}
            | {"features": len(meta["features"])},
        }


def make_app(ctx: DaemonContext) -> FedserverApp:
    return FedserverApp(ctx)


def check_config(cfg: FedserverConfig) -> None:
    """What `shoal config check` checks beyond the schema: the RPC token file."""
    read_token(cfg.rpc.token_file, "rpc.token_file")
