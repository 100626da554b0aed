"""Start real dispatcher and worker daemons (subprocesses) on 127.0.0.1 port 0 for tests."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.rpc import RpcClient, connect_unix
from tests.harness import RunningDaemon, start_daemon

SHOAL = [sys.executable, "-m", "shoal.cli.main"]


def dispatcher_config(path: Path, *, lease: float = 1.0, extra: str = "") -> Path:
    path.write_text(f"""
[daemon]
log_level = "debug"
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0

[dispatcher]
rpc_listen = "127.0.0.1:0"
lease_seconds = {lease}
{extra}
""")
    return path


def worker_config(path: Path, dispatcher: ListenAddr, worker_id: str, *, slots: int = 2, extra: str = "",
                  task_user: str | None = None) -> Path:
    """A worker config. Tasks run as the test's own user unless ``task_user`` is given: the
    general daemon tests run the test interpreter (sys.executable, perhaps under a private
    home) and write into pytest's private tmp_path; tests/worker/test_isolation.py tests the
    task user itself."""
    user = str(os.getuid()) if task_user is None else task_user
    path.write_text(f"""
[daemon]
log_level = "debug"
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0

[worker]
dispatcher = "{dispatcher}"
id = "{worker_id}"
slots = {slots}
heartbeat_interval = 0.2
reconnect_interval = 0.1
task_user = "{user}"
{extra}
""")
    return path


async def start_dispatcher(tmp: Path, *, state_dir: Path | None = None, lease: float = 1.0,
                           extra: str = "") -> RunningDaemon:
    """A dispatcher whose submit socket is ``d.submit_socket``: in a short directory every user
    may enter (a unix socket path has at most 108 bytes; tests connect as other users too)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="shoal-sub-"))
    os.chmod(sock_dir, 0o755)
    atexit.register(shutil.rmtree, sock_dir, True)  # the socket outlives the test's daemon by design
    sock = sock_dir / "submit.sock"
    cfg = dispatcher_config(tmp / "dispatcher.toml", lease=lease, extra=f'submit_socket = "{sock}"\n{extra}')
    d = await start_daemon([*SHOAL, "dispatcher", "run", "--config", str(cfg)],
                           state_dir=state_dir or tmp / "dispatcher-state")
    d.submit_socket = sock  # type: ignore[attr-defined]  # the harness's daemon record knows no sockets
    return d


async def start_worker(tmp: Path, dispatcher: ListenAddr, worker_id: str, *, slots: int = 2,
                       extra: str = "", task_user: str | None = None) -> RunningDaemon:
    cfg = worker_config(tmp / f"{worker_id}.toml", dispatcher, worker_id, slots=slots, extra=extra,
                        task_user=task_user)
    return await start_daemon([*SHOAL, "worker", "run", "--config", str(cfg)], state_dir=tmp / f"{worker_id}-state")


async def wait_workers(client: RpcClient, n: int, timeout: float = 20.0) -> list[dict]:
    """Poll the dispatcher until ``n`` workers are registered (a real condition)."""
    with trio.fail_after(timeout):
        while True:
            rows = await client.call("workers")
            if len(rows) >= n:
                return rows
            await trio.sleep(0.05)


async def wait_job(client: RpcClient, job_id: int, timeout: float = 30.0) -> dict:
    """Poll the dispatcher until the job is no longer running."""
    with trio.fail_after(timeout):
        while True:
            view = await client.call("job", {"id": job_id})
            if view["state"] != "running":
                return view
            await trio.sleep(0.05)


async def connect(d: RunningDaemon) -> RpcClient:
    """A client on the dispatcher's submit socket (as the test's user, root: on the allow-list)."""
    return await connect_unix(d.submit_socket)  # type: ignore[attr-defined]


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` includes its labels)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name} in /metrics")
