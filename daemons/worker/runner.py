"""Running one task: inputs in, a process (or a builtin), bounded output, outputs checked.

Theory of operation
-------------------
Each command task runs in its own process (seed 002 runs each invocation in
its own engine thread; a process isolates crashes and memory), in a new session
so a timeout can kill the whole process group. stdout and stderr are read
concurrently into buffers that keep the first ``max_log_bytes`` and count the
rest, so a chatty task cannot exhaust the worker's memory.

A task with inputs or outputs gets its own directory ``<work_dir>/<job>/<task>``
(emptied first: an earlier attempt's leftovers must not pass for outputs).
Inputs are staged into it: an absolute path is copied, an http(s) URL
downloaded, ``swarm:FILE.torrent`` fetched by the swarm peer through
:class:`SwarmHook`, ``task:A/PATH`` (another task's output) fetched and
verified as :mod:`.outputs` says, into ``A/PATH``; each is bounded by
``max_input_bytes``. A task's declared outputs are published after it
succeeds (``publisher``: the worker's :class:`~.outputs.OutputServer`). After a zero exit
every declared output must exist and fit its ``max_bytes``; its size and
SHA-256 go into the result. Tasks without files run in ``work_dir``.

The builtin ``sleep N`` runs inside the worker, for invocation-rate and RPE
benchmarks (seed 002's "sleep 0" workflows).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from shoal.core.dispatch.jobs import TASK_INPUT, task_input
from shoal.daemons.worker.isolation import Isolation, IsolationError, TaskCgroup, task_subprocess_kwargs
from shoal.daemons.worker.outputs import FetchError, fetch_task_input
from shoal.protocol.dispatch import FetchSource, TaskResult, TaskSpec, UnitKey

log = logging.getLogger("shoal.worker")

__all__ = ["InputError", "RunLimits", "SwarmHook", "run_task"]

READ_CHUNK = 65536


class InputError(Exception):
    """An input could not be staged; the task is not run."""


@dataclass(frozen=True, slots=True)
class RunLimits:
    work_dir: Path
    max_log_bytes: int = 65536
    max_input_bytes: int = 1 << 30


class SwarmHook:
    """Fetch ``swarm:FILE.torrent`` inputs through the local swarm peer daemon.

    The peer's control socket takes the .torrent (``add``, downloading into
    ``dest_dir``) and answers ``wait`` once the torrent is complete; the
    caller bounds the whole fetch with the task's timeout. The peer keeps
    seeding the file for the other workers that need it.
    """

    WAIT_STEP = 20.0  # one `wait` call, below the peer's RPC request timeout

    def __init__(self, socket_path: Path | None) -> None:
        self.socket_path = socket_path

    async def fetch(self, torrent: Path, dest_dir: Path, limit: int) -> Path:
        if self.socket_path is None:
            raise InputError(f"swarm:{torrent}: no swarm peer configured ([worker] peer_socket)")
        from shoal.daemons.runtime.rpc import RpcError, connect_unix
        from shoal.protocol.errors import RemoteProtocolError
        from shoal.protocol.metainfo import parse_metainfo

        try:
            raw = await trio.Path(torrent).read_bytes()
            meta = parse_metainfo(raw)
        except OSError as exc:
            raise InputError(f"swarm:{torrent}: {exc.strerror or exc}") from None
        except RemoteProtocolError as exc:
            raise InputError(f"swarm:{torrent}: not a valid .torrent ({exc})") from None
        if meta.total_length > limit:
            raise InputError(f"swarm:{torrent}: {meta.total_length} bytes, above max_input_bytes")
        try:
            async with await connect_unix(self.socket_path) as peer:
                await peer.call("add", {"torrent": raw, "dest": str(dest_dir)})
                while True:
                    try:
                        row = await peer.call("wait", {"info_hash": meta.info_hash.hex()}, timeout=self.WAIT_STEP)
                    except RpcError as exc:
                        if exc.code == "timeout":
                            continue  # still downloading: wait again
                        raise
                    if row["left"] == 0:
                        # where the peer has it: an earlier task's directory if it was added before
                        return Path(row["path"]) / meta.name
        except (OSError, RpcError) as exc:
            raise InputError(f"swarm:{torrent}: the swarm peer failed: {exc}") from None


    async def seed(self, path: Path, tracker: str) -> tuple[str, str]:
        """Seed a finished task's output through the peer; its (info-hash hex, magnet link)."""
        from shoal.daemons.runtime.pieces import hash_files
        from shoal.daemons.runtime.rpc import RpcError, connect_unix
        from shoal.protocol.metainfo import create_metainfo, parse_metainfo

        if self.socket_path is None:
            raise ValueError("no swarm peer configured")
        size = (await trio.Path(path).stat()).st_size
        piece = 16 * 1024
        while size // piece > 2000 and piece < 16 << 20:  # about 1,000-2,000 pieces
            piece *= 2
        layout = [((path.name,), size)]
        pieces = await trio.to_thread.run_sync(hash_files, path.parent, layout, piece)
        raw, _info_hash = create_metainfo(path.name, layout, piece, pieces, [[tracker]])
        meta = parse_metainfo(raw)
        try:
            async with await connect_unix(self.socket_path) as peer:
                await peer.call("add", {"torrent": raw, "dest": str(path.parent)})
        except RpcError as exc:
            raise ValueError(f"the swarm peer refused it: {exc}") from None
        return meta.info_hash.hex(), meta.magnet().uri()

    async def unseed(self, info_hash: str) -> None:
        from shoal.daemons.runtime.rpc import RpcError, connect_unix

        if self.socket_path is None:
            return
        try:
            async with await connect_unix(self.socket_path) as peer:
                await peer.call("remove", {"info_hash": info_hash})
        except RpcError as exc:
            raise ValueError(str(exc)) from None

    async def fetch_magnet(self, magnet: str, dest_dir: Path, limit: int) -> Path:
        """Fetch by info-hash (a magnet link: the metadata comes from the peers, BEP 9)."""
        from shoal.daemons.runtime.rpc import RpcError, connect_unix
        from shoal.protocol.errors import RemoteProtocolError
        from shoal.protocol.metainfo import parse_magnet

        if self.socket_path is None:
            raise InputError(f"{magnet[:60]}: no swarm peer configured ([worker] peer_socket)")
        try:
            info_hash = parse_magnet(magnet).info_hash.hex()
        except RemoteProtocolError as exc:
            raise InputError(f"not a magnet link ({exc})") from None
        try:
            async with await connect_unix(self.socket_path) as peer:
                await peer.call("add", {"magnet": magnet, "dest": str(dest_dir)})
                while True:
                    try:
                        row = await peer.call("wait", {"info_hash": info_hash}, timeout=self.WAIT_STEP)
                    except RpcError as exc:
                        if exc.code == "timeout":
                            continue
                        raise
                    if row["size"] > limit:
                        raise InputError(f"{row['name']}: {row['size']} bytes, above max_input_bytes")
                    if row["left"] == 0:
                        return Path(row["path"]) / row["name"]
        except (OSError, RpcError) as exc:
            raise InputError(f"the swarm peer failed: {exc}") from None


