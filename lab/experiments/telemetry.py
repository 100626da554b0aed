"""The telemetry experiment (seed 000): a FedAvg round across the lab, then a fault flagged on one host only.

Theory of operation
-------------------
The scenario runs the fedserver on one host (the federation server; it runs
no telemetry daemon) and a telemetry daemon on every other host, with short
windows (``[host.config.telemetry.collector] window``). The render gives the
fedserver a CA, a certificate for its lab address, every node's SuperNode key
in its ``authorized_keys``, and the nodes the CA and their keys, so Flower
runs off loopback over TLS with SuperNode authentication, through the
fedserver's Fleet-only proxy. The experiment:

1. labels everything before it ``lab-start`` on every node (the lab's own
   start-up, every daemon importing onnxruntime and Flower, is not normal
   operation), then waits for ``normal_windows`` new windows on every node;
2. trains each node's own model (``shoal telemetry train``, the seed's
   per-node baseline) and lets it score ``steady_windows`` windows, so the
   nodes run as they will with the global model (windows scored; each
   daemon's /metrics page, which Prometheus scrapes across the node's link,
   is as large as then) and the windows the global model is fitted on
   include that state;
3. runs ``shoal fed run --rounds R`` on the fedserver's host (its RPC on the
   lab address, with the shared token), its windows labelled ``fedavg-run``
   (a Flower process per message on every node is not the steady state
   either), and waits until every node reports that run's model (``status``:
   origin federated, run id). It checks the weights *bit for bit*: the
   autoencoder inside each node's running ``model.onnx`` against the
   fedserver's global ``latest.npz`` (each node keeps its own scaler and
   threshold, as in the seed); and that the nodes' port refuses the Control
   API (403) from a lab host;
4. lets every node score ``baseline_windows`` windows with the global model;
5. applies the fault on ``fault_host``: a TCP stream from that host to an
   echo sink on the fedserver's host, ``fault_rate`` MiB/s on average in
   one pulse a second, for ``fault_seconds``, labelled ``net-fault`` on that
   node first (as ``shoal telemetry inject --label`` does);
6. waits ``after_windows`` more windows, then reads each daemon's verdicts
   from its own ``/metrics`` (``shoal_telemetry_windows_total{result}``
   before and after the fault) and its stored windows (``status``) for the
   table and the plot. For every window it also says what share of the
   score came from the host's own features (``net_*``), recomputed with the
   node's model from its store: a window flagged because of this machine's
   shared CPU, memory or disk shows a small share.

**Why a network fault.** Every lab host shares this machine's CPUs, memory and
disks, and the collector reads the machine-wide ``/proc/stat``,
``/proc/meminfo`` and ``/proc/diskstats``: a CPU, memory or disk fault on one
host is seen by every host's collector, so "flagged there and nowhere else"
could not hold for a true reason. ``/proc/net/dev`` is per network namespace:
the stream crosses only the fault host's interface among the monitored hosts
(its other end is the fedserver's host, which runs no telemetry daemon), and
its pacing keeps its CPU cost, which every host would see, small. The
detector's score is the mean over every feature, and most features are the
machine's: when this machine's load, memory or disk swings (other work on
it), every node's score moves together and may cross its threshold. The
check "nowhere else" then fails, and says so with the own-feature share;
nothing here filters those windows out. The cgroup's pressure (PSI) is such a
machine feature too: the time the host's tasks waited for the shared cores and
disk (the shipped scenario excludes it). ``machine_load`` loads every core and
the disk from outside the lab's hosts at the fault's start, to show that.
``shoal telemetry inject net`` would not do: it sends through loopback, which
the collector leaves out, and its CPU load is machine-wide.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import ssl
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from shoal.core.telemetry.formats import decode_model_npz
from shoal.daemons.runtime.config import load_config, setting
from shoal.daemons.runtime.registry import DAEMONS
from shoal.daemons.runtime.rpc import connect_unix
from shoal.lab.experiment import Result
from shoal.lab.lab import Lab, LabError
from shoal.protocol.telemetry import Label, Status

__all__ = ["Params", "run"]

MIB = 1 << 20
SINK_PORT = 5201  # the fault's TCP sink on the fedserver's host (iperf's port; no shoal daemon uses it)
CHUNK = 64 << 10
OWN_PREFIX = "net_"  # the collector's features that are the host's own in the lab (its namespace's /proc/net/dev)
# A fault window is flagged *by the fault* if at least this share of its score comes from the host's
# own features (in normal windows they give a few percent: 16 of the ~90 features, near their usual values).
OWN_MIN = 0.2
PULSE = 1.0  # s: the fault's stream sends one pulse of rate * PULSE bytes a second
POLL = 0.5  # s between reads of the daemons' metrics while waiting for windows
FAULT_LABEL = "net-fault"
STARTUP_LABEL = "lab-start"
FEDAVG_LABEL = "fedavg-run"
LONG = 86_400.0  # s: an open-ended label range, closed by a later label

# The sink: echoes what a connection sends (so the stream loads both directions of the
# fault host's link); killed after the fault.
SINK = """\
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = srv.accept()
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
"""

REASON = ("network traffic on one host's interface: /proc/net/dev is per network namespace, so only that "
          "host's collector sees it (the stream's other end, the fedserver's host, runs no telemetry daemon); "
          "CPU, memory and disk faults would not do, because every lab host's collector reads this machine's "
          "shared /proc/stat, /proc/meminfo and /proc/diskstats")


@dataclass(frozen=True, slots=True)
class Params:
    normal_windows: int = setting(10, min=1, max=100_000, help="windows every node stores before the FedAvg run")
    steady_windows: int = setting(4, min=1, max=100_000,
                                  help="windows scored with each node's own model before the FedAvg run")
    rounds: int = setting(1, min=1, max=100, help="FedAvg rounds of the run")
    baseline_windows: int = setting(2, min=1, max=10_000, help="windows scored with the global model before the fault")
    fault_host: str = setting("", help="the host whose link carries the fault; empty: the last telemetry host")
    fault_seconds: float = setting(10.0, min=1.0, max=3600.0, help="s of the fault's traffic")
    fault_rate: float = setting(1.0, min=0.01, max=1000.0, help="MiB/s of the fault's paced TCP stream")
    after_windows: int = setting(2, min=1, max=10_000, help="windows scored after the fault before the verdicts")
    machine_load: float = setting(0.0, min=0.0, max=3600.0,
                                  help="s of load on every core and the disk from outside the lab's hosts at the "
                                       "fault's start (a shared machine's noise, which no host may flag)")


# -- reading the daemons ---------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples matching ``labels`` on a /metrics page (NaN if there is none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = math.nan
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total = s.value if math.isnan(total) else total + s.value
    return total


@dataclass
class Counts:
    stored: float
    normal: float
    anomalous: float

    @property
    def scored(self) -> float:
        return self.normal + self.anomalous


async def counts(lab: Lab, host: str) -> Counts:
    text = await lab.metrics(host, "telemetry")
    total = "shoal_telemetry_windows_total"
    return Counts(metric(text, "shoal_telemetry_windows_stored"), metric(text, total, result="normal"),
                  metric(text, total, result="anomalous"))


async def status(sock: Path, windows: int = 0) -> dict:
    async with await connect_unix(sock) as client:
        return await client.call("status", Status(windows=windows).encode(), timeout=60.0)


async def label_all(socks: dict[str, Path], start: float, end: float, label: str | None) -> None:
    """Label [start, end) on every node of ``socks`` (``shoal telemetry label``'s RPC, without a process start)."""
    for sock in socks.values():
        async with await connect_unix(sock) as client:
            await client.call("label", Label(start=start, end=end, label=label).encode(), timeout=60.0)


async def wait_counts(lab: Lab, hosts: list[str], done: Any, what: str, timeout: float) -> dict[str, Counts]:
    """Poll every host's metrics until ``done(host, counts)`` holds for all of them."""
    deadline = trio.current_time() + timeout
    shown = 0.0
    while True:
        now = {h: await counts(lab, h) for h in hosts}
        if all(done(h, c) for h, c in now.items()):
            return now
        if trio.current_time() > deadline:
            late = ", ".join(f"{h} ({c.stored:.0f} stored, {c.scored:.0f} scored)" for h, c in now.items()
                             if not done(h, c))
            raise LabError(f"{what}: not reached in {timeout:.0f}s by {late}")
        if trio.current_time() - shown > 5:
            shown = trio.current_time()
            lab.progress(f"{what}: " + ", ".join(f"{h} {c.stored:.0f} stored/{c.scored:.0f} scored"
                                                  for h, c in now.items()))
        await trio.sleep(POLL)


def onnx_weights(path: Path) -> list[np.ndarray]:
    """The autoencoder weights inside a node's model file (W0, b0, W1, b1, ... as build_onnx names them)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    layers = sum(1 for name in inits if re.fullmatch(r"W\d+", name))
    return [inits[f"{kind}{i}"] for i in range(layers) for kind in ("W", "b")]


def own_shares(state_dir: Path, n: int) -> dict[float, tuple[float, list[str]]]:
    """Window start -> (the share of its score from the host's own features (``net_*``), its top features).

    The top features are the three with the largest share of the window's score, as
    ``name:share``: what made a window score high, for the table and a failed check.

    Each lab host's collector reads its own /proc/net/dev but this machine's CPU, memory, load and
    disk: this says which of the two made a window score high. The score's terms are recomputed
    with the node's running model (its scaler, the weights in numpy, as the detector does in
    onnxruntime to about 1e-6), from the windows in its store (read, never written).
    """
    from shoal.core.telemetry.model import Autoencoder, Detector
    from shoal.daemons.telemetry.store import WindowStore
    from shoal.daemons.telemetry.trainer import feature_row

    det = Detector.load(state_dir / "model.onnx")
    ae = Autoencoder.from_weights(onnx_weights(state_dir / "model.onnx"))
    own = np.array([name.startswith(OWN_PREFIX) for name in det.feature_names])
    store = WindowStore(state_dir / "windows.db")
    try:
        windows = store.recent(n)
    finally:
        store.close()
    shares = {}
    for w in windows:
        x = det.scale(feature_row(w.features, det.feature_names)[0])
        err = ((ae.reconstruct(x) - x) ** 2)[0]
        total = float(err.sum())
        top = [f"{det.feature_names[i]}:{err[i] / total:.0%}" for i in np.argsort(err)[::-1][:3]] if total > 0 else []
        shares[w.start] = (float(err[own].sum()) / total if total > 0 else 0.0, top)
    return shares


def digest(weights: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(w, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- the fault --------------------------------------------------------------------------------


async def connect_when_listening(lab: Lab, host: str, address: str, port: int,
                                 timeout: float = 20.0) -> trio.SocketStream:
    with trio.fail_after(timeout):
        while True:
            try:
                return await lab.connect(host, address, port)
            except OSError:  # the sink (another process) is not listening yet
                await trio.sleep(0.1)


async def paced_stream(stream: trio.SocketStream, seconds: float, rate: float) -> tuple[int, int]:
    """Send zeros at ``rate`` MiB/s for ``seconds`` and read the echo back; -> (bytes sent, bytes echoed).

    The stream comes in pulses: each ``PULSE`` seconds, a pulse's bytes as fast as the link takes
    them, then silence. A window then sees the rate swing as well as rise (both the mean and the
    std of every net feature move), as a bursty transfer does.
    """
    chunk = bytes(CHUNK)
    per_pulse = max(1, round(rate * MIB * PULSE / CHUNK))
    start = trio.current_time()
    sent = received = 0

    async def send() -> None:
        nonlocal sent
        pulse = 0
        while True:
            await trio.sleep_until(start + pulse * PULSE)  # pacing, not synchronisation: the stream's rate
            for _ in range(per_pulse):
                await stream.send_all(chunk)
                sent += len(chunk)
            pulse += 1

    async def receive() -> None:
        nonlocal received
        while data := await stream.receive_some(1 << 16):
            received += len(data)

    with trio.move_on_at(start + seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
    return sent, received


async def machine_load(seconds: float, scratch: Path) -> None:
    """For ``seconds``, spin every core and rewrite and fsync 4 MiB of a file in ``scratch`` (the
    disk busy, the file bounded), in processes of the lab's own (in no lab host's cgroup or namespace).

    The noise of a shared machine (another user's job starting): every host's machine-wide
    features and its cgroup's pressure (its tasks waited for the cores and the disk) move; its
    own interface and CPU time do not.
    """
    end = f"import os, time\nend = time.monotonic() + {seconds!r}\n"
    spin = end + "while time.monotonic() < end: pass"
    write = end + (f"with open({str(scratch / 'machine-load')!r}, 'wb') as f:\n"
                   "    while time.monotonic() < end:\n"
                   "        f.seek(0); f.write(bytes(4 << 20)); f.flush(); os.fsync(f.fileno())\n")
    try:
        async with trio.open_nursery() as nursery:
            for code in [write] + [spin] * (os.cpu_count() or 1):
                nursery.start_soon(partial(trio.run_process, [sys.executable, "-c", code]))
    finally:
        (scratch / "machine-load").unlink(missing_ok=True)


async def https_status(lab: Lab, host: str, address: str, port: int, path: str, ca: str) -> int:
    """The HTTP status of a bodiless POST to ``path`` over TLS (verified against ``ca``), sent from ``host``."""
    tls = trio.SSLStream(await lab.connect(host, address, port), ssl.create_default_context(cafile=ca),
                         server_hostname=address)
    async with tls:
        await tls.send_all(f"POST {path} HTTP/1.1\r\nHost: {address}:{port}\r\nContent-Type: application/protobuf"
                           "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head and len(head) < 4096:
            data = await tls.receive_some(4096)
            if not data:
                break
            head += data
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    if m is None:
        raise LabError(f"https://{address}:{port}{path} from {host}: no HTTP status line ({head[:60]!r})")
    return int(m.group(1))


# -- the experiment ---------------------------------------------------------------------------


async def run(lab: Lab, params: Params) -> Result:
    res = Result()
    s = lab.scenario
    feds = [h.name for h in s.running("fedserver")]
    nodes = [h.name for h in s.running("telemetry")]
    if len(feds) != 1 or len(nodes) < 2:
        raise LabError(f"{s.source}: the telemetry experiment needs one fedserver host and two or more telemetry "
                       f"hosts (found {len(feds)} and {len(nodes)})")
    fed = feds[0]
    if fed in nodes:
        raise LabError(f"{s.source}: host {fed!r} runs the fedserver and a telemetry daemon; the fault's traffic "
                       "ends there, so it must run no telemetry daemon")
    fault = params.fault_host or nodes[-1]
    if fault not in nodes:
        raise LabError(f"{s.source}: experiment.params.fault_host: {fault!r} runs no telemetry daemon")
    schema = DAEMONS["telemetry"].load_schema()
    cfgs = {h: load_config(lab.bundle.plan(h, "telemetry").config, schema) for h in nodes}
    socks = {h: Path(c.control.socket or Path(lab.daemons[(h, "telemetry")].env["STATE_DIRECTORY"]) / "control.sock")
             for h, c in cfgs.items()}
    window = max(c.collector.window for c in cfgs.values())
    fed_plan = lab.bundle.plan(fed, "fedserver")
    fed_rpc = fed_plan.ports["rpc"]
    fed_token = str(lab.bundle.token("fedserver", fed))
    fed_state = Path(lab.daemons[(fed, "fedserver")].env["STATE_DIRECTORY"])
    fleet_addr, _, fleet_port = fed_plan.ports["fleet"].rpartition(":")
    fed_cli = [*lab.shoal, "fed"]
    fed_args = ["--server", fed_rpc, "--token-file", fed_token]
    res.data.update({"nodes": nodes, "fedserver": fed, "fault_host": fault, "window": window, "fault_reason": REASON,
                     "superlink": fed_plan.ports["fleet"],
                     "nodes_dial": sorted({str(c.federation.superlink) for c in cfgs.values()})})

    # 1. normal windows. What came before (the lab's own start: every daemon importing onnxruntime
    # and Flower, Prometheus starting) is not normal operation: labelled, it stays out of training,
    # as the seed's annotations keep maintenance out.
    begun = time.time()
    await label_all(socks, begun - LONG, begun, STARTUP_LABEL)
    stored0 = {h: (await counts(lab, h)).stored for h in nodes}
    await wait_counts(lab, nodes, lambda h, c: c.stored >= stored0[h] + params.normal_windows,
                      f"collecting {params.normal_windows} normal windows of {window:g}s",
                      timeout=params.normal_windows * window * 3 + 60)

    # 2. each node's own model first (the seed's per-node baseline, `shoal telemetry train`), so the
    # nodes then run as they will with the global one (windows scored, the daemons' /metrics pages
    # as large as then: the traffic of Prometheus's scrapes is part of each node's net features),
    # and the windows the global model's scaler and threshold are fitted on include that state.
    local: dict[str, str] = {}

    async def train(h: str) -> None:
        done = await lab.exec(h, [*lab.shoal, "telemetry", "train", "--socket", str(socks[h])], timeout=300.0)
        local[h] = done.stdout.decode().strip()

    async with trio.open_nursery() as nursery:
        for h in nodes:
            nursery.start_soon(train, h)
    res.data["local_models"] = local
    trained = {h: await counts(lab, h) for h in nodes}
    await wait_counts(lab, nodes, lambda h, c: c.scored >= trained[h].scored + params.steady_windows,
                      f"scoring {params.steady_windows} windows with each node's own model",
                      timeout=params.steady_windows * window * 3 + 60)

    # 3. one FedAvg run; every node installs its model
    lab.progress(f"FedAvg: {params.rounds} round(s) over {len(nodes)} nodes, TLS + SuperNode auth via "
                 f"{fed_plan.ports['fleet']}")
    # The run's own load (a Flower process per message on every node, the weights on the wire) is
    # not the steady state the model will watch either: labelled too, so each node fits its scaler
    # and threshold (when it installs the global model) on its normal windows only.
    t = time.monotonic()
    run_start = time.time()
    await label_all(socks, run_start, run_start + LONG, FEDAVG_LABEL)
    out = await lab.exec(fed, [*fed_cli, "run", "--rounds", str(params.rounds), *fed_args], timeout=900.0)
    run_seconds = time.monotonic() - t
    line = out.stdout.decode().strip()
    m = re.match(r"run (\d+): (\d+) rounds, (\S+) nodes, (\d+) features", line)
    if m is None:
        raise LabError(f"shoal fed run: unexpected output {line!r}")
    run_id, n_features = int(m.group(1)), int(m.group(4))
    took_part = int(m.group(3)) if m.group(3).isdigit() else -1
    lab.progress(f"FedAvg run {run_id} done in {run_seconds:.1f}s: {took_part} nodes, {n_features} features")
    fed_status = json.loads((await lab.exec(fed, [*fed_cli, "status", *fed_args])).stdout)
    global_w, global_meta = decode_model_npz((fed_state / "global" / "latest.npz").read_bytes())
    global_digest = digest(global_w)

    installed: dict[str, dict] = {}
    with trio.move_on_after(120) as scope:
        for h in nodes:
            # Polls another process (the daemon installs global.npz within a second of the ClientApp writing it).
            while (st := await status(socks[h]))["federated_run"] is None or st["federated_run"][0] != run_id:  # noqa: ASYNC110
                await trio.sleep(POLL)
            installed[h] = st
    if scope.cancelled_caught:
        missing = [h for h in nodes if h not in installed]
        raise LabError(f"the global model of run {run_id} was not installed in 120s on {', '.join(missing)}")
    install_wall = time.time()
    await label_all(socks, install_wall, run_start + LONG, None)  # the run is over: normal again
    models = {}
    for h in nodes:
        node_w = onnx_weights(Path(lab.daemons[(h, "telemetry")].env["STATE_DIRECTORY"]) / "model.onnx")
        model = installed[h]["model"]
        models[h] = {"origin": model["origin"], "run_id": model["run_id"], "features": model["features"],
                     "threshold": model["threshold"], "weights_sha256": digest(node_w),
                     "weights_identical": len(node_w) == len(global_w) and all(
                         a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(node_w, global_w, strict=False))}
    res.data.update({"run": {"run_id": run_id, "rounds": params.rounds, "nodes": took_part, "features": n_features,
                             "seconds": round(run_seconds, 1), "cli": line, "fedserver_status": fed_status},
                     "global_weights_sha256": global_digest, "models": models})

    fed_metrics = await lab.metrics(fed, "fedserver")
    forwarded = {p: metric(fed_metrics, "shoal_fedserver_proxy_forwarded_total", path=f"/v1/fleet/{p}")
                 for p in ("activate-node", "pull-messages", "push-messages", "get-run", "pull-object")}
    authorized = metric(fed_metrics, "shoal_fedserver_authorized_nodes")
    upstream_errors = metric(fed_metrics, "shoal_fedserver_proxy_upstream_errors_total")
    control = await https_status(lab, nodes[0], fleet_addr, int(fleet_port), "/v1/control/list-runs",
                                 cfgs[nodes[0]].federation.root_certificates)
    res.data["proxy"] = {"forwarded": forwarded, "authorized_nodes": authorized, "upstream_errors": upstream_errors,
                         "control_api_status_from_lan": control}
    res.check("FedAvg over TLS with SuperNode authentication",
              took_part == len(nodes) and authorized == len(nodes) and all(v > 0 for v in forwarded.values())
              and upstream_errors == 0 and fed_status.get("latest", {}).get("run_id") == run_id
              and global_meta["run_id"] == run_id,
              f"run {run_id}: {took_part} of {len(nodes)} nodes, {authorized:.0f} node keys registered, every "
              f"SuperNode request through the TLS proxy at {fed_plan.ports['fleet']} "
              f"({', '.join(f'{p} {v:.0f}' for p, v in forwarded.items())}; {upstream_errors:.0f} upstream errors)")
    res.check("the nodes' port refuses the Control API", control == 403,
              f"POST /v1/control/list-runs over TLS from {nodes[0]}: HTTP {control}")
    bad = [h for h, mo in models.items()
           if not (mo["origin"] == "federated" and mo["run_id"] == str(run_id) and mo["weights_identical"])]
    res.check("every node runs the global model", not bad,
              f"{len(nodes) - len(bad)} of {len(nodes)} nodes run run {run_id}'s weights bit for bit "
              f"(sha256 {global_digest[:12]}), each with its own threshold "
              f"({', '.join(format(mo['threshold'], '.3g') for mo in models.values())})"
              + (f"; not: {', '.join(bad)}" if bad else ""))

    # 4. the sink, then a baseline with the global model (starting the sink's process is a CPU
    # blip every host's collector sees: it must not fall into the fault's windows)
    sink_addr = lab.address(fed)
    sink = await lab.spawn(fed, [sys.executable, "-c", SINK, sink_addr, str(SINK_PORT)], name="fault-sink")
    try:
        stream = await connect_when_listening(lab, fault, sink_addr, SINK_PORT)
        base = {h: await counts(lab, h) for h in nodes}
        await wait_counts(lab, nodes, lambda h, c: c.scored >= base[h].scored + params.baseline_windows,
                          f"scoring {params.baseline_windows} windows with the global model",
                          timeout=params.baseline_windows * window * 3 + 60)

        # 5. the fault, labelled on its node first (as `shoal telemetry inject --label` does)
        start = time.time()
        await label_all({fault: socks[fault]}, start, start + params.fault_seconds, FAULT_LABEL)
        before = {h: await counts(lab, h) for h in nodes}
        lab.progress(f"fault: a {params.fault_rate:g} MiB/s TCP stream from {fault} to {fed} and back for "
                     f"{params.fault_seconds:g}s")
        fault_start = time.time()
        async with stream, trio.open_nursery() as nursery:
            if params.machine_load > 0:
                nursery.start_soon(machine_load, params.machine_load, lab.out)
            sent, echoed = await paced_stream(stream, params.fault_seconds, params.fault_rate)
        fault_end = time.time()
    finally:
        sink.kill()
        with trio.CancelScope(shield=True):
            await sink.wait()
    lab.progress(f"fault over: {sent / MIB:.1f} MiB sent and {echoed / MIB:.1f} MiB echoed back in "
                 f"{fault_end - fault_start:.1f}s")

    # 6. verdicts
    need = math.ceil((fault_end - fault_start) / window) + params.after_windows
    after = await wait_counts(lab, nodes, lambda h, c: c.scored >= before[h].scored + need,
                              f"scoring {need} windows from the fault's start", timeout=need * window * 3 + 60)
    rows: list[dict[str, Any]] = []
    per_host: dict[str, Any] = {}
    for h in nodes:
        st = await status(socks[h], windows=min(1000, int(after[h].stored)))
        shares = await trio.to_thread.run_sync(own_shares, Path(lab.daemons[(h, "telemetry")].env["STATE_DIRECTORY"]),
                                               min(1000, int(after[h].stored)))
        for w in st["windows"]:
            w["own_share"], w["top_features"] = shares.get(w["start"], (None, []))
        wins = sorted((w for w in st["windows"] if w["score"] is not None and w["start"] >= install_wall - window),
                      key=lambda w: w["start"])
        during = [w for w in wins if w["end"] > fault_start and w["start"] < fault_end]
        outside = [w for w in wins if w["end"] <= fault_start or w["start"] >= fault_end]
        d_scored = after[h].scored - before[h].scored
        d_anomalous = after[h].anomalous - before[h].anomalous
        flagged = d_anomalous > 0
        per_host[h] = {"threshold": st["model"]["threshold"], "windows": wins,
                       "metrics": {"scored": d_scored, "anomalous": d_anomalous},
                       "during": len(during), "flagged_during": sum(1 for w in during if w["anomalous"]),
                       "false_alarms_outside": sum(1 for w in outside if w["anomalous"]), "outside": len(outside)}
        rows.append({"host": h, "model": f"run {models[h]['run_id']} {models[h]['weights_sha256'][:10]}",
                     "global": "yes" if models[h]["weights_identical"] else "NO",
                     "fault windows": len(during),
                     "flagged windows": per_host[h]["flagged_during"],
                     "flagged": "yes" if flagged else "no", "expected": "yes" if h == fault else "no",
                     "flagged outside": f"{per_host[h]['false_alarms_outside']}/{per_host[h]['outside']}",
                     "threshold": st["model"]["threshold"],
                     "max score in fault": max((w["score"] for w in during), default=math.nan),
                     "own share in fault": float(np.mean([w["own_share"] for w in during
                                                           if w["own_share"] is not None] or [math.nan]))})
    res.rows = rows
    res.data.update({"fault": {"host": fault, "kind": "tcp-stream", "to": fed, "rate_mib_s": params.fault_rate,
                               "start": fault_start, "end": fault_end, "sent_bytes": sent, "echoed_bytes": echoed,
                               "label": FAULT_LABEL, "windows_counted": need},
                     "hosts": per_host})
    span = f"the {need} windows closed from the fault's start ({fault_end - fault_start:.1f}s, {window:g}s windows)"
    def share(h: str) -> float:
        """The mean own-feature share of ``h``'s flagged windows around the fault."""
        fl = [w["own_share"] for w in per_host[h]["windows"] if w["anomalous"] and w["own_share"] is not None
              and w["end"] > fault_start and w["start"] < fault_end + params.after_windows * window]
        return float(np.mean(fl)) if fl else math.nan

    def tops(h: str) -> str:
        """The top features of ``h``'s flagged windows around the fault, for a failed check."""
        return "; ".join(" ".join(w["top_features"]) for w in per_host[h]["windows"] if w["anomalous"]
                         and w["end"] > fault_start and w["start"] < fault_end + params.after_windows * window)

    fh = per_host[fault]
    by_fault = [w for w in fh["windows"] if w["anomalous"] and w["end"] > fault_start and w["start"] < fault_end
                and (w["own_share"] or 0.0) >= OWN_MIN]
    res.check(f"the fault is flagged on {fault}", fh["metrics"]["anomalous"] > 0 and bool(by_fault),
              f"{fh['metrics']['anomalous']:.0f} of {fh['metrics']['scored']:.0f} of {span} anomalous in its "
              f"/metrics; {fh['flagged_during']} of its {fh['during']} stored windows overlapping the fault "
              f"(its own features: {share(fault):.0%} of the flagged scores; {len(by_fault)} flagged with at least "
              f"{OWN_MIN:.0%} from them)")
    others = [h for h in nodes if h != fault]
    noisy = [h for h in others if per_host[h]["metrics"]["anomalous"] > 0 or per_host[h]["flagged_during"] > 0]
    res.check("the fault is flagged nowhere else", not noisy,
              f"{len(others) - len(noisy)} of {len(others)} other nodes flagged none of {span}"
              + ("; flagged on " + ", ".join(f"{h} (its own features: {share(h):.0%} of those scores; top features: "
                                             f"{tops(h)})" for h in noisy) if noisy else "")
              + f" (why only there: {REASON})")
    # For the record, not a check: the share of each node's scores owed to its network features
    # during the fault. With models over the node's own features only ([training] features), that
    # share is large on every node, so it says nothing of where the fault's traffic went.
    def reach(h: str) -> float:
        return max((w["own_share"] or 0.0 for w in per_host[h]["windows"]
                    if w["end"] > fault_start and w["start"] < fault_end), default=0.0)

    res.data["net_share_during_fault"] = {h: reach(h) for h in nodes}
    res.plots.append(plot(lab, nodes, per_host, fault, fault_start, fault_end, run_id))
    res.series = {"window_score": "shoal_telemetry_window_score",
                  "window_anomalous": "shoal_telemetry_window_anomalous",
                  "threshold": "shoal_telemetry_threshold"}
    return res


def plot(lab: Lab, nodes: list[str], per_host: dict[str, Any], fault: str, start: float, end: float,
         run_id: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert lab.out is not None
    fig, axes = plt.subplots(len(nodes), 1, sharex=True, figsize=(8, 1.8 * len(nodes) + 1), squeeze=False)
    for ax, h in zip(axes[:, 0], nodes, strict=True):
        wins = per_host[h]["windows"]
        x = np.array([(w["start"] + w["end"]) / 2 - start for w in wins])
        y = np.array([w["score"] for w in wins])
        bad = np.array([bool(w["anomalous"]) for w in wins], dtype=bool)
        ax.axvspan(0, end - start, color="tab:red", alpha=0.15, label="fault" if h == nodes[0] else None)
        ax.plot(x, y, "-", color="tab:blue", lw=1)
        ax.plot(x[~bad], y[~bad], "o", color="tab:blue", ms=3)
        ax.plot(x[bad], y[bad], "o", color="tab:red", ms=4, label="anomalous" if h == nodes[0] else None)
        ax.axhline(per_host[h]["threshold"], color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{h}{' (fault)' if h == fault else ''}", fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=7)
    axes[0, 0].set_title(f"window score per node, FedAvg run {run_id}'s model (dashed: the node's threshold)",
                         fontsize=9)
    axes[-1, 0].set_xlabel("s from the fault's start (window midpoints)")
    fig.tight_layout()
    path = lab.out / "telemetry_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
