"""kill -9: a worker mid-task, and the dispatcher under load."""

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys

import trio

from shoal.daemons.runtime.rpc import RpcError, connect_tcp
from shoal.protocol.dispatch import TaskResult
from tests.dispatcher.live import connect, start_dispatcher, start_worker, wait_job, wait_workers


async def test_worker_killed_mid_task_has_its_task_rerun_elsewhere(tmp_path):
    marker = tmp_path / "runs"
    # The first run blocks (until its worker is killed); the rerun returns at once.
    long = [sys.executable, "-c",
            f"import os,time; first=not os.path.exists({str(marker)!r}); "
            f"open({str(marker)!r},'a').write(str(os.getpid())+'\\n'); time.sleep(60 if first else 0)"]
    job = {"name": "k", "tasks": [{"name": "long", "command": long},
                                  {"name": "after", "builtin": "sleep 0", "deps": ["long"]}]}
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path, lease=1.0) as d:
            addr = d.addresses["rpc"]
            async with await start_worker(tmp_path, addr, "w1", slots=1) as w1, await connect(d) as c:
                await wait_workers(c, 1)
                j = (await c.call("submit", {"spec": json.dumps(job).encode()}))["job"]
                while not marker.exists():  # the task has started on w1  # noqa: ASYNC110 - polls another process's state; there is no event to wait on
                    await trio.sleep(0.02)
                async with await start_worker(tmp_path, addr, "w2", slots=1) as w2:
                    await wait_workers(c, 2)
                    await w1.kill()
                    view = await wait_job(c, j)
                    assert view["state"] == "done", view
                    by = {t["task"]: t for t in view["tasks"]}
                    assert by["long"]["worker"] == "w2" and by["after"]["state"] == "done"
                    pids = marker.read_text().split()
                    assert len(pids) == 2  # at-least-once: it ran twice
                    # w1's orphaned first run (its own session) is ours to stop
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pids[0]), signal.SIGKILL)
                    rows = await c.call("workers")
                    assert [w["id"] for w in rows] == ["w2"]  # w1 was declared dead
                    assert await w2.terminate() == 0
            assert await d.terminate() == 0


def job_spec(i: int) -> bytes:
    tasks = [{"name": "root", "builtin": "sleep 0"},
             {"name": "fan", "replicas": 6, "builtin": "sleep 0", "deps": ["root"]},
             {"name": "join", "builtin": "sleep 0", "deps": ["fan"]}]
    return json.dumps({"name": f"load{i}", "bundle_chains": i % 2 == 0, "tasks": tasks}).encode()


class FakeWorker:
    """A worker played by the test over the real RPC: it keeps the results it
    finished across a dispatcher crash and reports them (again) afterwards."""

    def __init__(self, wid: str, rng: random.Random):
        self.id = wid
        self.rng = rng
        self.held: list[list] = []  # reported or not, kept to re-report after the crash
        self.unreported: list[list] = []

    async def run(self, addr, stop: trio.Event) -> None:
        async with await connect_tcp(addr) as c:
            await c.call("register", {"worker": self.id, "cpus": 4, "memory": 1e9, "cpu_speed": 1.0,
                                      "bandwidth": 1e8, "rtt": 0.0})
            if self.held:  # results from before the crash: some are duplicates now
                await c.call("report", {"worker": self.id, "results": self.held})
                self.unreported = []
            while not stop.is_set():
                units = (await c.call("pull", {"worker": self.id, "max": 8, "wait": 0.2}))["units"]
                now = 1.0
                batch = [[u["key"], [TaskResult(t["name"], 0, now, now).to_row() for t in u["tasks"]]]
                         for u in units]
                self.held = (self.held + batch)[-200:]
                self.unreported += batch
                if self.unreported and self.rng.random() < 0.7:  # reports are late at random
                    await c.call("report", {"worker": self.id, "results": self.unreported})
                    self.unreported = []
                await c.call("heartbeat", {"worker": self.id, "running": 0})


async def test_dispatcher_killed_under_load_loses_no_job_and_records_each_unit_once(tmp_path):
    state = tmp_path / "dstate"
    rng = random.Random(7)
    workers = [FakeWorker(f"f{i}", rng) for i in range(3)]
    acked: list[int] = []

    async def submitter(d, n: int) -> None:
        async with await connect(d) as c:  # the submit socket
            for _ in range(n):
                acked.append((await c.call("submit", {"spec": job_spec(len(acked))}))["job"])

    async def load(d, stop: trio.Event, submit: int) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for w in workers:
                    nursery.start_soon(w.run, d.addresses["rpc"], stop)
                await submitter(d, submit)
        except* (RpcError, OSError):
            pass  # the dispatcher died under us

    with trio.fail_after(80):
        d = await start_dispatcher(tmp_path, state_dir=state, lease=2.0)
        async with d:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, d, stop, 10_000)
                while len(acked) < 40:  # noqa: ASYNC110 - polls another process's state; there is no event to wait on
                    await trio.sleep(0.01)
                await d.kill()  # mid-submission, mid-report
        before = list(acked)
        d = await start_dispatcher(tmp_path, state_dir=state, lease=2.0)
        async with d:
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load, d, stop, 5)
                async with await connect(d) as c:
                    for j in acked:
                        view = await wait_job(c, j)
                        assert view["state"] == "done", view
                stop.set()
            assert await d.terminate() == 0
    assert len(before) >= 40 and acked[:len(before)] == before
    db = sqlite3.connect(state / "jobs.db")
    states = dict(db.execute("SELECT id, state FROM jobs"))
    assert all(states[j] == "done" for j in acked)
    # A job committed just before the kill may never have been acknowledged; it runs too.
    assert set(states.values()) == {"done"}
    units = set(db.execute("SELECT job, unit FROM units"))
    counts = db.execute("SELECT job, unit, count(*) FROM completions GROUP BY job, unit").fetchall()
    assert {(j, u) for j, u, _n in counts} == units and all(n == 1 for _j, _u, n in counts)
    assert db.execute("SELECT count(*) FROM tasks WHERE state != 'done'").fetchone()[0] == 0
