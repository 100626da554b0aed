"""Installing models: checked against the node's declared features (even with no window stored),
large models in chunks through the CLI, refusals that name the user's file, `features`."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AsyncExitStack

import pytest
import trio

from shoal.core.telemetry.model import Autoencoder, MinMaxScaler
from shoal.daemons.runtime.rpc import RpcError
from shoal.daemons.telemetry.daemon import UPLOAD_IDLE_SECONDS, Uploads
from shoal.daemons.telemetry.trainer import export_onnx
from shoal.protocol.rpc import DEFAULT_MAX_FRAME
from shoal.protocol.telemetry import MAX_INSTALL_BYTES, MAX_MODEL_CHUNK, Install

from .conftest import keep_ticking, rpc, start_telemetry, write_config
from .fakeroot import FakeNode
from .test_daemon import scrape


def model_file(path, names, hidden=(3,), threshold=0.5):
    ae = Autoencoder(len(names), hidden=hidden, seed=1)
    export_onnx(ae, MinMaxScaler().fit([[0.0] * len(names), [1.0] * len(names)]), names, threshold, path)
    return path


def shoal(*argv, timeout=60):
    return subprocess.run([sys.executable, "-m", "shoal.cli.main", "telemetry", *argv],
                          capture_output=True, text=True, timeout=timeout)


FAMILIES = ("cpu_", "cpufreq_", "load_", "mem_", "disk_", "net_", "hwmon_", "rapl_")


async def all_features(sock) -> list[str]:
    """Every name, page by page, once every source of the fake node has been read once (the fake
    node rewrites its files in place, so a read may fail; the names of a source stay declared
    from its first good read on)."""
    while True:
        out: list[str] = []
        while True:
            r = await rpc(sock, "features", {"offset": len(out)})
            out += r["features"]
            if len(out) >= r["total"]:
                break
        if all(any(n.startswith(f) for n in out) for f in FAMILIES):
            return out
        await trio.sleep(0.05)


async def test_models_are_checked_against_the_collector_on_an_empty_store(tmp_path):
    root = tmp_path / "root"
    node = FakeNode(root)
    sock = tmp_path / "ctl.sock"
    # Hour-long windows: nothing is stored during the test, the store stays empty.
    config = write_config(tmp_path / "t.toml", root, sock, interval=0.05, window=3600.0)
    with trio.fail_after(90):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(keep_ticking, node)
            d = await stack.enter_async_context(await start_telemetry(config))
            names = await all_features(sock)
            assert "cpu_0_util:mean" in names and "net_eth0_rx.bytes_per_s:std" in names
            assert "mem_used.bytes:mean" in names and not any(n.startswith("net_lo") for n in names)
            assert names == sorted(names) and len(names) == len(set(names))
            cpu = await rpc(sock, "features", {"prefix": "cpu_0_"})
            assert cpu["features"] and all(n.startswith("cpu_0_") for n in cpu["features"])

            other = model_file(tmp_path / "someone-elses.onnx", [f"other_{i}:mean" for i in range(5)])
            with pytest.raises(RpcError) as e:
                await rpc(sock, "install", {"model": other.read_bytes(), "name": str(other)})
            assert e.value.code == "model_refused" and "mismatch" in e.value.message
            assert str(other) in e.value.message and "candidate" not in e.value.message

            with pytest.raises(RpcError) as e:  # a name cannot break the one-line error (or the log)
                await rpc(sock, "install", {"model": other.read_bytes(), "name": "evil\nshoal: installed"})
            assert "\n" not in e.value.message and "evil?shoal: installed" in e.value.message

            mine = model_file(tmp_path / "mine.onnx", names[:10])
            r = await rpc(sock, "install", {"model": mine.read_bytes(), "name": str(mine)})
            assert r["features"] == 10
            st = await rpc(sock, "status", {"windows": 0})
            assert st["stored"] == 0 and st["model"]["origin"] == "rpc" and st["model"]["features"] == 10
            marked = await rpc(sock, "features", {})
            assert sum(marked["in_model"]) == 10

            # A chunk for no upload in progress is refused, and counted with the other refusals.
            with pytest.raises(RpcError) as e:
                await rpc(sock, "install", {"model": b"x", "upload": "0123456789abcdef", "offset": 5})
            assert e.value.code == "bad_upload"
            text = await scrape(d.addresses["metrics"])
            assert 'shoal_telemetry_model_installs_total{origin="rpc",outcome="refused"} 3.0' in text

            # The CLI: feature names one per line; a refusal is one line naming the user's file.
            out = await trio.to_thread.run_sync(lambda: shoal("features", "--socket", str(sock)))
            assert out.returncode == 0 and out.stdout.split() == names
            out = await trio.to_thread.run_sync(lambda: shoal("install", str(other), "--socket", str(sock)))
            assert out.returncode == 2 and out.stdout == ""
            assert out.stderr.count("\n") == 1 and str(other) in out.stderr and "Traceback" not in out.stderr
            assert "candidate.onnx" not in out.stderr
            nursery.cancel_scope.cancel()


async def test_cli_installs_a_model_larger_than_an_rpc_frame(tmp_path):
    root = tmp_path / "root"
    node = FakeNode(root)
    sock = tmp_path / "ctl.sock"
    config = write_config(tmp_path / "t.toml", root, sock, interval=0.05, window=3600.0)
    with trio.fail_after(120):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(keep_ticking, node)
            d = await stack.enter_async_context(await start_telemetry(config))
            names = await all_features(sock)
            big = model_file(tmp_path / "big.onnx", names, hidden=(2 * DEFAULT_MAX_FRAME // (8 * len(names)),))
            size = big.stat().st_size
            assert DEFAULT_MAX_FRAME < size <= MAX_INSTALL_BYTES and size > 2 * MAX_MODEL_CHUNK
            out = await trio.to_thread.run_sync(lambda: shoal("install", str(big), "--socket", str(sock)))
            assert out.returncode == 0, out.stderr
            assert f"installed {big}: {len(names)} features" in out.stdout
            assert (d.state_dir / "model.onnx").read_bytes() == big.read_bytes()
            st = await rpc(sock, "status", {"windows": 0})
            assert st["model"]["origin"] == "rpc" and st["model"]["features"] == len(names)

            # A file over the cap is refused by the CLI in one line, before anything is sent.
            huge = tmp_path / "huge.onnx"
            await trio.Path(huge).write_bytes(b"")
            os.truncate(huge, MAX_INSTALL_BYTES + 1)  # sparse: no 64 MiB written
            out = await trio.to_thread.run_sync(lambda: shoal("install", str(huge), "--socket", str(sock)))
            assert out.returncode == 2 and str(huge) in out.stderr and "cap" in out.stderr
            assert out.stderr.count("\n") == 1
            # A truncated large model is refused at its last chunk, naming the file; the old one runs on.
            cut = tmp_path / "cut.onnx"
            cut.write_bytes(big.read_bytes()[: size - 1000])
            out = await trio.to_thread.run_sync(lambda: shoal("install", str(cut), "--socket", str(sock)))
            assert out.returncode == 2 and str(cut) in out.stderr and "candidate" not in out.stderr
            assert (d.state_dir / "model.onnx").read_bytes() == big.read_bytes()
            nursery.cancel_scope.cancel()


def test_uploads_refuse_chunks_that_do_not_continue_exactly():
    up = Uploads()
    whole = bytes(range(256)) * 10
    assert up.add(Install(model=whole), 0.0) == whole  # one call
    assert up.add(Install(model=whole, total=len(whole)), 0.0) == whole
    r = up.add(Install(model=whole[:1000], total=len(whole)), 0.0)
    assert r["received"] == 1000
    uid = r["upload"]
    with pytest.raises(RpcError) as e:  # a gap: the upload is dropped, not patched
        up.add(Install(model=whole[1500:2000], upload=uid, offset=1500), 1.0)
    assert e.value.code == "bad_upload"
    with pytest.raises(RpcError) as e:
        up.add(Install(model=whole[1000:2000], upload=uid, offset=1000), 2.0)
    assert e.value.code == "bad_upload"

    r = up.add(Install(model=whole[:1000], total=len(whole)), 0.0)
    uid = r["upload"]
    with pytest.raises(RpcError) as e:  # more than the announced total
        up.add(Install(model=whole[1000:] + b"x", upload=uid, offset=1000), 1.0)
    assert e.value.code == "bad_upload"

    a = up.add(Install(model=whole[:10], total=len(whole)), 0.0)["upload"]
    up.add(Install(model=whole[:10], total=len(whole)), 0.0)
    with pytest.raises(RpcError) as e:  # a bounded number in flight
        up.add(Install(model=whole[:10], total=len(whole)), 0.0)
    assert e.value.code == "busy"
    # An idle upload expires and frees its slot; its next chunk is refused.
    later = UPLOAD_IDLE_SECONDS + 1
    assert "upload" in up.add(Install(model=whole[:10], total=len(whole)), later)
    with pytest.raises(RpcError) as e:
        up.add(Install(model=whole[10:], upload=a, offset=10), later)
    assert e.value.code == "bad_upload"

    b = up.add(Install(model=whole[:100], total=len(whole)), later)["upload"]
    assert up.add(Install(model=whole[100:200], upload=b, offset=100), later)["received"] == 200
    assert up.add(Install(model=whole[200:], upload=b, offset=200), later) == whole
