"""The dispatch part of ``shoal demo``: a DAG job across several workers, live.

A dispatcher and three workers (two slots each) start in this process on
127.0.0.1 with kernel-chosen ports, exactly as their daemons would run. A job
is submitted over the RPC: ``prepare`` (a Python process that writes a data
file), a fan of eight ``square`` tasks that read that file as an input
(``task:prepare/data.txt``: each worker has its own work directory, so the
workers that did not run ``prepare`` fetch it from the one that did, checked
by its SHA-256) and square one number of it each (each its own process,
spread over the workers by the least-load policy), then the chain
``check -> summarise -> report`` fused into one invocation (``bundle_chains``).
While it runs, each refresh prints the tasks per state and
what every worker runs; at the end, the per-task table (worker, attempts,
exit code, duration) and the dispatcher's counters from its /metrics.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

from shoal.daemons.dispatcher.config import DispatcherConfig, DispatcherSection
from shoal.daemons.dispatcher.daemon import DispatcherApp
from shoal.daemons.runtime.config import DaemonSection, ListenAddr
from shoal.daemons.runtime.daemon import serve
from shoal.daemons.runtime.rpc import connect_unix
from shoal.daemons.worker.config import WorkerConfig, WorkerSection
from shoal.daemons.worker.daemon import WorkerApp

REFRESH = 0.5  # seconds between progress views
WORKERS = ("node-a", "node-b", "node-c")


def demo_job() -> dict:
    py = sys.executable
    square = ("import os,time; n=int(os.environ['SHOAL_TASK'].split('.')[1]); "
              "v=int(open('prepare/data.txt').read().split()[n]); time.sleep(0.6); print(v*v)")
    return {
        "name": "demo-dag",
        "policy": "least-load",
        "bundle_chains": True,
        "tasks": [
            {"name": "prepare", "command": [py, "-c", "open('data.txt','w').write('1 2 3 4 5 6 7 8'); print('ok')"],
             "outputs": [{"path": "data.txt", "max_bytes": 1024}]},
            {"name": "square", "replicas": 8, "inputs": ["task:prepare/data.txt"], "command": [py, "-c", square],
             "deadline": 30},
            {"name": "check", "deps": ["square"],
             "command": [py, "-c", "import time; time.sleep(0.3); print('checked')"]},
            {"name": "summarise", "deps": ["check"], "command": [py, "-c", "print('summary')"]},
            {"name": "report", "deps": ["summarise"], "builtin": "sleep 0.2"},
        ],
    }


def _view(job: dict, workers: list[dict], elapsed: float) -> str:
    done, total = job["counts"].get("done", 0), job["total"]
    bar = "#" * int(20 * done / total)
    prog = job.get("progress") or {}
    lines = [f"[{elapsed:5.1f}s] job {job['id']} [{bar:<20}] {done}/{total} done"
             f"  leased {prog.get('leased', 0)}  queued {prog.get('assigned', 0) + prog.get('ready', 0)}"
             f"  waiting {prog.get('waiting', 0)}"]
    for w in sorted(workers, key=lambda w: w["id"]):
        lines.append(f"    {w['id']:<8} running {'*' * w['running']:<2}  leased {w['leased']}  queued {w['queued']}")
    return "\n".join(lines)


async def tour(size_mib: int, timeout: float, out) -> int:
    del size_mib  # the swarm part's knob; this part has no file to share
    with tempfile.TemporaryDirectory(prefix="shoal-demo-dispatch-") as tmpname:
        tmp = Path(tmpname)
        dcfg = DispatcherConfig(
            daemon=DaemonSection(metrics_listen=ListenAddr("127.0.0.1", 0), state_directory=str(tmp / "dispatcher"),
                                 log_level="warning"),
            # The tour submits over the dispatcher's submit socket, as the demo's own user.
            dispatcher=DispatcherSection(rpc_listen=ListenAddr("127.0.0.1", 0), lease_seconds=3.0,
                                         submit_socket=tmp / "submit.sock", submit_users=(str(os.getuid()),)),
        )
        async with trio.open_nursery() as nursery:
            dctx = await nursery.start(partial(serve, "dispatcher", dcfg, None, DispatcherApp, handle_signals=False))
            addr = dctx.addresses["rpc"]
            print(f"shoal dispatcher: rpc {addr}  metrics http://{dctx.addresses['metrics']}/metrics", file=out)
            wctxs = []
            for name in WORKERS:
                wcfg = WorkerConfig(
                    daemon=DaemonSection(metrics_listen=ListenAddr("127.0.0.1", 0), log_level="warning",
                                         state_directory=str(tmp / name)),
                    # The tour's tasks are this Python (sys.executable, perhaps under a private
                    # home) writing into a private temporary directory: they run as the demo's
                    # own user. A deployed worker runs them as task_user (docs/dispatch.md).
                    worker=WorkerSection(dispatcher=addr, id=name, slots=2, heartbeat_interval=0.5,
                                         reconnect_interval=0.1, task_user=str(os.getuid())),
                )
                wctxs.append(await nursery.start(partial(serve, "worker", wcfg, None, WorkerApp, handle_signals=False)))
            print(f"shoal workers: {', '.join(WORKERS)} (2 slots each)", file=out)
            try:
                code = await _run(tmp / "submit.sock", timeout, out)
            finally:
                for ctx in (*wctxs, dctx):
                    ctx.request_stop()
        return code


async def _run(submit_socket: Path, timeout: float, out) -> int:
    async with await connect_unix(submit_socket) as c:
        with trio.fail_after(30):
            while len(await c.call("workers")) < len(WORKERS):  # noqa: ASYNC110 - polls another process's state; there is no event to wait on
                await trio.sleep(0.05)
        spec = demo_job()
        reply = await c.call("submit", {"spec": json.dumps(spec).encode()})
        print(f"submitted job {reply['job']}: {reply['tasks']} tasks in {reply['units']} units "
              f"(prepare -> 8 x square, each reading prepare's data.txt -> [check -> summarise -> report])",
              file=out)
        start = trio.current_time()
        while True:
            job = await c.call("job", {"id": reply["job"]})
            elapsed = trio.current_time() - start
            print(_view(job, await c.call("workers"), elapsed), file=out, flush=True)
            if job["state"] != "running":
                break
            if elapsed > timeout:
                print(f"timed out after {timeout:.0f}s", file=out)
                return 1
            await trio.sleep(REFRESH)  # a display refresh, not synchronisation
        print(f"job {job['id']} {job['state']} in {job['finished'] - job['submitted']:.2f}s:", file=out)
        for t in job["tasks"]:
            took = t["finished"] - t["started"] if t["finished"] else 0.0
            print(f"  {t['task']:<10} {t['state']:<6} on {t['worker'] or '-':<7} exit {t['exit_code']}"
                  f"  {took:5.2f}s  unit {t['unit']}", file=out)
        logs = await c.call("job", {"id": job["id"], "logs": True})
        squares = sorted(int(t["stdout"]) for t in logs["tasks"] if t["task"].startswith("square"))
        print(f"squares computed by the fan: {squares}", file=out)
        used = {t["worker"] for t in job["tasks"] if t["task"].startswith("square")}
        print(f"the fan ran on {len(used)} workers: {', '.join(sorted(used))}", file=out)
        producer = next(t["worker"] for t in job["tasks"] if t["task"] == "prepare")
        fetched = sorted(used - {producer})
        print(f"prepare's data.txt was made on {producer} and fetched by {', '.join(fetched) or 'no other worker'}",
              file=out)
        return 0 if job["state"] == "done" and squares == [v * v for v in range(1, 9)] else 1
