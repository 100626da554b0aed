"""The telemetry daemon: collector, window store, detector, and a Flower SuperNode.

Theory of operation
-------------------
One trio task samples the node every ``collector.interval`` seconds (sources
that may block, nvidia-smi and node_exporter, are read in a worker thread)
and feeds a :class:`WindowAccumulator`, using wall-clock time so windows line
up across the cluster. Each window that closes is, in this order:

1. committed to SQLite (``windows.db``, WAL, synchronous=FULL): from here on it
   survives ``kill -9``; the open window is lost on a crash, by design;
2. scored by the installed model, if any (onnxruntime, one thread): the score
   is the mean squared reconstruction error; above the model's threshold the
   window is anomalous. The verdict goes into the store and the metrics, and
   into the node's verdict (:class:`NodeVerdict`: ``[detector] confirm``
   windows in a row flip it; ``shoal_telemetry_node_anomalous``, what a worker
   reports to the dispatcher); ``on_change_command`` runs when that flips;
3. with federation on, the node's training windows are re-exported to
   ``fed/train.npz`` for the ClientApp.

**Models.** The running model is ``model.onnx`` in the state directory. A new
model, from ``shoal telemetry train`` (local), ``install`` (RPC), or a
federated run, is first written to a candidate file and loaded with
:meth:`Detector.load`; it is refused with a one-line reason if it is corrupt,
lacks its metadata, or names features this node does not have (more than
``max_missing_features`` of them); the previous model keeps running, and the
refusal is counted. Only an accepted model replaces ``model.onnx``.

**Federation.** With ``[federation] enabled`` the daemon supervises a
``flower-supernode`` whose ClientApp reads ``fed/train.npz`` and writes each
global model it receives to ``fed/global.npz``. The daemon checks that file
every second and installs a new one with its own scaler and threshold
(trainer.model_from_global). The ClientApp's local fit takes the node's CPU
for seconds: it writes ``fed/training.json`` before and after it (the
SuperNode's ``training-mark``), and the windows overlapping the fit, or closing
within ``SETTLE_SECONDS`` after, are ``shoal-disturbed`` as for the daemon's own
training (:meth:`TelemetryApp._follow_federated_training`). A node that was down during a run catches up:
every ``catch_up_interval`` it asks the fedserver (``[federation] fedserver``)
for the latest global model and installs it if it has not yet. With
``root_certificates`` the SuperNode talks TLS to the SuperLink, and with
``auth_private_key`` it authenticates with this node's key (registered on
the fedserver through ``[superlink] authorized_keys``); a refused SuperNode
is restarted with back-off (runtime/supervise.py). The files shared with
the ClientApp are in the formats of ``shoal.core.telemetry.formats``.

Control RPC (runtime transport, Unix socket, mode 0600): ``status``,
``label``, ``train``, ``install`` (a large model in chunks: :class:`Uploads`),
``features``, their parameters the contracts of ``shoal.protocol.telemetry``.
A model is checked against the features the collector declares (its sources'
metrics now, see ``Collector.declared_features``), so a model for another
node is refused even before the first window is stored.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from shoal.core.telemetry.formats import decode_model_npz, decode_training_mark, encode_training_npz
from shoal.core.telemetry.model import Detector, ModelError, NodeVerdict
from shoal.core.telemetry.windows import Disturbances, Window, WindowAccumulator
from shoal.daemons.runtime.config import ListenAddr, read_token
from shoal.daemons.runtime.daemon import DaemonContext
from shoal.daemons.runtime.rpc import RpcError, RpcServer, connect_tcp, handlers_of, rpc_method
from shoal.daemons.runtime.state import atomic_write
from shoal.daemons.runtime.supervise import flower_env, flower_exe, free_port, supervise
from shoal.daemons.telemetry.config import TelemetryConfig
from shoal.daemons.telemetry.metrics import TelemetryMetrics
from shoal.daemons.telemetry.sources import Collector, default_sources
from shoal.daemons.telemetry.store import WindowStore
from shoal.daemons.telemetry.trainer import (
    feature_row,
    model_from_global,
    selected_features,
    train_local,
    training_matrix,
)
from shoal.protocol.telemetry import MAX_FEATURES_PAGE, Features, Install, Label, Status, Train

log = logging.getLogger("shoal.telemetry")

HOOK_TIMEOUT = 30.0
# A model sent to the control socket before the collector's first sample waits this long for it.
FIRST_SAMPLE_TIMEOUT = 30.0
# Chunked installs (protocol.telemetry.Install): uploads in progress at once, and how long one
# may sit idle between two chunks before it is dropped (its memory freed).
MAX_UPLOADS = 2
UPLOAD_IDLE_SECONDS = 60.0
# The daemon's own training and model installs disturb the node it watches (a core busy for
# seconds, memory allocated and freed, the model file written and loaded). The windows that
# overlap them, and those closing within SETTLE_SECONDS after, get this label (so they are
# never training data) and are not scored (no alarm): shoal_telemetry_windows_total{result="disturbed"}.
DISTURBED_LABEL = "shoal-disturbed"
# 10 s, not 5: with 5, the first 3-s window scored after training was a false alarm in 5 of
# 6 demo runs on this machine (0.14-0.55 against thresholds of 0.06-0.14, on memory
# features, right after the training's own allocations); with 10, none in 5.
SETTLE_SECONDS = 10.0
# A federated round's local fit (the ClientApp, another process) is followed through its
# training mark; one still open after this long is taken as over (a recycled pid, a mark
# left behind), so that a stale file cannot keep every window unscored.
FED_TRAINING_MAX_SECONDS = 3600.0


class Uploads:
    """Chunked model uploads in progress: at most MAX_UPLOADS, each at most MAX_INSTALL_BYTES,
    dropped after UPLOAD_IDLE_SECONDS without a chunk. Time is passed in (tests use any clock)."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[bytearray, int, float]] = {}  # id -> (data, total, last chunk)

    def add(self, p: Install, now: float) -> bytes | dict:
        """The whole file once ``p`` completes it, else ``{"upload", "received"}``; RpcError
        ``bad_upload`` for a chunk that does not continue an open upload exactly."""
        for uid, (_, _, last) in list(self._open.items()):
            if now - last > UPLOAD_IDLE_SECONDS:
                del self._open[uid]
                log.warning("model upload %s dropped: no chunk for %.0f s", uid, UPLOAD_IDLE_SECONDS)
        if p.upload is None:
            if p.total is None or p.total == len(p.model):
                return p.model
            if len(self._open) >= MAX_UPLOADS:
                raise RpcError("busy", f"{MAX_UPLOADS} model uploads are already in progress")
            uid = secrets.token_hex(8)
            self._open[uid] = (bytearray(p.model), p.total, now)
            return {"upload": uid, "received": len(p.model)}
        if p.upload not in self._open:
            raise RpcError("bad_upload", f"no model upload {p.upload[:16]!r} in progress (finished, or idle "
                                         f"for over {UPLOAD_IDLE_SECONDS:.0f} s)")
        buf, total, _ = self._open[p.upload]
        if p.offset != len(buf) or p.total not in (None, total) or len(buf) + len(p.model) > total \
                or not p.model:
            del self._open[p.upload]
            raise RpcError("bad_upload", f"model upload {p.upload}: a chunk of {len(p.model)} bytes at offset "
                                         f"{p.offset} does not continue {len(buf)} of {total} bytes; upload dropped")
        buf += p.model
        if len(buf) < total:
            self._open[p.upload] = (buf, total, now)
            return {"upload": p.upload, "received": len(buf)}
        del self._open[p.upload]
        return bytes(buf)
