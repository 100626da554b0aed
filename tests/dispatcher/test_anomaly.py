"""Live, on 127.0.0.1: a real telemetry daemon flags its node, the worker on that node
reports it, and the dispatcher stops and resumes dispatching there; and the marl
workers' shared reward crosses workers through the dispatcher.

The telemetry daemon runs over a fake /proc tree (as in tests/telemetry). It is driven
to flag the node by installing, through its own ``install`` RPC, a model over this node's
real window features whose threshold every window exceeds (0), then one no window reaches
(1e30): the daemon's real scoring, gauge and /metrics endpoint decide the verdict, in
well under a second per window instead of the tens of seconds a trained model needs.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from contextlib import AsyncExitStack

import msgpack
import trio

from shoal.core.telemetry.model import Autoencoder, MinMaxScaler
from shoal.daemons.telemetry.trainer import export_onnx
from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher, start_worker, wait_job, wait_workers
from tests.harness import scrape
from tests.telemetry.conftest import keep_ticking, rpc, start_telemetry, wait_status, write_config
from tests.telemetry.fakeroot import FakeNode


def spec(n: int, sleep: float = 0.05) -> bytes:
    return json.dumps({"name": "t", "policy": "least-load",
                       "tasks": [{"name": f"t{i}", "builtin": f"sleep {sleep}"} for i in range(n)]}).encode()


def window_features(state_dir) -> list[str]:
    """The features every stored window has, but CPU utilisation.

    The first windows of a node have a few more features; and the fake node's CPU
    counters advance by whole jiffies only while the test's event loop runs, so under
    a loaded machine a window may lack CPU utilisation (the daemon then refuses a model
    that needs it, or does not score the window). Everything else is always there.
    """
    db = sqlite3.connect(str(state_dir / "windows.db"))
    try:
        sets = [set(msgpack.unpackb(blob, raw=False)) for (blob,) in db.execute("SELECT features FROM windows")]
    finally:
        db.close()
    return sorted(n for n in set.intersection(*sets) if "_util:" not in n and "_iowait:" not in n)


def model_bytes(names: list[str], threshold: float, path) -> bytes:
    n = len(names)
    export_onnx(Autoencoder(n, hidden=(3,), seed=1), MinMaxScaler().fit([[0.0] * n, [1.0] * n]), names,
                threshold, path)
    return path.read_bytes()


async def wait_view(client, worker: str, predicate, timeout: float = 20.0) -> dict:
    """Poll the dispatcher's worker list until ``worker``'s row satisfies ``predicate``."""
    with trio.fail_after(timeout):
        while True:
            rows = {w["id"]: w for w in await client.call("workers")}
            if worker in rows and predicate(rows[worker]):
                return rows[worker]
            await trio.sleep(0.05)


async def test_a_flagged_node_gets_no_work_until_it_recovers(tmp_path):
    root = tmp_path / "root"
    node = FakeNode(root)
    sock = tmp_path / "ctl.sock"
    tstate = tmp_path / "tstate"
    with trio.fail_after(80):
        async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(keep_ticking, node)
            tel = await stack.enter_async_context(
                await start_telemetry(write_config(tmp_path / "t.toml", root, sock), state_dir=tstate))
            taddr = tel.addresses["metrics"]
            d = await stack.enter_async_context(await start_dispatcher(
                tmp_path, extra="exclude_anomalous = true"))
            addr = d.addresses["rpc"]
            url = f"http://{taddr.host}:{taddr.port}/metrics"
            w1 = await stack.enter_async_context(
                await start_worker(tmp_path, addr, "w1", extra=f'telemetry_metrics = "{url}"'))
            w2 = await stack.enter_async_context(await start_worker(tmp_path, addr, "w2"))
            c = await stack.enter_async_context(await connect(d))
            await wait_workers(c, 2)
            # no model yet: telemetry scores nothing, the verdict is unknown and w1 works
            row = await wait_view(c, "w1", lambda w: w["verdict"] == "unknown")
            assert not row["excluded"]

            await wait_status(sock, lambda s: s["stored"] >= 3)
            names = window_features(tstate)
            assert len(names) > 20
            await rpc(sock, "install", {"model": model_bytes(names, 0.0, tmp_path / "flag.onnx")})
            row = await wait_view(c, "w1", lambda w: w["verdict"] == "anomalous")
            assert row["excluded"]
            st = await rpc(sock, "status", {"windows": 1})
            assert st["windows"][0]["anomalous"] is True  # the telemetry daemon's own verdict
            r = await trio.to_thread.run_sync(lambda: subprocess.run(
                [*SHOAL, "dispatcher", "workers", "--dispatcher", str(addr)], capture_output=True, text=True,
                timeout=30))
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith("w1"))
            assert r.returncode == 0 and "node anomalous" in line and "EXCLUDED" in line, r.stdout

            job = (await c.call("submit", {"spec": spec(8)}))["job"]
            view = await wait_job(c, job)
            assert view["state"] == "done" and {t["worker"] for t in view["tasks"]} == {"w2"}
            m = await scrape(d.addresses["metrics"])
            assert metric(m, "shoal_dispatcher_anomaly_exclusions_total") == 1
            assert metric(m, "shoal_dispatcher_workers_excluded") == 1
            assert metric(await scrape(w1.addresses["metrics"]), "shoal_worker_node_anomalous") == 1

            # the node recovers (a model no window exceeds): w1 gets work again
            await rpc(sock, "install", {"model": model_bytes(names, 1e30, tmp_path / "ok.onnx")})
            row = await wait_view(c, "w1", lambda w: w["verdict"] == "normal")
            assert not row["excluded"]
            job = (await c.call("submit", {"spec": spec(8, sleep=0.2)}))["job"]
            view = await wait_job(c, job)
            assert view["state"] == "done" and {t["worker"] for t in view["tasks"]} == {"w1", "w2"}
            assert metric(await scrape(d.addresses["metrics"]), "shoal_dispatcher_workers_excluded") == 0

            # the telemetry daemon goes away: unknown, counted, and the node is not kept out
            assert await tel.terminate() == 0
            row = await wait_view(c, "w1", lambda w: w["verdict"] == "unknown")
            assert not row["excluded"]
            assert metric(await scrape(w1.addresses["metrics"]), "shoal_worker_telemetry_errors_total") >= 1
            for daemon in (w1, w2, d):
                assert await daemon.terminate() == 0
            nursery.cancel_scope.cancel()


async def test_marl_workers_learn_from_each_others_tasks(tmp_path):
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            d = await stack.enter_async_context(await start_dispatcher(tmp_path))
            addr = d.addresses["rpc"]
            ws = {wid: await stack.enter_async_context(
                await start_worker(tmp_path, addr, wid, extra='queue_policy = "marl"')) for wid in ("w1", "w2")}
            c = await stack.enter_async_context(await connect(d))
            await wait_workers(c, 2)
            job = (await c.call("submit", {"spec": spec(24)}))["job"]
            view = await wait_job(c, job)
            assert view["state"] == "done"
            ran = {wid: sum(1 for t in view["tasks"] if t["worker"] == wid) for wid in ws}
            assert ran["w1"] and ran["w2"]
            # each worker's scheduler is fed every task that ran on the other one (heartbeats deliver them)
            with trio.fail_after(20):
                for wid, other in (("w1", "w2"), ("w2", "w1")):
                    while metric(await scrape(ws[wid].addresses["metrics"]),  # noqa: ASYNC110 - polls another process's state; there is no event to wait on
                                 "shoal_worker_team_rewards_total") < ran[other]:
                        await trio.sleep(0.05)
            for wid, other in (("w1", "w2"), ("w2", "w1")):
                m = await scrape(ws[wid].addresses["metrics"])
                assert metric(m, "shoal_worker_team_rewards_total") == ran[other]  # exactly once each
            for daemon in (*ws.values(), d):
                assert await daemon.terminate() == 0
