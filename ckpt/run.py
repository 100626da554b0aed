"""``shoal ckpt run``: N ranks of the user's own program, a failed rank restarted under its id.

Theory of operation
-------------------
The program is any executable whose ranks build their :class:`~shoal.ckpt.Rank`
with :func:`shoal.ckpt.rank_from_env`; this module tells each rank process who
it is through the ``SHOAL_CKPT_*`` environment variables (:data:`shoal.ckpt.env.ENV`).

Coordinator and backup. Given ``--coordinator`` (and optionally ``--backup``,
which is then checked against the coordinator's own), the ranks use it and
``--token-file`` is required. Otherwise a backup and a coordinator are served
in this process (:func:`shoal.ckpt.launcher.serve_role`, the daemon found
through the runtime's registry) on ``--listen``'s host, port of the kernel's
choosing, with the token of ``--token-file`` or a fresh random one written to
a private temporary file. Every RPC listener (coordinator, backup, each rank's
own server) requires the token, on loopback too.

Ranks. Rank ``i`` runs on ``hosts[i % len(hosts)]`` (default: ``--listen``'s
host): its own server listens on that address. A loopback host runs the
program here; any other is started through ``--spawn`` (default
``ssh -o BatchMode=yes {host}``) as ``env SHOAL_CKPT_...=... PROGRAM ARGS``.
Each process is the leader of its own process group; whatever is left of the
group is killed when the leader exits.

Restarts (as SCR's ``scr_srun`` restarts a job, here one rank at a time). A rank
process that exits non-zero or is killed is started again with the same rank
id, and the library makes it the replacement: it joins under that id, receives
the lost checkpoint from the survivors and the parity, and the survivors roll
back. A rank that fails after the group finished is not restarted (there is
no group left to recover it from): the run fails. At most ``--max-restarts``
restarts in all; past that, once the group has failed at the coordinator (more
ranks lost at once than the parity survives), at ``--timeout``, or when the
launcher gets SIGTERM, SIGHUP or SIGINT (Ctrl-C does not reach the ranks' own
process groups), every rank is stopped (SIGTERM, SIGKILL after
:data:`STOP_GRACE`) and the run fails with a one-line reason.

The end. The run succeeds only if every rank's last process exited 0 *and* the
coordinator saw the group finish; a program that exits 0 without running its
rank is a failure, not a success. The report gives the group's O, L and R as
the coordinator measured them (``shoal ckpt status``'s figures).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from shoal.ckpt.env import ENV
from shoal.ckpt.launcher import figures, fresh_token, serve_role
from shoal.ckpt.link import unwrap
from shoal.daemons.runtime.config import ListenAddr, read_token
from shoal.daemons.runtime.rpc import RpcClient, RpcError, connect_tcp

__all__ = ["RunResult", "run_program"]

#: How long stopped ranks get between SIGTERM and SIGKILL.
STOP_GRACE = 5.0
#: How often the coordinator's status is read while the ranks run (phase, figures).
POLL_INTERVAL = 0.5
DEFAULT_SPAWN = "ssh -o BatchMode=yes {host}"


@dataclass
class RunResult:
    ok: bool
    reason: str  # why the run failed, one line ("" when ok)
    group: dict[str, Any] | None  # the group's last status record at the coordinator
    starts: dict[int, int] = field(default_factory=dict)  # processes started per rank
    elapsed: float = 0.0

    @property
    def restarts(self) -> int:
        return sum(self.starts.values()) - len(self.starts)


class GiveUp(Exception):
    """The run cannot succeed; the message is the one-line reason."""


class Unreachable(Exception):
    """The coordinator did not answer a status call (the message says why)."""


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def failure(g: dict[str, Any]) -> str:
    """Why a group failed, as the coordinator says (a coordinator without reasons: the one cause it knew)."""
    return g.get("reason") or f"more ranks were lost at once than its {g.get('m', 1)} parity shard(s) survive"


def check_hosts(hosts: Sequence[str]) -> list[ListenAddr]:
    """Each ``--hosts`` entry as a rank's listen address (an IP address, port 0); ValueError naming a bad one."""
    out = []
    for h in hosts:
        try:
            out.append(ListenAddr.parse(f"[{h}]:0" if ":" in h else f"{h}:0"))
        except ValueError as exc:
            raise ValueError(f"--hosts {h!r}: {exc}") from None
    return out