BLOCKING_SOURCES = {"gpu", "node_exporter"}


class TelemetryApp:
    def __init__(self, ctx: DaemonContext) -> None:
        cfg: TelemetryConfig = ctx.config
        self.ctx = ctx
        self.config = cfg
        state = ctx.state_dir
        self.metrics = TelemetryMetrics(ctx.registry)
        self.store = WindowStore(state / "windows.db", cfg.store.max_windows)
        c = cfg.collector
        self.collector = Collector(
            default_sources(Path(c.root), gpu=c.gpu, node_exporter_url=c.node_exporter_url,
                            node_exporter_prefixes=c.node_exporter_prefixes, cgroup=c.cgroup),
            on_error=lambda name: self.metrics.source_errors.labels(name).inc(),
        )
        self.metrics.sources_absent.set(len(self.collector.absent))
        self.blocking = any(s.name in BLOCKING_SOURCES for s in self.collector.sources)
        self.acc = WindowAccumulator(c.window, c.min_samples)
        self.model_path = state / "model.onnx"
        self.candidate_path = state / "candidate.onnx"
        self.fed_dir = state / "fed"
        self.fed_dir.mkdir(mode=0o700, exist_ok=True)
        self.train_npz = self.fed_dir / "train.npz"
        self.global_npz = self.fed_dir / "global.npz"
        self.installed_file = self.fed_dir / "installed.json"
        self.training_mark = self.fed_dir / "training.json"
        self._mark_seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) of the mark followed
        self._mark_open: tuple[float, int] | None = None  # (start, pid) of a fit still running
        self.control_path = Path(cfg.control.socket) if cfg.control.socket else state / "control.sock"
        self.detector: Detector | None = None
        self.model_info: dict = {}
        self.node = NodeVerdict(cfg.detector.confirm)  # the node's verdict, from the windows'
        self.model_lock = trio.Lock()
        self.uploads = Uploads()
        self.disturbances = Disturbances()
        self._first_sample = trio.Event()
        self._global_seen: tuple[int, int] | None = None
        self._nursery: trio.Nursery | None = None
        self.fed_token = read_token(cfg.federation.token_file, "federation.token_file")
        self.metrics.stored.set(self.store.count())

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, ctx: DaemonContext, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._load_startup_model()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                server = RpcServer(handlers_of(self), metrics=ctx.metrics, name="telemetry", request_timeout=600.0)
                await nursery.start(partial(server.serve_unix, str(self.control_path)))
                if self.config.federation.enabled:
                    await self._write_training_data()
                    await nursery.start(self._run_supernode)
                nursery.start_soon(self._sample_loop)
                nursery.start_soon(self._watch_global)
                if self.config.federation.fedserver:
                    nursery.start_soon(self._catch_up_loop)
                log.info("collecting every %.3g s into %.0f s windows; sources %s; absent %s; control %s",
                         self.config.collector.interval, self.config.collector.window,
                         ",".join(s.name for s in self.collector.sources) or "-",
                         ",".join(self.collector.absent) or "-", self.control_path)
                task_status.started()
        finally:
            self.store.close()

    def reload(self, new: TelemetryConfig) -> None:
        """Detector and training settings apply at once; collector, store and federation at restart."""
        for section in ("collector", "store", "federation", "control"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("[%s] changed; it takes effect at the next restart", section)
        self.config = new

    # -- sampling and windows ----------------------------------------------------------

    def _sample(self, now: float) -> dict[str, float]:
        start = time.perf_counter()
        sample = self.collector.sample(now)
        self.metrics.sample_seconds.observe(time.perf_counter() - start)
        self.metrics.samples.inc()
        return sample

    async def _sample_loop(self) -> None:
        interval = self.config.collector.interval
        next_tick = trio.current_time()
        while True:
            now = time.time()
            if self.blocking:
                sample = await trio.to_thread.run_sync(self._sample, now)
            else:
                sample = self._sample(now)
            self._first_sample.set()
            for w in self.acc.add(now, sample):
                await self._close_window(w)
            next_tick += interval
            behind = trio.current_time() - next_tick
            if behind > interval:  # suspended or overloaded: skip missed ticks, do not burst
                next_tick = trio.current_time() + interval
            await trio.sleep_until(next_tick)

    async def _close_window(self, w: Window) -> None:
        label = await trio.to_thread.run_sync(self.store.add, w)
        self.metrics.stored.set(self.store.count())
        await self._score(w, label)
        if self.config.federation.enabled:
            await self._write_training_data()

    async def _score(self, w: Window, label: str | None) -> None:
        await self._follow_federated_training(time.time())
        if self.disturbances.covers(w.start, w.end):
            self.metrics.windows.labels("disturbed").inc()
            log.info("window %s closed (%d samples): the daemon was training or installing a model during it; "
                     "not scored, not training data", _iso(w.start), w.n_samples)
            return
        det = self.detector
        if det is None:
            self.metrics.windows.labels("unscored").inc()
            log.info("window %s closed (%d samples, label %s); no model yet", _iso(w.start), w.n_samples, label)
            return
        row, missing = feature_row(w.features, det.feature_names)
        if missing > self.config.detector.max_missing_features * det.n_features:
            self.metrics.windows.labels("unscored").inc()
            log.warning("window %s lacks %d of the model's %d features; not scored",
                        _iso(w.start), missing, det.n_features)
            return
        start = time.perf_counter()
        score = float(det.score(row)[0])
        self.metrics.score_seconds.observe(time.perf_counter() - start)
        anomalous = score > det.threshold
        await trio.to_thread.run_sync(self.store.set_score, w.start, score, anomalous, self.model_info.get("id", ""))
        self.metrics.score.set(score)
        self.metrics.anomalous.set(int(anomalous))
        self.metrics.windows.labels("anomalous" if anomalous else "normal").inc()
        log.info("window %s: score %.6g, threshold %.6g: %s%s", _iso(w.start), score, det.threshold,
                 "ANOMALOUS" if anomalous else "normal", f" (label {label})" if label else "")
        was = self.node.anomalous
        self.node.confirm = self.config.detector.confirm  # a reload may change it
        node = self.node.update(anomalous)
        self.metrics.node_anomalous.set(int(node))
        if node != was:
            log.warning("the node is now %s (%d %s windows in a row)", "ANOMALOUS" if node else "normal",
                        self.node.confirm, "anomalous" if node else "normal")
            if self.config.detector.on_change_command:
                assert self._nursery is not None
                self._nursery.start_soon(self._run_hook, node, score, det.threshold, w.start)

    async def _run_hook(self, anomalous: bool, score: float, threshold: float, start: float) -> None:
        argv = shlex.split(self.config.detector.on_change_command)
        env = {**os.environ, "SHOAL_ANOMALOUS": str(int(anomalous)), "SHOAL_SCORE": repr(score),
               "SHOAL_THRESHOLD": repr(threshold), "SHOAL_WINDOW_START": repr(start)}
        try:
            with trio.fail_after(HOOK_TIMEOUT):
                proc = await trio.run_process(argv, env=env, check=False)
            if proc.returncode != 0:
                raise OSError(f"exit status {proc.returncode}")
        except (OSError, trio.TooSlowError) as exc:
            self.metrics.hook_failures.inc()
            log.error("on_change_command %r failed: %s", argv[0] if argv else "", exc or "timed out")

    async def _write_training_data(self) -> None:
        def write() -> None:
            windows = self.store.training(self.config.training.max_windows)
            try:
                features = selected_features(windows, self.config.training.features,
                                             self.config.training.exclude_features)
            except ModelError as exc:  # the node has none of [training] features (yet): nothing to offer
                log.error("federated training data not written: %s", exc)
                return
            X, names = training_matrix(windows, features)
            atomic_write(self.train_npz, encode_training_npz(X, names))

        await trio.to_thread.run_sync(write)

    # -- models ----------------------------------------------------------------------

    @asynccontextmanager
    async def _disturbing(self, what: str):
        """Mark the time the body runs (plus SETTLE_SECONDS) as the daemon's own disturbance."""
        self.disturbances.begin(time.time())
        try:
            yield
        finally:
            start, end = self.disturbances.end(time.time(), SETTLE_SECONDS)
            with trio.CancelScope(shield=True):
                n = await trio.to_thread.run_sync(self.store.label, start, end, DISTURBED_LABEL)
            log.info("%s: windows from %s to %s labelled %s (%d stored so far)", what, _iso(start), _iso(end),
                     DISTURBED_LABEL, n)

    async def _follow_federated_training(self, now: float) -> None:
        """Read the ClientApp's training mark (fed/training.json) if it changed: a fit in
        progress is an open disturbance, a finished one is closed at its end + SETTLE_SECONDS
        and the windows it disturbed are labelled. A fit whose process is gone, or that has
        run for FED_TRAINING_MAX_SECONDS, is over now. A malformed mark is logged and ignored."""
        try:
            st = self.training_mark.stat()
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._mark_seen:
            self._mark_seen = key
            try:
                start, pid, end = decode_training_mark(self.training_mark.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("ignoring the federated training mark %s: %s", self.training_mark, exc)
                self._mark_open = None
                return
            if end is None:
                self._mark_open = (start, pid)
                self.disturbances.put("federated", start, None)
                log.info("federated round: local training since %s (pid %d); its windows are not scored",
                         _iso(start), pid)
                return
            self._mark_open = None
            await self._federated_training_over(start, end)
        elif self._mark_open is not None:
            start, pid = self._mark_open
            if not _alive(pid) or now - start > FED_TRAINING_MAX_SECONDS:
                self._mark_open = None
                log.warning("federated round: the local training since %s (pid %d) did not say it ended; "
                            "taken as over", _iso(start), pid)
                await self._federated_training_over(start, now)

    async def _federated_training_over(self, start: float, end: float) -> None:
        start, until = self.disturbances.put("federated", start, end, SETTLE_SECONDS)
        with trio.CancelScope(shield=True):
            n = await trio.to_thread.run_sync(self.store.label, start, until, DISTURBED_LABEL)
        log.info("federated round: local training from %s to %s; windows to %s labelled %s (%d stored so far)",
                 _iso(start), _iso(end), _iso(until), DISTURBED_LABEL, n)

    def _load_startup_model(self) -> None:
        if not self.model_path.exists():
            log.info("no model yet (%s); windows are stored unscored until one is trained or federated",
                     self.model_path)
            return
        try:
            self._accept(Detector.load(self.model_path), "startup")
        except ModelError as exc:
            self.metrics.model_installs.labels("startup", "refused").inc()
            log.error("not using the stored model: %s", exc)

    async def node_features(self) -> list[str]:
        """The window features this node has now: what its collector declares (every present
        source's metrics, as ``:mean``/``:std``), known from the first sample on, so a model
        is checked against them even before any window is stored."""
        if not self.collector.sampled:
            with trio.move_on_after(FIRST_SAMPLE_TIMEOUT):
                await self._first_sample.wait()
        return self.collector.declared_features()

    async def _check_fit(self, det: Detector) -> None:
        """Refuse a model whose features this node does not have."""
        have = set(await self.node_features())
        missing = [n for n in det.feature_names if n not in have]
        if len(missing) > self.config.detector.max_missing_features * det.n_features:
            example = f" (e.g. {missing[0]!r})" if missing else ""
            raise ModelError(f"model mismatch: {det.source} expects {det.n_features} features and this node "
                             f"lacks {len(missing)} of them{example}; `shoal telemetry features` lists the "
                             f"node's {len(have)}")

    def _accept(self, det: Detector, origin: str) -> None:
        self.detector = det
        meta = det.metadata
        self.model_info = {
            "id": f"{meta.get('shoal.origin', origin)}:{int(time.time())}",
            "origin": meta.get("shoal.origin", origin), "run_id": meta.get("shoal.run_id"),
            "features": det.n_features, "threshold": det.threshold, "installed": time.time(),
        }
        self.metrics.threshold.set(det.threshold)
        self.metrics.model_features.set(det.n_features)
        self.metrics.model_installed.set(self.model_info["installed"])
        self.metrics.model_installs.labels(origin, "ok").inc()
        self.node = NodeVerdict(self.config.detector.confirm)  # a new model judges afresh
        self.metrics.node_anomalous.set(0)
        log.info("model installed (%s): %d features, threshold %.6g", origin, det.n_features, det.threshold)

    async def _install_candidate(self, origin: str, data: bytes | None = None, name: str = "") -> Detector:
        """Load candidate.onnx (or ``data``, the file ``name`` of the user's); if it fits, make
        it model.onnx and run it. Raises ModelError, naming the user's file, not ours."""
        try:
            if data is None:
                det = await trio.to_thread.run_sync(Detector.load, self.candidate_path)
            else:
                det = await trio.to_thread.run_sync(partial(Detector.from_bytes, data, source=name or "(rpc)"))
            await self._check_fit(det)
        except ModelError as exc:
            self.metrics.model_installs.labels(origin, "refused").inc()
            log.error("model refused (%s); the previous model keeps running: %s", origin, exc)
            self.candidate_path.unlink(missing_ok=True)
            raise
        if data is not None:
            await trio.to_thread.run_sync(partial(atomic_write, self.candidate_path, data))
        os.replace(self.candidate_path, self.model_path)
        self._accept(det, origin)
        return det

    async def _install_global(self, data: bytes) -> None:
        async with self.model_lock, self._disturbing("federated install"):
            try:
                weights, meta = decode_model_npz(data)
            except ValueError as exc:
                self.metrics.model_installs.labels("federated", "refused").inc()
                log.error("federated model refused: %s", exc)
                return
            t = self.config.training
            try:
                windows = await trio.to_thread.run_sync(self.store.training, t.max_windows)
                res = await trio.to_thread.run_sync(partial(
                    model_from_global, weights, [str(f) for f in meta["features"]], windows, self.candidate_path,
                    percentile=t.percentile, run_id=int(meta.get("run_id", 0)), scale_margin=t.scale_margin,
                    threshold_factor=t.threshold_factor))
            except (ModelError, ValueError) as exc:
                self.metrics.model_installs.labels("federated", "refused").inc()
                log.error("federated model of run %s refused: %s", meta.get("run_id"), exc)
                return
            try:
                await self._install_candidate("federated")
            except ModelError:
                return
            atomic_write(self.installed_file, json.dumps(
                {"run_id": int(meta.get("run_id", 0)), "round": int(meta.get("round", 0))}).encode())
            log.info("federated run %s round %s installed: own threshold %.6g from %d windows",
                     meta.get("run_id"), meta.get("round"), res.threshold, res.windows)

    def installed_run(self) -> tuple[int, int] | None:
        try:
            d = json.loads(self.installed_file.read_bytes())
            return int(d["run_id"]), int(d["round"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _watch_global(self) -> None:
        """Install fed/global.npz whenever the ClientApp (or catch-up) writes a new one."""
        while True:
            try:
                st = self.global_npz.stat()
                key = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                key = None
            if key is not None and key != self._global_seen:
                self._global_seen = key
                data = await trio.to_thread.run_sync(self.global_npz.read_bytes)
                try:
                    _, meta = decode_model_npz(data)
                    run = (int(meta.get("run_id", 0)), int(meta.get("round", 0)))
                except ValueError:
                    run = None
                if run is None or run != self.installed_run():
                    await self._install_global(data)
            await trio.sleep(1.0)

    async def _catch_up_loop(self) -> None:
        fed = self.config.federation
        addr = ListenAddr.parse(fed.fedserver)
        token = self.fed_token
        failing = False
        while True:
            try:
                async with await connect_tcp(addr, token=token, timeout=10.0) as client:
                    latest = await client.call("latest", {}, timeout=30.0)
                failing = False
                if latest:
                    installed = self.installed_run()
                    if installed is None or installed[0] != int(latest["run_id"]):
                        log.info("catching up with federated run %s", latest["run_id"])
                        await trio.to_thread.run_sync(atomic_write, self.global_npz, latest["model"])
            except (OSError, RpcError, KeyError, TypeError, ValueError) as exc:
                if not failing:
                    log.warning("cannot reach the fedserver at %s for catch-up: %s", addr, exc)
                failing = True
            await trio.sleep(fed.catch_up_interval)

    async def _run_supernode(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        fed = self.config.federation
        exe = flower_exe("flower-supernode")

        def argv() -> list[str]:
            port = fed.supernode_port or free_port("127.0.0.1")
            a = [exe, "--superlink", str(fed.superlink), "--host", "127.0.0.1", "--port", str(port),
                 "--node-config", f'data="{self.train_npz}" model-out="{self.global_npz}" '
                                  f'training-mark="{self.training_mark}"']
            if fed.root_certificates:
                a += ["--root-certificates", fed.root_certificates]
            else:
                a.append("--insecure")
            if fed.auth_private_key:
                a += ["--auth-supernode-private-key", fed.auth_private_key]
            return a

        home = self.ctx.state_dir / "flwr-home"  # Flower caches apps here; never the (read-only) $HOME
        home.mkdir(mode=0o700, exist_ok=True)
        await supervise("flower-supernode", argv, env=flower_env({"FLWR_HOME": str(home)}),
                        log_path=self.ctx.state_dir / "supernode.log",
                        on_restart=self.metrics.supernode_restarts.inc, task_status=task_status)

    # -- control RPC ---------------------------------------------------------------------

    @rpc_method("status", Status)
    async def rpc_status(self, params: Status) -> dict:
        rows = await trio.to_thread.run_sync(self.store.recent, params.windows)
        return {
            "model": self.model_info or None,
            "federated_run": self.installed_run(),
            "stored": self.store.count(),
            "sources": [s.name for s in self.collector.sources],
            "absent": self.collector.absent,
            "window": self.config.collector.window,
            "open_window": {"start": self.acc.open_start, "samples": self.acc.open_samples},
            "windows": [{"start": w.start, "end": w.end, "samples": w.n_samples, "features": len(w.features),
                         "label": w.label, "score": w.score, "anomalous": w.anomalous} for w in rows],
        }

    @rpc_method("label", Label)
    async def rpc_label(self, params: Label) -> dict:
        try:
            n = await trio.to_thread.run_sync(self.store.label, params.start, params.end, params.label)
        except ValueError as exc:
            raise RpcError("bad_label", str(exc)) from None
        return {"windows": n}

    @rpc_method("train", Train)
    async def rpc_train(self, params: Train) -> dict:
        t = self.config.training
        epochs = t.epochs if params.epochs is None else params.epochs
        lr = t.lr if params.lr is None else params.lr
        batch = t.batch_size if params.batch_size is None else params.batch_size
        async with self.model_lock, self._disturbing("training"):
            windows = await trio.to_thread.run_sync(self.store.training, t.max_windows)
            try:
                res = await trio.to_thread.run_sync(partial(
                    train_local, windows, self.candidate_path, epochs=epochs, batch_size=batch, lr=lr,
                    percentile=t.percentile, min_windows=t.min_windows, min_steps=t.min_steps, folds=t.folds,
                    prefixes=t.features, exclude=t.exclude_features, scale_margin=t.scale_margin,
                    threshold_factor=t.threshold_factor))
                await self._install_candidate("local")
            except ModelError as exc:
                raise RpcError("train_failed", str(exc)) from None
        return {"windows": res.windows, "features": res.features, "threshold": res.threshold, "loss": res.loss}

    @rpc_method("install", Install)
    async def rpc_install(self, params: Install) -> dict:
        try:
            data = self.uploads.add(params, time.monotonic())
        except RpcError:
            self.metrics.model_installs.labels("rpc", "refused").inc()
            raise
        if isinstance(data, dict):  # more chunks to come
            return data
        async with self.model_lock, self._disturbing("install"):
            try:
                name = "".join(c if c.isprintable() else "?" for c in params.name)  # one log line, one error line
                det = await self._install_candidate("rpc", data, name)
            except ModelError as exc:
                raise RpcError("model_refused", str(exc)) from None
        return {"features": det.n_features, "threshold": det.threshold}

    @rpc_method("features", Features)
    async def rpc_features(self, params: Features) -> dict:
        names = [n for n in await self.node_features() if n.startswith(params.prefix)]
        page = names[params.offset:params.offset + MAX_FEATURES_PAGE]
        model = set(self.detector.feature_names) if self.detector is not None else set()
        return {"features": page, "total": len(names), "offset": params.offset,
                "in_model": [n in model for n in page]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def make_app(ctx: DaemonContext) -> TelemetryApp:
    return TelemetryApp(ctx)


def check_config(cfg: TelemetryConfig) -> None:
    """What `shoal config check` checks beyond the schema: the fedserver token file."""
    read_token(cfg.federation.token_file, "federation.token_file")


__all__ = ["TelemetryApp", "make_app", "check_config"]
