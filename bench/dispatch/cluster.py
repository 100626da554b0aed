"""Shared by the live dispatch benchmarks: a dispatcher and N workers on loopback."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import start_daemon  # noqa: E402

from shoal.daemons.runtime.config import ListenAddr  # noqa: E402
from shoal.daemons.runtime.rpc import connect_tcp  # noqa: E402


class Cluster:
    """``with Cluster(workers=2, slots=4) as c:`` then ``trio.run(c.run_job, spec)``."""

    def __init__(self, workers: int, slots: int, prefetch: int = 0, policy: str = "least-load",
                 dispatcher_extra: str = "") -> None:
        self.n, self.slots, self.prefetch, self.policy = workers, slots, prefetch, policy
        self.extra = dispatcher_extra
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Cluster:
        self.tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
        # Submitting needs a credential even on loopback: the bench's clients and
        # workers share one RPC token.
        self.token_file = self.tmp / "rpc.token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token = self.token_file.read_bytes()
        cfg = self.tmp / "dispatcher.toml"
        cfg.write_text(f"""[daemon]
log_level = "warning"
metrics_listen = ""
state_directory = "{self.tmp / 'dstate'}"
[dispatcher]
rpc_listen = "127.0.0.1:0"
token_file = "{self.token_file}"
policy = "{self.policy}"
max_tasks_per_job = 1000000
max_pull = 1024
max_spec_bytes = 921600
lease_seconds = 30.0
{self.extra}
""")
        try:
            return self._start()
        except BaseException:
            self.__exit__()
            raise

    def _start(self) -> Cluster:
        cfg = self.tmp / "dispatcher.toml"
        proc, addrs = start_daemon("dispatcher", cfg, self._notify_dir("dispatcher"))
        self.procs.append(proc)
        self.addr = ListenAddr(*addrs["rpc"])
        for i in range(self.n):
            wcfg = self.tmp / f"w{i}.toml"
            wcfg.write_text(f"""[daemon]
log_level = "warning"
metrics_listen = ""
state_directory = "{self.tmp / f'w{i}'}"
[worker]
dispatcher = "{self.addr}"
id = "w{i:02d}"
slots = {self.slots}
prefetch = {self.prefetch}
heartbeat_interval = 2.0
token_file = "{self.token_file}"
# Tasks run as the bench's own user: this measures dispatch, and the interpreter
# the tasks run may live where a dedicated task user cannot reach it.
task_user = "{os.getuid()}"
when_unprivileged = "self"
""")
            proc, _ = start_daemon("worker", wcfg, self._notify_dir(f"w{i}"))
            self.procs.append(proc)
        trio.run(self._wait_workers)
        return self

    def _notify_dir(self, name: str) -> Path:
        d = self.tmp / "notify" / name  # start_daemon binds <dir>/<daemon>.notify
        d.mkdir(parents=True)
        return d

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def _wait_workers(self) -> None:
        async with await connect_tcp(self.addr, token=self.token) as c:
            with trio.fail_after(60):
                while len(await c.call("workers")) < self.n:  # noqa: ASYNC110 - polls another process's state; there is no event to wait on
                    await trio.sleep(0.05)

    async def call(self, method: str, params=None):
        async with await connect_tcp(self.addr, token=self.token) as c:
            return await c.call(method, params)

    async def run_job(self, spec: dict, timeout: float = 600.0) -> dict:
        """Submit, wait until done; returns the job row with the dispatcher's own timings."""
        async with await connect_tcp(self.addr, token=self.token) as c:
            t0 = time.time()
            reply = await c.call("submit", {"spec": json.dumps(spec).encode()}, timeout=600.0)
            with trio.fail_after(timeout):
                while True:
                    rows = await c.call("jobs", {"limit": 5})
                    row = next(r for r in rows if r["id"] == reply["job"])
                    if row["state"] != "running":
                        break
                    await trio.sleep(0.02)
            row["client_seconds"] = time.time() - t0
            row["seconds"] = row["finished"] - row["submitted"]
            return row


def save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path}")
