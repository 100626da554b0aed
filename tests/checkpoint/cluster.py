"""In-process checkpoint clusters for the tests: a real coordinator (and backup)
served by the runtime on 127.0.0.1 port 0, and ranks as trio tasks talking to
it over real sockets. A rank is "killed" by cancelling its task: its sockets
close as a killed process's would, so the coordinator sees the disconnect."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import trio

from shoal.ckpt import GroupFailed, Rank
from shoal.ckpt.apps import load
from shoal.daemons.checkpoint.config import CheckpointConfig, CheckpointSection
from shoal.daemons.checkpoint.daemon import CheckpointApp
from shoal.daemons.runtime.config import DaemonSection, ListenAddr
from shoal.daemons.runtime.daemon import serve

LOOPBACK = ListenAddr("127.0.0.1", 0)


def config(tmp: Path, name: str, **kw) -> CheckpointConfig:
    section = replace(CheckpointSection(), listen=LOOPBACK, heartbeat_interval=0.3, heartbeat_timeout=1.5, **kw)
    return CheckpointConfig(daemon=DaemonSection(metrics_listen=None, state_directory=str(tmp / name)),
                            checkpoint=section)


async def start_daemon(nursery: trio.Nursery, cfg: CheckpointConfig):
    """Serve a checkpoint daemon in-process; returns (ctx, app, cancel scope)."""
    holder = {}

    def make(ctx):
        holder["app"] = CheckpointApp(ctx)
        return holder["app"]

    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve("checkpoint", cfg, None, make, handle_signals=False, task_status=task_status)

    ctx = await nursery.start(run)
    return ctx, holder["app"], scope


class RankRunner:
    """Runs app ranks as tasks; kill(rank) cancels one, start(rank) runs a (replacement) rank."""

    def __init__(self, nursery, coordinator, app, n: int, size: int, group: str = "g", **rank_kw):
        """``app``: a shipped app's name, or a module-like object with setup and main."""
        self.nursery, self.coordinator, self.n, self.size = nursery, coordinator, n, size
        self.app = load(app) if isinstance(app, str) else app
        self.group, self.rank_kw = group, rank_kw
        self.results: dict[int, bytes] = {}
        self.errors: dict[int, Exception] = {}
        self.ranks: dict[int, Rank] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.done = trio.Event()

    def start(self, i: int) -> Rank:
        rank = Rank(self.coordinator, self.group, i, self.n, **self.rank_kw)
        self.results.pop(i, None)
        self.errors.pop(i, None)
        self.app.setup(rank, self.size)
        self.ranks[i] = rank
        scope = trio.CancelScope()
        self.scopes[i] = scope
        self.nursery.start_soon(self._run, i, rank, scope)
        return rank

    async def _run(self, i: int, rank: Rank, scope: trio.CancelScope) -> None:
        with scope:
            try:
                self.results[i] = await rank.run(self.app.main)
            except GroupFailed as exc:
                self.errors[i] = exc
                return
            if len(self.results) == self.n:
                self.done.set()

    def kill(self, i: int) -> None:
        self.scopes[i].cancel()
