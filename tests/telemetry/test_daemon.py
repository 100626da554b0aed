"""The telemetry daemon as a real process: windows, kill -9, training, model refusal, hooks."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from shoal.core.telemetry.model import Autoencoder, MinMaxScaler
from shoal.daemons.runtime.rpc import RpcError
from shoal.daemons.telemetry.trainer import export_onnx

from .conftest import keep_ticking, rpc, start_telemetry, wait_status, write_config
from .fakeroot import FakeNode


def stored_starts(state_dir) -> set[float]:
    db = sqlite3.connect(str(state_dir / "windows.db"))
    try:
        return {r[0] for r in db.execute("SELECT start FROM windows")}
    finally:
        db.close()


def d_store_training(state_dir):
    from shoal.daemons.telemetry.store import WindowStore

    store = WindowStore(state_dir / "windows.db")
    try:
        return store.training()
    finally:
        store.close()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def scrape(addr) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{addr.host}:{addr.port}/metrics", timeout=10) as r:
            return r.read().decode()

    return await trio.to_thread.run_sync(get)


@asynccontextmanager
async def ticking_daemon(tmp_path, min_stored: int, extra: str = ""):
    """A telemetry daemon on a fake node that keeps ticking, once it stored ``min_stored`` windows.

    -> (daemon, control socket, node); the daemon must stop cleanly at the end.
    """
    root = tmp_path / "root"
    node = FakeNode(root)
    sock = tmp_path / "ctl.sock"
    config = write_config(tmp_path / "t.toml", root, sock, extra=extra)
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        nursery.start_soon(keep_ticking, node)
        d = await stack.enter_async_context(await start_telemetry(config))
        await wait_status(sock, lambda s: s["stored"] >= min_stored)
        yield d, sock, node
        assert await d.terminate() == 0
        nursery.cancel_scope.cancel()


async def test_kill_9_loses_no_closed_window(tmp_path):
    root = tmp_path / "root"
    node = FakeNode(root)
    sock = tmp_path / "ctl.sock"
    config = write_config(tmp_path / "t.toml", root, sock)
    state = tmp_path / "state"
    with trio.fail_after(60):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(keep_ticking, node)
            d = await stack.enter_async_context(await start_telemetry(config, state_dir=state))
            st = await wait_status(sock, lambda s: s["stored"] >= 3)
            seen = {w["start"] for w in st["windows"]}
            assert all(w["samples"] >= 2 and w["features"] > 20 for w in st["windows"])
            assert await d.kill() == -9
            await d.aclose()
            assert seen <= stored_starts(state)  # every window the daemon reported is on disk
            d = await stack.enter_async_context(await start_telemetry(config, state_dir=state))
            st = await wait_status(sock, lambda s: s["stored"] >= len(seen) + 2)
            assert seen <= {w["start"] for w in st["windows"]}
            assert await d.terminate() == 0
            nursery.cancel_scope.cancel()


async def test_train_score_refuse_bad_models_and_flag_a_fault(tmp_path):
    flag = tmp_path / "flag"
    script = tmp_path / "hook.py"
    script.write_text("import os, sys\nopen(sys.argv[1], 'a').write(os.environ['SHOAL_ANOMALOUS'])\n")
    hook = f"{sys.executable} {script} {flag}"
    with trio.fail_after(80):
        async with ticking_daemon(tmp_path, 8, extra=f'[detector]\non_change_command = "{hook}"\n') as (d, sock, node):
            with pytest.raises(RpcError) as e:
                await rpc(sock, "label", {"start": 0, "end": 1, "label": "has space"})
            assert e.value.code == "bad_label"

            trained = await rpc(sock, "train", {})
            assert trained["windows"] >= 7 and trained["features"] > 20 and trained["threshold"] > 0
            st = await wait_status(sock, lambda s: any(w["score"] is not None for w in s["windows"]))
            model = st["model"]
            assert model["origin"] == "local" and model["features"] == trained["features"]

            # A truncated file is refused with a clear message; the old model keeps scoring.
            good = (d.state_dir / "model.onnx").read_bytes()
            with pytest.raises(RpcError) as e:
                await rpc(sock, "install", {"model": good[: len(good) // 2]})
            assert e.value.code == "model_refused" and "truncated or corrupt" in e.value.message
            # A valid model for other features is refused as mismatched.
            names = [f"other_{i}:mean" for i in range(5)]
            ae = Autoencoder(5, hidden=(3,), seed=1)
            export_onnx(ae, MinMaxScaler().fit([[0] * 5, [1] * 5]), names, 0.1, tmp_path / "other.onnx")
            with pytest.raises(RpcError) as e:
                await rpc(sock, "install", {"model": (tmp_path / "other.onnx").read_bytes()})
            assert e.value.code == "model_refused" and "mismatch" in e.value.message
            st = await rpc(sock, "status", {"windows": 1})
            assert st["model"] == model
            last = st["windows"][0]["start"]
            await wait_status(sock, lambda s: s["windows"][0]["start"] > last and s["windows"][0]["score"] is not None)
            text = await scrape(d.addresses["metrics"])
            assert 'shoal_telemetry_model_installs_total{origin="rpc",outcome="refused"} 2.0' in text
            assert 'shoal_telemetry_model_installs_total{origin="local",outcome="ok"} 1.0' in text

            # The CLI shows the same.
            out = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "shoal.cli.main", "telemetry", "status", "--socket", str(sock), "-n", "3"],
                capture_output=True, text=True, timeout=30))
            assert out.returncode == 0 and "model: local" in out.stdout and "normal" in out.stdout

            # A fault: the node overheats while idle (a failed fan). The detector
            # flags it and the hook runs on the flip to anomalous.
            node.fault = True
            try:
                st = await wait_status(sock, lambda s: s["windows"][0]["anomalous"] is True, timeout=20)
            except trio.TooSlowError:
                print(d.log[-6000:])
                raise
            with trio.fail_after(20):
                # The hook is another process: poll the file it writes.
                while "1" not in (flag.read_text() if flag.exists() else ""):  # noqa: ASYNC110
                    await trio.sleep(0.1)


async def test_windows_the_daemons_own_training_disturbed_are_neither_scored_nor_training_data(tmp_path):
    """Issue 15 item 3: training takes a core for seconds and the model is loaded after it; the
    windows open meanwhile (and closing within SETTLE_SECONDS after) are labelled, kept out of
    training and not scored, and counted."""
    from shoal.daemons.telemetry.daemon import DISTURBED_LABEL, SETTLE_SECONDS

    with trio.fail_after(60):
        async with ticking_daemon(tmp_path, 6) as (d, sock, _node):
            began = time.time()
            trained = await rpc(sock, "train", {})
            ended = time.time()
            st = await wait_status(sock, lambda s: any(w["score"] is not None and w["start"] > ended + SETTLE_SECONDS
                                                       for w in s["windows"]), timeout=SETTLE_SECONDS + 20,
                                   windows=200)
            disturbed = [w for w in st["windows"] if w["label"] == DISTURBED_LABEL]
            assert disturbed and all(w["score"] is None and w["anomalous"] is None for w in disturbed)
            # Every window inside the training call or the settling time after it is disturbed
            # (1 s of margin for the RPC's own latency), none from the end of the settling time on.
            for w in st["windows"]:
                if w["start"] >= began and w["end"] <= ended + SETTLE_SECONDS - 1.0:
                    assert w["label"] == DISTURBED_LABEL, w
                if w["start"] >= ended + SETTLE_SECONDS + 0.1:
                    assert w["label"] is None, w
            text = await scrape(d.addresses["metrics"])
            assert metric(text, 'shoal_telemetry_windows_total{result="disturbed"}') == len(disturbed)
            assert trained["windows"] >= 5
            # Labelled, so never training data (the store trains on unlabelled or "normal" windows).
            training = {w.start for w in d_store_training(d.state_dir)}
            assert training and not training & {w["start"] for w in disturbed}


CLIENT_FIT = """
import sys, time
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from shoal.core.telemetry.formats import encode_training_npz
from shoal.core.telemetry.model import Autoencoder
from shoal.daemons.fedserver.flowerapp import train

