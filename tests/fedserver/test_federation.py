"""On loopback, secured as off loopback: a fedserver and 3 telemetry daemons run
Flower's real processes (SuperLink, SuperNodes, ServerApp and ClientApp
processes) over TLS with SuperNode authentication, complete a FedAvg round,
and every node installs the global model with its own threshold. The nodes
reach the SuperLink only through the fedserver's Fleet-only proxy (the
SuperLink itself listens on another loopback port), which refuses the
Control API with 403. A fourth
node whose key the fedserver does not know is refused by the SuperLink and
takes no part in the run; it still catches up afterwards through the
fedserver's RPC (a separate channel, token-protected off loopback).

Certificates and keys are made fresh in the test's tmp directory
(tests/fedserver/certs.py). Only the secure mode is tested here: it is the
one that matters off loopback, and the insecure loopback mode differs only
in the ``--insecure`` flags.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest
import trio

from shoal.core.telemetry.model import Detector
from shoal.daemons.fedserver.certs import make_node_key, make_tls
from shoal.daemons.fedserver.config import FedserverConfig
from shoal.daemons.fedserver.flowerapp import common_features, load_model_npz
from shoal.daemons.runtime.config import ConfigError, parse_config
from shoal.daemons.runtime.rpc import connect_tcp
from shoal.daemons.runtime.supervise import STABLE, next_delay
from shoal.daemons.telemetry.config import TelemetryConfig
from tests.harness import start_daemon
from tests.telemetry.conftest import keep_ticking, start_telemetry, wait_status, write_config
from tests.telemetry.fakeroot import FakeNode
from tests.telemetry.test_daemon import metric, scrape

FEDSERVER = """
[daemon]
log_level = "debug"
metrics_listen = "127.0.0.1:0"
stop_timeout = 10.0

[superlink]
listen = "127.0.0.1:0"
ssl_certfile = "{tls[cert]}"
ssl_keyfile = "{tls[key]}"
ssl_ca_certfile = "{tls[ca]}"
supernode_auth = true
authorized_keys = "{keys}"

[rpc]
listen = "127.0.0.1:0"