class Supervisor:
    """Starts the ranks, restarts the failed ones, watches the group at the coordinator."""

    def __init__(self, argv: Sequence[str], n: int, *, group: str, coordinator: ListenAddr, token_file: Path,
                 token: bytes, hosts: Sequence[ListenAddr], spawn: str | None, mode: str, interval: float,
                 shards: int, max_restarts: int, out: TextIO) -> None:
        self.argv, self.n, self.group, self.coordinator = list(argv), n, group, coordinator
        self.token_file, self.token, self.hosts, self.spawn = token_file, token, hosts, spawn
        self.settings = {"mode": mode, "interval": repr(interval), "shards": str(shards)}
        self.max_restarts, self.out = max_restarts, out
        self.starts = dict.fromkeys(range(n), 0)
        self.finished: set[int] = set()
        self.procs: dict[int, trio.Process] = {}
        self.all_finished = trio.Event()
        self.last: dict[str, Any] | None = None  # the group's record, as last read
        self.client: RpcClient | None = None  # to the coordinator, for status
        self.status_lock = trio.Lock()
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.t0:6.2f}s] {text}", file=self.out, flush=True)

    def command(self, i: int) -> tuple[list[str], dict[str, str] | None]:
        host = self.hosts[i % len(self.hosts)]
        values = {ENV["coordinator"]: str(self.coordinator), ENV["token_file"]: str(self.token_file),
                  ENV["group"]: self.group, ENV["rank"]: str(i), ENV["n"]: str(self.n),
                  ENV["listen"]: str(host), ENV["start"]: str(self.starts[i])}
        values.update({ENV[k]: v for k, v in self.settings.items()})
        spawn = self.spawn if self.spawn is not None else ("" if host.is_loopback else DEFAULT_SPAWN)
        if not spawn:
            return self.argv, {**os.environ, **values}
        prefix = shlex.split(spawn.format(host=host.host))
        return [*prefix, "env", *(f"{k}={v}" for k, v in values.items()), *map(shlex.quote, self.argv)], None

    async def status(self) -> dict[str, Any] | None:
        """The group's record at the coordinator (None: not there); connects again after an error."""
        async with self.status_lock:  # one connection, one call at a time (the watch and the rank tasks)
            try:
                if self.client is None:
                    self.client = await connect_tcp(self.coordinator, token=self.token, timeout=5.0)
                reply = await self.client.call("status", timeout=10.0)
            except (RpcError, OSError) as exc:
                if self.client is not None:
                    await self.client.aclose()
                    self.client = None
                raise Unreachable(f"the coordinator at {self.coordinator}: {exc}") from None
        for g in reply["groups"]:
            if g["group"] == self.group:
                self.last = g
                return g
        return None

    async def rank(self, i: int) -> None:
        while True:
            self.starts[i] += 1
            argv, env = self.command(i)
            try:
                proc = await trio.lowlevel.open_process(argv, env=env, stdin=subprocess.DEVNULL,
                                                        start_new_session=True)
            except OSError as exc:
                raise GiveUp(f"cannot start rank {i}: {argv[0]}: {exc.strerror or exc}") from None
            self.procs[i] = proc
            again = f" (restart {self.starts[i] - 1})" if self.starts[i] > 1 else ""
            self.say(f"rank {i}: pid {proc.pid}{again}")
            code = await proc.wait()
            _killpg(proc.pid, signal.SIGKILL)  # what the rank left behind in its process group
            if code == 0:
                self.say(f"rank {i}: finished")
                self.finished.add(i)
                if len(self.finished) == self.n:
                    self.all_finished.set()
                return
            why = f"rank {i} {exit_text(code)}"
            g = await self._status_or_none()
            if g is not None and g["phase"] == "failed":
                raise GiveUp(f"the group failed at the coordinator after {why}: {failure(g)}")
            if g is not None and g["phase"] == "finished":
                # Its result came out of the group's last step; a new process would join a group that is over.
                raise GiveUp(f"{why} after the group finished: not restarted, its result is lost")
            used = sum(self.starts.values()) - self.n
            if used >= self.max_restarts:
                raise GiveUp(f"{why}; all {self.max_restarts} restarts used, giving up")
            self.say(f"{why}; restarting it with the same id ({used + 1} of {self.max_restarts} restarts)")

    async def _status_or_none(self) -> dict[str, Any] | None:
        """The group's record, or the last one read while the coordinator cannot be reached."""
        try:
            return await self.status()
        except Unreachable:
            return self.last

    async def watch(self) -> None:
        """Keep the group's figures fresh; a group failed at the coordinator ends the run."""
        while True:
            g = await self._status_or_none()
            if g is not None and g["phase"] == "failed":
                raise GiveUp(f"the group failed at the coordinator: {failure(g)}")
            await trio.sleep(POLL_INTERVAL)  # a monitor's period, not a synchronisation

    @staticmethod
    async def signals(received: Any) -> None:
        """SIGTERM, SIGHUP or SIGINT to the launcher stops the ranks too (their process groups are their own)."""
        async for signum in received:
            raise GiveUp(f"stopped by {signal.Signals(signum).name}")

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.client is not None:
                with trio.CancelScope(shield=True):
                    await self.client.aclose()

    async def _run(self) -> None:
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as received:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.signals, received)
                    nursery.start_soon(self.watch)
                    for i in range(self.n):
                        nursery.start_soon(self.rank, i)
                    await self.all_finished.wait()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            first = unwrap(eg, GiveUp)
            if first is not None:
                raise first from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self.stop()
        try:
            with trio.fail_after(30):
                g = await self.status()
        except (Unreachable, trio.TooSlowError) as exc:
            raise GiveUp(f"every rank exited 0, but {str(exc) or 'the coordinator did not answer'}: cannot tell "
                         "whether the group finished") from None
        if g is None:
            if self.last is None:
                raise GiveUp(f"every rank exited 0, but the coordinator never saw group {self.group}: does the "
                             "program build its Rank with shoal.ckpt.rank_from_env() and call rank.run?")
            # Freed already: a rank returns from run only once its group finished. Figures as last read.
            self.say(f"group {self.group} already freed at the coordinator: figures as of the last poll")
        elif g["phase"] != "finished":
            raise GiveUp(f"every rank exited 0, but group {self.group} is {g['phase']!r} at the coordinator, "
                         "not finished")

    async def stop(self) -> None:
        """SIGTERM to every live rank's process group, SIGKILL after STOP_GRACE."""
        live = [p for p in self.procs.values() if p.returncode is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        with trio.move_on_after(STOP_GRACE):
            for p in live:
                await p.wait()
        for p in live:
            _killpg(p.pid, signal.SIGKILL)
            await p.wait()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _token(tmp: Path, token_file: str | Path | None) -> tuple[Path, bytes]:
    """The token file (a fresh random token in ``tmp``, owner-only, if none is given) and its token."""
    path = Path(fresh_token(tmp) if token_file is None else token_file).resolve()
    token = read_token(path, "--token-file")
    assert token is not None
    return path, token


async def run_program(argv: Sequence[str], ranks: int, *, group: str | None = None,
                      coordinator: ListenAddr | None = None, backup: ListenAddr | None = None,
                      token_file: str | Path | None = None, listen: str = "127.0.0.1",
                      hosts: Sequence[str] = (), spawn: str | None = None, mode: str = "enhanced",
                      interval: float = 1.0, shards: int = 1, max_restarts: int = 3,
                      timeout: float | None = None, out: TextIO = sys.stdout) -> RunResult:
    """Run ``ranks`` processes of ``argv`` with recovery; see the module docstring.

    Raises ValueError (one line) for settings that cannot work, before anything starts.
    """
    if coordinator is not None and token_file is None:
        raise ValueError("--coordinator needs --token-file (the coordinator's token: every call is authenticated)")
    places = check_hosts(hosts or [listen])
    own = coordinator is None
    remote = [str(h.host) for h in places if not h.is_loopback]
    if remote and token_file is None:
        raise ValueError(f"ranks on {', '.join(remote)} need --token-file, a token file at the same path on "
                         "every host")
    if remote and own and ListenAddr.parse(f"{listen}:0").is_loopback:
        raise ValueError(f"ranks on {', '.join(remote)} cannot reach a coordinator on loopback: pass --listen "
                         "(an address of this machine they can reach) or --coordinator")
    from shoal.daemons.runtime.logs import setup_logging

    setup_logging("warning", "checkpoint")
    group = group or f"run-{os.getpid()}-{secrets.token_hex(3)}"
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-ckpt-run-") as tmpname:
        tmp = Path(tmpname)
        token_file, token = _token(tmp, token_file)
        async with trio.open_nursery() as nursery:
            scopes = []
            try:
                if own:
                    where = ListenAddr.parse(f"[{listen}]:0" if ":" in listen else f"{listen}:0")
                    if backup is None:
                        bctx, bscope = await serve_role(nursery, "backup", tmp, token_file=token_file, listen=where)
                        scopes.append(bscope)
                        backup = bctx.addresses["rpc"]
                    cctx, cscope = await serve_role(nursery, "coordinator", tmp, backup=backup,
                                                    token_file=token_file, listen=where)
                    scopes.append(cscope)
                    coordinator = cctx.addresses["rpc"]
                    print(f"coordinator rpc={coordinator} metrics=http://{cctx.addresses['metrics']}/metrics, "
                          f"backup rpc={backup}, token {token_file}", file=out)
                assert coordinator is not None
                sup = Supervisor(argv, ranks, group=group, coordinator=coordinator, token_file=token_file,
                                 token=token, hosts=places, spawn=spawn, mode=mode, interval=interval,
                                 shards=shards, max_restarts=max_restarts, out=out)
                print(f"group {group}: {ranks} ranks of {shlex.join(argv)}, mode {mode}, checkpoint every "
                      f"{interval}s, at most {max_restarts} restarts", file=out, flush=True)
                try:
                    await _check_coordinator(coordinator, token, backup if not own else None)
                    with trio.move_on_after(timeout if timeout else float("inf")) as deadline:
                        await sup.run()
                    if deadline.cancelled_caught:
                        raise GiveUp(f"timed out after {timeout}s (--timeout)")
                except GiveUp as exc:
                    return RunResult(False, str(exc), sup.last, sup.starts, time.monotonic() - began)
                return RunResult(True, "", sup.last, sup.starts, time.monotonic() - began)
            finally:
                for s in scopes:
                    s.cancel()


async def _check_coordinator(coordinator: ListenAddr, token: bytes, backup: ListenAddr | None) -> None:
    """The coordinator answers with this token (and mirrors to ``backup``, when one was named)."""
    try:
        async with await connect_tcp(coordinator, token=token) as client:
            reply = await client.call("status", timeout=10.0)
    except (RpcError, OSError) as exc:
        raise GiveUp(f"the coordinator at {coordinator}: {exc}") from None
    if backup is not None:
        theirs = reply.get("backup") or "none"
        if theirs == "none" or ListenAddr.parse(theirs) != backup:
            raise GiveUp(f"the coordinator at {coordinator} mirrors to {theirs}, not to --backup {backup}")


def report(result: RunResult, out: TextIO = sys.stdout) -> None:
    """O, L and R of the group, the restarts, the verdict."""
    g = result.group
    if g is not None:
        print(f"  group {g['group']}: n={g['n']} mode={g['mode']} epoch={g['epoch']} "
              f"checkpoints={g['numbers']}", file=out)
        samples = g.get("samples")
        counted = f"  (means of {samples[0]}, {samples[1]} and {samples[2]} samples)" if samples else ""
        print(f"  {figures(g)}{counted}", file=out)
    restarted = {i: k - 1 for i, k in sorted(result.starts.items()) if k > 1}
    print(f"  restarts: {', '.join(f'rank {i} x{k}' for i, k in restarted.items()) or 'none'}", file=out)
    if result.ok:
        print(f"all {len(result.starts)} ranks finished in {result.elapsed:.2f}s", file=out)
    else:
        print(f"FAILED after {result.elapsed:.2f}s: {result.reason}", file=out)