data, mark, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = [f"f{i}" for i in range(40)]
with open(data, "wb") as f:
    f.write(encode_training_npz(np.random.default_rng(0).random((60, 40)).astype(np.float32), names))
context = Context(run_id=1, node_id=1, node_config={"data": data, "model-out": data + ".out", "training-mark": mark},
                  state=RecordDict(), run_config={})
meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                created_at=time.time(), ttl=3600.0, message_type="train")
config = ConfigRecord({"features": names, "epochs": epochs, "batch-size": 4, "lr": 0.001})
msg = Message(content=RecordDict({"arrays": ArrayRecord(Autoencoder(40).get_weights()), "config": config}),
              metadata=meta)
began = time.time()
train(msg, context)
print(began, time.time())
"""


async def test_windows_a_federated_rounds_local_training_disturbed_are_neither_scored_nor_training_data(tmp_path):
    """Issue 15 item 3, the federated case: the Flower ClientApp's local fit (another process,
    run by the SuperNode) takes the node's CPU as the daemon's own training does. The ClientApp
    (its real ``train``, here called in a process of its own as the SuperNode would) says when
    it fits, through the SuperNode's ``training-mark``; the windows open meanwhile, and those
    closing within SETTLE_SECONDS after, are labelled, not scored and not training data."""
    from shoal.daemons.telemetry.daemon import DISTURBED_LABEL, SETTLE_SECONDS

    with trio.fail_after(120):
        async with ticking_daemon(tmp_path, 6) as (d, sock, _node):
            await rpc(sock, "train", {})
            trained = time.time()  # and the daemon's own training disturbance over
            await wait_status(sock, lambda s: any(w["score"] is not None and w["start"] > trained + SETTLE_SECONDS
                                                  for w in s["windows"]), timeout=SETTLE_SECONDS + 30)
            # The supernode's node-config names the daemon's fed/training.json as the mark.
            fed = d.state_dir / "fed"
            out = await trio.run_process(
                [sys.executable, "-c", CLIENT_FIT, str(tmp_path / "train.npz"), str(fed / "training.json"), "400"],
                capture_stdout=True, check=True)
            began, ended = map(float, out.stdout.split())
            assert ended - began > 1.0, "the fit should span a few windows"
            clear = ended + SETTLE_SECONDS + 0.1  # the windows past the settle time (as asserted below)
            st = await wait_status(sock, lambda s: any(w["score"] is not None and w["start"] >= clear
                                                       for w in s["windows"]), timeout=SETTLE_SECONDS + 30,
                                   windows=400)
            during = [w for w in st["windows"] if w["end"] > began and w["start"] < ended]
            assert len(during) >= 2
            for w in during:  # every window the fit overlapped
                assert w["label"] == DISTURBED_LABEL and w["score"] is None and w["anomalous"] is None, w
            after = [w for w in st["windows"] if w["start"] >= clear]
            assert after and all(w["label"] is None and w["score"] is not None for w in after)
            training = {w.start for w in d_store_training(d.state_dir)}
            assert training and not training & {w["start"] for w in during}