[federation]
rounds = 1
local_epochs = 2
lr = 0.001
batch_size = 8
min_nodes = 3
wait_nodes = 60.0
round_timeout = 60.0
"""


def processes_under(paths: list[Path]) -> list[int]:
    """Pids of processes whose command line names one of ``paths`` (Flower children)."""
    pids = set()
    for p in paths:
        out = subprocess.run(["pgrep", "-f", str(p)], capture_output=True, text=True).stdout
        pids |= {int(x) for x in out.split()}
    return sorted(pids - {os.getpid()})


async def test_three_nodes_complete_a_fedavg_round_over_tls_and_an_unknown_node_is_refused(tmp_path, monkeypatch):
    # Flower's SuperExecs look for work every second by default; every Flower process
    # the daemons start inherits this. (SuperNodes still poll the SuperLink every 3 s:
    # that is hard-wired in Flower 1.41.)
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    tls = make_tls(tmp_path / "pki")
    keys = [make_node_key(tmp_path / "pki", f"node{i}") for i in range(4)]
    # Nodes 0-2 are authorised; node 3's key is not in the file. A garbage line is
    # logged and counted, and does not stop the fedserver.
    (tmp_path / "nodes.pub").write_text("# the fleet\n" + "".join(pub.read_text() for _, pub in keys[:3])
                                        + "ecdsa-sha2-nistp384 not-a-key garbage\n")
    (tmp_path / "fed.toml").write_text(FEDSERVER.format(tls=tls, keys=tmp_path / "nodes.pub"))
    state_dirs: list[Path] = []
    try:
        await federate(tmp_path, state_dirs, tls["ca"], [private for private, _ in keys])
    finally:
        leftover = processes_under(state_dirs)
        for pid in leftover:  # only processes this test started (their paths are ours)
            os.kill(pid, signal.SIGKILL)
    assert leftover == [], "Flower processes outlived their daemons"


async def federate(tmp_path: Path, state_dirs: list[Path], ca: Path, private_keys: list[Path]) -> None:
    with trio.fail_after(150):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            fed = await stack.enter_async_context(await start_daemon(
                [sys.executable, "-m", "shoal.cli.main", "fedserver", "run", "--config", str(tmp_path / "fed.toml")]))
            state_dirs.append(fed.state_dir)
            superlink, rpc_addr = fed.addresses["superlink"], fed.addresses["rpc"]
            assert fed.addresses["superlink_internal"].port != superlink.port  # the nodes dial the proxy
            fed_metrics = await scrape(fed.addresses["metrics"])
            assert metric(fed_metrics, "shoal_fedserver_authorized_nodes") == 3
            assert metric(fed_metrics, "shoal_fedserver_key_errors_total") == 1
            nodes: list = [None] * 4

            async def start_node(i: int) -> None:
                root = tmp_path / f"root{i}"
                node = FakeNode(root, cpus=2 + (i == 1))  # node 1 has a third CPU: extra features
                nursery.start_soon(keep_ticking, node, 0.1)  # 4 nodes on 2 cores: sample gently
                extra = (f'[federation]\nenabled = true\nsuperlink = "{superlink}"\n'
                         f'root_certificates = "{ca}"\nauth_private_key = "{private_keys[i]}"\n'
                         f'fedserver = "{rpc_addr}"\ncatch_up_interval = 1.0\n')
                sock = tmp_path / f"n{i}.sock"
                config = write_config(tmp_path / f"n{i}.toml", root, sock, interval=0.2, window=1.0, extra=extra)
                nodes[i] = (sock, await stack.enter_async_context(await start_telemetry(config)))
                state_dirs.append(nodes[i][1].state_dir)

            async with trio.open_nursery() as starting:
                for i in range(4):
                    starting.start_soon(start_node, i)
            for sock, _ in nodes:
                await wait_status(sock, lambda s: s["stored"] >= 3)
            # The SuperLink refuses node 3 at activation (Flower's exit code 305).
            refused = nodes[3][1].state_dir / "supernode.log"
            with trio.fail_after(60):
                # Another process's log: poll it.
                while "Failed to activate SuperNode" not in (  # noqa: ASYNC110
                        refused.read_text() if refused.exists() else ""):
                    await trio.sleep(0.2)

            try:
                async with await connect_tcp(rpc_addr) as client:
                    result = await client.call("run", {"rounds": 1}, timeout=120)
            except Exception:
                print((fed.state_dir / "superlink.log").read_text()[-8000:])
                for i in range(3):
                    print((nodes[i][1].state_dir / "supernode.log").read_text()[-3000:])
                raise
            run_id = result["run_id"]
            # Three nodes took part, not the unknown one; the federation uses the
            # features every node has: not node 1's third CPU.
            assert result["nodes"] == 3
            assert result["features"] > 20
            assert "Sending: train message" not in refused.read_text()
            assert "Sending: train message" in (nodes[0][1].state_dir / "supernode.log").read_text()

            thresholds = []
            for sock, d in nodes:
                st = await wait_status(sock, lambda s: (s["federated_run"] or [None])[0] == run_id, timeout=30)
                assert st["model"]["origin"] == "federated" and st["model"]["run_id"] == str(run_id)
                assert st["model"]["features"] == result["features"]
                thresholds.append(st["model"]["threshold"])
                det = Detector.load(d.state_dir / "model.onnx")
                assert not any(n.startswith("cpu_2_") for n in det.feature_names)
            # Same global weights everywhere, but each node's own threshold.
            weights, meta = load_model_npz(fed.state_dir / "global" / "latest.npz")
            assert meta["run_id"] == run_id and len(meta["features"]) == result["features"]
            for _, d in nodes[:3]:
                node_w, node_meta = load_model_npz(d.state_dir / "fed" / "global.npz")
                assert all(np.array_equal(a, b) for a, b in zip(weights, node_w, strict=True))
            assert len(set(thresholds)) > 1

            # Every Fleet request went through the proxy; which paths the nodes used:
            fed_metrics = await scrape(fed.addresses["metrics"])
            used = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in fed_metrics.splitlines()
                    if line.startswith("shoal_fedserver_proxy_forwarded_total{")}
            print("Fleet paths forwarded:", {p: n for p, n in used.items() if n})  # shown with -s
            for path in ("activate-node", "pull-messages", "push-messages", "get-run", "pull-object"):
                assert used[f"/v1/fleet/{path}"] > 0, path
            assert metric(fed_metrics, "shoal_fedserver_proxy_upstream_errors_total") == 0
            # The Control API is not reachable on the nodes' port: 403, counted.
            refused_before = metric(fed_metrics, "shoal_fedserver_proxy_refused_total")
            status, body = await https_post(superlink, "/v1/control/list-runs", ca)
            assert status == 403 and b"Fleet API" in body
            inner_status, _ = await https_post(fed.addresses["superlink_internal"], "/v1/control/list-runs", ca)
            assert inner_status == 200  # the same request works on loopback: the proxy refused it
            fed_metrics = await scrape(fed.addresses["metrics"])
            assert metric(fed_metrics, "shoal_fedserver_proxy_refused_total") == refused_before + 1

            # The CLI reports on the same server.
            out = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "shoal.cli.main", "fed", "status", "--server", str(rpc_addr)],
                capture_output=True, text=True, timeout=60))
            assert out.returncode == 0 and f'"run_id": {run_id}' in out.stdout

            codes = []

            async def stop(d) -> None:
                codes.append(await d.terminate())

            async with trio.open_nursery() as stopping:
                for _, d in nodes:
                    stopping.start_soon(stop, d)
            # A stopping SuperNode deactivates itself, through the proxy too.
            fed_metrics = await scrape(fed.addresses["metrics"])
            assert metric(fed_metrics, 'shoal_fedserver_proxy_forwarded_total{path="/v1/fleet/deactivate-node"}') >= 3
            await stop(fed)
            assert codes == [0] * 5
            nursery.cancel_scope.cancel()


async def https_post(addr, path: str, ca: Path) -> tuple[int, bytes]:
    import ssl

    import httpx

    def post() -> tuple[int, bytes]:
        # An empty protobuf message is a valid request (e.g. ListRunsRequest: all runs).
        r = httpx.post(f"https://{addr.host}:{addr.port}{path}", content=b"",
                       headers={"content-type": "application/protobuf", "accept": "application/protobuf"},
                       verify=ssl.create_default_context(cafile=str(ca)), timeout=30)
        return r.status_code, r.content

    return await trio.to_thread.run_sync(post)


def test_restart_delay_backs_off_while_a_child_keeps_failing_and_resets_after_a_healthy_run():
    delays, d = [], None
    for _ in range(6):
        d = next_delay(d, ran=2.0, base=5.0, max_delay=60.0)
        delays.append(d)
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert next_delay(60.0, ran=STABLE, base=5.0, max_delay=60.0) == 5.0


def test_common_features_is_the_sorted_intersection():
    assert common_features([["b", "a", "c"], ["c", "a"], ["a", "c", "d"]]) == ["a", "c"]
    assert common_features([]) == []


@pytest.mark.parametrize("text, key", [
    ('[superlink]\nlisten = "10.0.0.1:9093"\n', "superlink.ssl_certfile"),
    ('[superlink]\nlisten = "10.0.0.1:9093"\nssl_certfile = "/c"\nssl_keyfile = "/k"\nssl_ca_certfile = "/ca"\n',
     "superlink.supernode_auth"),
    ('[rpc]\nlisten = "10.0.0.1:9094"\n', "rpc.token_file"),
    ('[superlink]\nssl_certfile = "/c"\n', "superlink.ssl_certfile"),  # all three or none
    ('[superlink]\nsupernode_auth = true\n', "superlink.supernode_auth"),  # Flower needs TLS for it
    ('[superlink]\nauthorized_keys = "/keys"\n', "superlink.authorized_keys"),
])
def test_fedserver_off_loopback_needs_tls_node_auth_and_a_token(text, key):
    with pytest.raises(ConfigError) as e:
        parse_config(text, FedserverConfig, source="fed.toml")
    assert e.value.key == key


def test_telemetry_supernode_off_loopback_needs_tls_and_a_key():
    with pytest.raises(ConfigError) as e:
        parse_config('[federation]\nenabled = true\nsuperlink = "10.0.0.1:9093"\n', TelemetryConfig)
    assert e.value.key == "federation.root_certificates"
    ok = parse_config('[federation]\nenabled = true\nsuperlink = "10.0.0.1:9093"\nroot_certificates = "/ca.pem"\n'
                      'auth_private_key = "/k"\n', TelemetryConfig)
    assert ok.federation.root_certificates == "/ca.pem"
    with pytest.raises(ConfigError) as e:
        parse_config('[federation]\nauth_private_key = "/k"\n', TelemetryConfig)
    assert e.value.key == "federation.auth_private_key"


def recording_fedserver(state_dir: Path, known: set[str]):
    """A FedserverApp whose `flwr` CLI calls are recorded and answered like Flower
    answers them (the SuperLink remembers keys; "Public key already in use" for a
    repeat; an error for a malformed key). Only the CLI boundary is replaced: the
    key file parsing, bookkeeping and metrics under test are the daemon's own."""
    import logging

    from prometheus_client import CollectorRegistry

    from shoal.daemons.fedserver.daemon import FedRunError, FedserverApp
    from shoal.daemons.runtime.daemon import DaemonContext
    from shoal.daemons.runtime.metrics import runtime_metrics
    from shoal.daemons.runtime.sdnotify import Notifier

    registry = CollectorRegistry()
    ctx = DaemonContext("fedserver", None, FedserverConfig(), registry, state_dir, Notifier({}),
                        runtime_metrics(registry, "fedserver"), logging.getLogger("test"))
    app = FedserverApp(ctx)
    app.calls = []

    async def flwr(*args: str) -> dict:
        app.calls.append(args)
        blob = (await trio.to_thread.run_sync(Path(args[2]).read_text)).split()[1]
        if not blob.startswith("AAAA"):
            raise FedRunError("flwr supernode failed (exit 1): Unable to parse the public key file")
        if blob in known:
            raise FedRunError("flwr supernode: [code: 23] Public key already in use.")
        known.add(blob)
        return {"success": True, "node-id": len(known)}

    app._flwr = flwr
    return app


