"""Task isolation, for real: a root worker's tasks run as the task user, in their own cgroup
(the test makes one under its own cgroup), and die with the worker even after kill -9.

These need root (CI runs as root): only root can switch to the task user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher, start_worker, wait_job, wait_workers
from tests.harness import DaemonFailed, scrape

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to the task user needs root")

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A work_dir the task user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="shoal-iso-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _own_memory_cgroup() -> Path | None:
    """The memory cgroup this test process is in (v1 memory controller or v2), if it is not the top."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
        elif controllers == "" and len(Path("/proc/self/cgroup").read_text().splitlines()) == 1:
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        else:
            continue
        if rel.strip("/") and base.is_dir() and os.access(base, os.W_OK):
            return base
    return None


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A cgroup the test makes under its own (never at the top of the machine's hierarchy)."""
    own = _own_memory_cgroup()
    if own is None:
        pytest.skip("no writable memory cgroup under this process's own")
    d = own / f"shoal-test-{os.getpid()}"
    d.mkdir()
    try:
        yield d
    finally:
        for sub in d.glob("task-*"):  # only if the worker failed to remove them
            for pid in (sub / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                sub.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (their uid too)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if marker in p.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace"):
                out.append(int(p.name))
        except OSError:
            continue
    return out


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


async def _submit(c, tasks: list[dict]) -> int:
    return (await c.call("submit", {"spec": json.dumps({"name": "iso", "tasks": tasks}).encode()}))["job"]


async def test_a_task_runs_as_the_task_user_and_cannot_signal_a_daemon(tmp_path, open_dir):
    async with await start_dispatcher(tmp_path) as d:
        async with await start_worker(tmp_path, d.addresses["rpc"], "w1", task_user="nobody",
                                      extra=f'work_dir = "{open_dir}"\ncgroup = "off"') as w, \
                await connect(d) as c:
            await wait_workers(c, 1)
            dpid, wpid = d.process.pid, w.process.pid
            by = {}
            for name, script in (("who", "id -u; id -G"), ("hup", f"kill -HUP {dpid}"),
                                 ("kill", f"kill -KILL {dpid} {wpid}")):
                j = await _submit(c, [{"name": name, "command": ["/bin/sh", "-c", script]}])
                await wait_job(c, j)
                by[name] = (await c.call("job", {"id": j, "logs": True}))["tasks"][0]
            assert by["who"]["state"] == "done" and by["who"]["stdout"].split() == [b"65534", b"65534"], by["who"]
            for name in ("hup", "kill"):
                assert by[name]["state"] == "failed" and by[name]["exit_code"] != 0, by[name]
                assert b"not permitted" in by[name]["stderr"], by[name]
            assert d.process.returncode is None and w.process.returncode is None  # both alive
            assert "reload" not in d.log.lower()  # the HUP never arrived
            assert await w.terminate() == 0
        assert await d.terminate() == 0


async def test_a_worker_refuses_a_work_dir_the_task_user_cannot_reach(tmp_path):
    # pytest's tmp_path is private to root: nobody could not even enter its task directories.
    with pytest.raises(DaemonFailed, match="cannot enter"):
        await start_worker(tmp_path, "127.0.0.1:9", "w1", task_user="nobody")


async def test_a_task_over_its_memory_limit_is_killed_and_reported(tmp_path, open_dir, cgroup):
    async with await start_dispatcher(tmp_path) as d:
        async with await start_worker(tmp_path, d.addresses["rpc"], "w1", task_user="nobody",
                                      extra=f'work_dir = "{open_dir}"\ncgroup = "{cgroup}"') as w, \
                await connect(d) as c:
            await wait_workers(c, 1)
            by = {}
            for name, cmd in (("hog", ["tail", "/dev/zero"]),  # grows without bound
                              ("small", ["/bin/sh", "-c", "cat /proc/self/cgroup"])):
                j = await _submit(c, [{"name": name, "memory": "64MiB", "command": cmd}])
                await wait_job(c, j)
                by[name] = dict((await c.call("job", {"id": j, "logs": True}))["tasks"][0], job=j)
            assert by["hog"]["state"] == "failed" and by["hog"]["error"] == "memory limit exceeded (64 MiB)", by["hog"]
            assert by["small"]["state"] == "done", by["small"]
            assert f"{cgroup.name}/task-".encode() in by["small"]["stdout"]  # it ran in its own cgroup
            r = subprocess.run([*SHOAL, "job", str(by["hog"]["job"]), "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and "(memory limit exceeded (64 MiB))" in r.stdout, r
            text = await scrape(w.addresses["metrics"])
            assert metric(text, "shoal_worker_tasks_memory_killed_total") == 1
            assert await w.terminate() == 0
        assert await d.terminate() == 0
    assert not list(cgroup.glob("task-*"))  # every task cgroup was removed


@pytest.mark.parametrize("where", ["process-group", "cgroup"])
async def test_a_killed_worker_leaves_no_task_process_behind(tmp_path, open_dir, where, request):
    extra = f'work_dir = "{open_dir}"\n'
    extra += f'cgroup = "{request.getfixturevalue("cgroup")}"' if where == "cgroup" else 'cgroup = "off"'
    # a command line no other process has
    marker = f"sleep {3000 + os.getpid() % 1000 + (1000 if where == 'cgroup' else 0)}"
    # The leader and a child in the background; in a cgroup also a grandchild in a session of
    # its own (a process group cannot hold that one: docs/dispatch.md says so).
    escape = f"setsid /bin/sh -c '{marker}' & " if where == "cgroup" else ""
    want = 5 if where == "cgroup" else 3
    async with await start_dispatcher(tmp_path) as d:
        try:
            w = await start_worker(tmp_path, d.addresses["rpc"], "w1", task_user="nobody", extra=extra)
            async with w, await connect(d) as c:
                await wait_workers(c, 1)
                await _submit(c, [{"name": "tree", "command": ["/bin/sh", "-c", f"{marker} & {escape}{marker}"]}])
                with trio.fail_after(20):
                    while len(pids := _pids_with(marker)) < want:  # noqa: ASYNC110 - polls /proc: no event
                        await trio.sleep(0.02)
                assert {_uid_of(p) for p in pids} == {NOBODY}
                await w.kill()
                with trio.fail_after(10):
                    while _pids_with(marker):  # noqa: ASYNC110 - polls /proc: no event to wait on
                        await trio.sleep(0.02)
        finally:  # a failed run leaves nothing either (one left two sleeps as nobody for the next hour)
            with contextlib.suppress(ProcessLookupError):
                for p in _pids_with(marker):
                    os.kill(p, signal.SIGKILL)
        assert await d.terminate() == 0


async def test_a_tasks_group_is_the_reapers_before_the_worker_hears_of_it():
    # The worker tells the reaper a task's process group after the spawn returns; killed in
    # between (a CI run), the task's children outlived it. The leader tells it itself now.
    from shoal.daemons.worker.isolation import Isolation, Reaper, task_subprocess_kwargs

    iso = Isolation(None, None)  # process groups, tasks as this user
    iso.reaper = await Reaper.start([])
    marker = f"sleep {5000 + os.getpid() % 1000}"
    try:
        proc = await trio.lowlevel.open_process(["/bin/sh", "-c", f"{marker} & {marker}"],
                                                **task_subprocess_kwargs(iso, None))
        with trio.fail_after(20):
            while len(_pids_with(marker)) < 3:  # noqa: ASYNC110 - polls /proc: no event to wait on
                await trio.sleep(0.02)
        await iso.reaper.stop()  # the worker is gone before isolation.started(proc.pid): EOF
        with trio.fail_after(10):
            while _pids_with(marker):  # noqa: ASYNC110 - polls /proc: no event to wait on
                await trio.sleep(0.02)
        assert await proc.wait() == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            for p in _pids_with(marker):
                os.kill(p, signal.SIGKILL)


async def test_a_dead_reaper_does_not_stop_a_task_from_starting():
    # The leader writes to the reaper's pipe before exec; with the reaper gone that write is
    # EPIPE (and SIGPIPE, the default again in the child by then), which must not kill the task.
    from shoal.daemons.worker.isolation import Isolation, Reaper, task_subprocess_kwargs

    iso = Isolation(None, None)
    iso.reaper = await Reaper.start([])
    iso.reaper.proc.kill()
    await iso.reaper.proc.wait()
    try:
        result = await trio.run_process(["/bin/sh", "-c", "exit 7"], check=False, **task_subprocess_kwargs(iso, None))
        assert result.returncode == 7
    finally:
        await iso.reaper.stop()


def test_a_worker_that_cannot_switch_users_refuses_or_says_so_once(tmp_path, caplog):
    from shoal.daemons.runtime.config import ConfigError
    from shoal.daemons.worker.config import WorkerSection
    from shoal.daemons.worker.daemon import make_isolation

    work = tmp_path / "work"
    work.mkdir()
    os.seteuid(NOBODY)  # an unprivileged worker: its effective capabilities are gone too
    try:
        with pytest.raises(ConfigError, match=r"worker\.task_user: .* may not run tasks as daemon"):
            make_isolation(WorkerSection(task_user="daemon", cgroup="off"), work, "w.toml")
        with caplog.at_level("WARNING", logger="shoal.worker"):
            iso = make_isolation(WorkerSection(task_user="daemon", when_unprivileged="self", cgroup="off"), work,
                                 "w.toml")
    finally:
        os.seteuid(0)
    assert iso.user is None and iso.cgroups is None  # tasks run as the worker itself, in process groups
    said = [r.getMessage() for r in caplog.records if "cannot switch to the task user daemon" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert sum("not enforced" in r.getMessage() for r in caplog.records) == 1, caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_a_root_worker_does_not_take_the_cgroup_it_was_started_in_as_its_own():
    # Root may write every cgroup, including the one a test run or a shell put it in; two
    # workers taking that as "their own" killed each other's tasks at start-up. Only a
    # directory handed to the worker's (non-root) user counts (delegate_v1_cgroups).
    from shoal.daemons.worker.isolation import own_v1_cgroups

    assert own_v1_cgroups() is None