def _link_or_copy(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(src, dest)


def _link_or_copy_file(src, dest) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _bounded_copy(src: Path, dest: Path, limit: int) -> None:
    size = src.stat().st_size
    if size > limit:
        raise InputError(f"{src}: {size} bytes, above max_input_bytes ({limit})")
    shutil.copyfile(src, dest)


def _download(url: str, dest: Path, limit: int, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:  # noqa: S310 - http(s) only
        got = 0
        while chunk := resp.read(READ_CHUNK):
            got += len(chunk)
            if got > limit:
                raise InputError(f"{url}: larger than max_input_bytes ({limit})")
            out.write(chunk)


async def stage_inputs(inputs: list[str], cwd: Path, limits: RunLimits, swarm: SwarmHook, timeout: float,
                       sources: list[list[Any]] | None = None, job: str = "", metrics: Any = None) -> None:
    where = {s.input: s for s in map(FetchSource.from_row, sources or [])}
    for src in inputs:
        try:
            if src.startswith(TASK_INPUT):  # another task's output: staged as <producer>/<path>
                if src not in where:
                    raise InputError(f"{src}: the lease says nothing of where it is")
                producer, rel = task_input(src)
                try:
                    how = await fetch_task_input(where[src], job, limits.work_dir, cwd / producer / rel,
                                                 limits.max_input_bytes, swarm, timeout)
                except FetchError as exc:
                    raise InputError(str(exc)) from None
                if metrics is not None:
                    metrics.inputs_fetched.labels(how).inc()
            elif src.startswith("swarm:"):
                with trio.fail_after(timeout):
                    got = await swarm.fetch(Path(src[6:]), cwd / ".swarm", limits.max_input_bytes)
                # A hard link (or a copy across file systems): the peer keeps seeding its path.
                await trio.to_thread.run_sync(_link_or_copy, got, cwd / got.name)
            elif src.startswith(("http://", "https://")):
                name = src.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "download"
                await trio.to_thread.run_sync(_download, src, cwd / name, limits.max_input_bytes, timeout)
            else:
                await trio.to_thread.run_sync(_bounded_copy, Path(src), cwd / Path(src).name, limits.max_input_bytes)
        except InputError:
            raise
        except trio.TooSlowError:
            raise InputError(f"{src}: not fetched within the task's timeout") from None
        except OSError as exc:  # urllib's URLError is an OSError
            raise InputError(f"{src}: {getattr(exc, 'reason', None) or exc.strerror or exc}") from None


class _Capture:
    """Keep the first ``limit`` bytes of a stream; count the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(READ_CHUNK):
            room = self.limit - self.kept
            if room > 0:
                self.chunks.append(bytes(chunk[:room]))
                self.kept += min(room, len(chunk))
            self.dropped += max(0, len(chunk) - max(room, 0))

    def value(self) -> bytes:
        return b"".join(self.chunks)


async def run_task(task: TaskSpec | dict[str, Any], key: str, attempt: int, limits: RunLimits, swarm: SwarmHook,
                   metrics: Any = None, *, isolation: Isolation | None = None, cpus: float = 0.0,
                   memory: int = 0, publisher: Any = None) -> TaskResult:
    """Run one task of the unit ``key`` to completion; never raises for the task's own failures.

    ``task`` is a leased :class:`TaskSpec` (or its map form, decoded here).
    With ``isolation`` (the worker always passes it) the process runs as the
    task user, in its own cgroup bounded by ``cpus`` and ``memory`` (bytes,
    0 = unbounded) when the worker manages cgroups, and dies with the worker
    (:mod:`.isolation`).
    """
    if isinstance(task, dict):
        task = TaskSpec.decode(task)
    name = task.name
    started = time.time()
    if task.builtin:
        _, secs = task.builtin.split()
        await trio.sleep(float(secs))
        return TaskResult(name, 0, started, time.time())
    job = UnitKey.job_of(key)
    cwd = limits.work_dir
    if task.inputs or task.outputs:
        cwd = limits.work_dir / job / name
        if cwd.exists():
            if isolation is not None:
                await isolation.clean_dir(cwd)
            else:
                await trio.to_thread.run_sync(shutil.rmtree, cwd)
        cwd.mkdir(parents=True)
        if isolation is not None:
            isolation.prepare_dir(cwd)
        try:
            await stage_inputs(task.inputs, cwd, limits, swarm, task.timeout, task.sources, job, metrics)
        except InputError as exc:
            if metrics is not None:
                metrics.input_errors.inc()
            return TaskResult(name, None, started, time.time(), error=f"input: {exc}")
    env = dict(os.environ, SHOAL_JOB=job, SHOAL_TASK=name, SHOAL_ATTEMPT=str(attempt))
    cgroup = None
    if isolation is not None:
        env = isolation.env(env)
        if isolation.cgroups is not None:
            try:
                cgroup = isolation.cgroups.create(cpus, memory)
            except (OSError, IsolationError) as exc:
                return TaskResult(name, None, started, time.time(), error=f"cannot make the task's cgroup: {exc}")
    try:
        result = await _run_process(task, cwd, env, limits, metrics, isolation, cgroup, started)
    finally:
        if cgroup is not None:
            await _remove_cgroup(cgroup)
    if publisher is not None and result.ok and result.outputs:  # for tasks that take them as inputs
        result.source = await publisher.publish(int(job), name, cwd, result.outputs)
    return result


async def _remove_cgroup(cgroup: TaskCgroup) -> None:
    """Kill what the task left in its cgroup and remove it (bounded: a dying process leaves in microseconds)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        while True:
            cgroup.kill()
            if cgroup.empty() and cgroup.remove():
                return
            await trio.sleep(0.01)  # poll the kernel's view: killed processes leave the cgroup when reaped
    log.warning("task cgroup %s is not empty after 5 s; left for the next start", cgroup.dirs[0])


async def _run_process(task: TaskSpec, cwd: Path, env: dict[str, str], limits: RunLimits, metrics: Any,
                       isolation: Isolation | None, cgroup: TaskCgroup | None, started: float) -> TaskResult:
    name = task.name
    out, err = _Capture(limits.max_log_bytes), _Capture(limits.max_log_bytes)
    try:
        proc = await trio.lowlevel.open_process(
            task.command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, **task_subprocess_kwargs(isolation, cgroup))
    except (OSError, subprocess.SubprocessError) as exc:
        return TaskResult(name, None, started, time.time(),
                          error=f"cannot start {task.command[0]!r}: {getattr(exc, 'strerror', None) or exc}")
    if isolation is not None:
        isolation.started(proc.pid)
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None  # both are pipes
    error = ""
    try:
        with trio.move_on_after(task.timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.drain, stdout)
                nursery.start_soon(err.drain, stderr)
                await proc.wait()
        if scope.cancelled_caught:
            error = f"timeout after {task.timeout:g}s"
    finally:
        # The whole process group goes, leader or not: a task leaves nothing running behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.returncode is None:
            with trio.CancelScope(shield=True):
                await proc.wait()
        if isolation is not None:
            isolation.ended(proc.pid)
        for pipe in (stdout, stderr):
            await trio.aclose_forcefully(pipe)
    code = proc.returncode
    if not error and code != 0 and cgroup is not None and cgroup.oom_killed():
        error = f"memory limit exceeded ({cgroup.memory_limit / 2**20:g} MiB)"
        if metrics is not None:
            metrics.memory_kills.inc()
    if metrics is not None and (out.dropped or err.dropped):
        metrics.truncated.inc(out.dropped + err.dropped)
    outputs: list[list[Any]] = []
    if code == 0 and not error:
        error, outputs = await trio.to_thread.run_sync(_check_outputs, cwd, task.outputs)
    return TaskResult(name, None if error.startswith("timeout") else code, started, time.time(), error=error,
                      stdout=out.value(), stderr=err.value(), outputs=outputs)


def _check_outputs(cwd: Path, declared: list[list[Any]]) -> tuple[str, list[list[Any]]]:
    found = []
    for rel, limit in declared:
        path = cwd / rel
        try:
            st = path.lstat()  # the task's own link to a file it cannot read is not its output
        except OSError:
            return f"output {rel!r} is missing", []
        if not stat.S_ISREG(st.st_mode):
            return f"output {rel!r} is not a regular file", []
        size = st.st_size
        if size > limit:
            return f"output {rel!r} is {size} bytes, above its max_bytes ({limit})", []
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        found.append([rel, size, h.hexdigest()])
    return "", found