async def test_authorized_keys_are_registered_once_and_bad_lines_counted(tmp_path):
    keys = [make_node_key(tmp_path / "pki", f"n{i}")[1].read_text() for i in range(3)]
    listing = tmp_path / "nodes.pub"
    listing.write_text("# fleet\n\n" + keys[0] + keys[1] + "ecdsa-sha2-nistp384 garbage\n")
    known: set[str] = set()  # the SuperLink's database
    app = recording_fedserver(tmp_path / "state", known)
    assert await app.register_keys(str(listing), fresh_db=True) == 2
    assert len(app.calls) == 3 and len(known) == 2
    assert app.metrics.key_errors._value.get() == 1 and app.metrics.authorized_nodes._value.get() == 2
    assert not list((tmp_path / "state" / "node-keys").glob("*.pub"))  # temporary key files are gone

    # Next start, same database, one node added: only the new key and the bad line go to Flower.
    listing.write_text(listing.read_text() + keys[2])
    app = recording_fedserver(tmp_path / "state", known)
    assert await app.register_keys(str(listing), fresh_db=False) == 3
    assert len(app.calls) == 2 and len(known) == 3

    # A new database forgets the record: every key is registered again.
    known.clear()
    app = recording_fedserver(tmp_path / "state", known)
    assert await app.register_keys(str(listing), fresh_db=True) == 3
    assert len(app.calls) == 4 and len(known) == 3

    # An unreadable file is logged and counted; the daemon goes on.
    assert await app.register_keys(str(tmp_path / "missing.pub"), fresh_db=False) == 0
    assert app.metrics.key_errors._value.get() == 2
