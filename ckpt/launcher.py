"""Run a checkpointed app as real processes, kill ranks, and check the result.

``run_app`` serves a coordinator (and a backup) in this process on loopback,
with a fresh random token that every listener requires (loopback too),
starts one process per rank (``python -m shoal.ckpt.launcher rank ...``),
sends SIGKILL to the ranks named in ``kills`` at their times and starts a
replacement process for each, which joins under the dead rank's id
and receives its state. When every rank has exited, each rank's result file is
compared with the app's sequential reference, bit for bit.

The daemon is found through the runtime's registry
(:data:`shoal.daemons.runtime.registry.DAEMONS`), like ``shoal checkpoint run``
finds it: the library depends on the runtime, never on a daemon package.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from shoal.ckpt.apps import load
from shoal.ckpt.rank import ANY_LOOPBACK_PORT, Rank
from shoal.daemons.runtime.config import ListenAddr, parse_config, read_token
from shoal.daemons.runtime.daemon import DaemonContext, serve
from shoal.daemons.runtime.registry import DAEMONS
from shoal.daemons.runtime.rpc import connect_tcp
from shoal.daemons.runtime.state import atomic_write

LOOPBACK = ListenAddr("127.0.0.1", 0)


@dataclass
class Outcome:
    ok: bool
    elapsed: float
    results_equal: list[bool]
    status: dict
    rank_stats: dict[int, dict] = field(default_factory=dict)
    kills: list[tuple[int, float]] = field(default_factory=list)


def parse_kill(text: str) -> tuple[int, float]:
    """``RANK@SECONDS`` -> (rank, seconds)."""
    rank, sep, when = text.partition("@")
    try:
        if not sep:
            raise ValueError
        return int(rank), float(when)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK@SECONDS, got {text!r}") from None


def fresh_token(tmp: Path) -> Path:
    """A new random RPC token in ``tmp/token`` (owner-only): every listener of a run requires it, loopback too."""
    path = tmp / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def role_config(role: str, tmp: Path, *, backup: ListenAddr | None = None, heartbeat: float = 0.5,
                token_file: Path | None = None, listen: ListenAddr = LOOPBACK) -> Any:
    """The config of a coordinator or backup (default: on loopback, no token), validated by the daemon's schema."""
    text = (f'[daemon]\nmetrics_listen = "{LOOPBACK}"\nstate_directory = {json.dumps(str(tmp / role))}\n'
            f'[checkpoint]\nrole = "{role}"\nlisten = "{listen}"\nbackup = "{backup or ""}"\n'
            f"heartbeat_interval = {heartbeat!r}\nheartbeat_timeout = {heartbeat * 6!r}\n"
            f"token_file = {json.dumps(str(token_file or ''))}\n")
    return parse_config(text, DAEMONS["checkpoint"].load_schema(), source=f"<{role} on {listen}>")


async def serve_role(nursery: trio.Nursery, role: str, tmp: Path, *, backup: ListenAddr | None = None,
                     heartbeat: float = 0.5, token_file: Path | None = None,
                     listen: ListenAddr = LOOPBACK) -> tuple[DaemonContext, trio.CancelScope]:
    """A coordinator or backup daemon served in-process (default: on loopback); (ctx, scope)."""
    spec = DAEMONS["checkpoint"]
    cfg = role_config(role, tmp, backup=backup, heartbeat=heartbeat, token_file=token_file, listen=listen)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await serve(spec.name, cfg, None, spec.load_factory(), handle_signals=False, task_status=task_status)

    ctx = await nursery.start(run)
    return ctx, scope


def rank_argv(app: str, rank: int, n: int, coordinator: ListenAddr, *, group: str, mode: str, interval: float,
              size: int, block_size: int, shards: int, out: Path, token_file: Path | None = None,
              listen: ListenAddr | None = None) -> list[str]:
    """The command line of one rank process (``python -m shoal.ckpt.launcher rank ...``).

    It writes its part of the result to ``out`` and its statistics to ``out`` with a ``.json`` suffix.
    """
    argv = [sys.executable, "-m", "shoal.ckpt.launcher", "rank", "--app", app,
            "--rank", str(rank), "--n", str(n), "--coordinator", str(coordinator), "--group", group,
            "--mode", mode, "--interval", str(interval), "--size", str(size),
            "--block-size", str(block_size), "--shards", str(shards), "--out", str(out)]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    if listen is not None:
        argv += ["--listen", str(listen)]
    return argv


async def run_app(app: str, ranks: int, *, size: int, kills: Sequence[tuple[int, float]] = (), mode: str = "enhanced",
                  interval: float = 0.2, block_size: int = 65536, shards: int = 1, out=sys.stdout,
                  timeout: float = 120.0, group: str = "demo") -> Outcome:
    from shoal.daemons.runtime.logs import setup_logging

    setup_logging("warning", "checkpoint")
    module = load(app)
    start = began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shoal-ckpt-") as tmpname:
        tmp = Path(tmpname)
        token_file = fresh_token(tmp)
        token = read_token(token_file, "token")
        async with trio.open_nursery() as nursery:
            bctx, bscope = await serve_role(nursery, "backup", tmp, token_file=token_file)
            cctx, cscope = await serve_role(nursery, "coordinator", tmp, backup=bctx.addresses["rpc"],
                                            token_file=token_file)
            coord = cctx.addresses["rpc"]
            print(f"coordinator rpc={coord} metrics=http://{cctx.addresses['metrics']}/metrics, "
                  f"backup rpc={bctx.addresses['rpc']}", file=out)

            def argv(i: int) -> list[str]:
                return rank_argv(app, i, ranks, coord, group=group, mode=mode, interval=interval, size=size,
                                 block_size=block_size, shards=shards, out=tmp / f"rank{i}",
                                 token_file=token_file)

            procs: dict[int, trio.Process] = {}
            exits: dict[int, int] = {}
            all_done = trio.Event()

            async def spawn(i: int) -> None:
                proc = await trio.lowlevel.open_process(argv(i), stdin=subprocess.DEVNULL)
                procs[i] = proc
                code = await proc.wait()
                if procs.get(i) is proc and code != -signal.SIGKILL:
                    exits[i] = code
                    if len(exits) == ranks:
                        all_done.set()

            async with trio.open_nursery() as ranks_nursery:
                for i in range(ranks):
                    ranks_nursery.start_soon(spawn, i)
                print(f"{app}: {ranks} rank processes, mode {mode}, checkpoint every {interval}s", file=out)
                with trio.move_on_after(timeout) as deadline:
                    # Kill times count from the moment every rank has joined and
                    # taken checkpoint 0 (process start-up varies a lot).
                    async with await connect_tcp(coord, token=token) as client:
                        while not all_done.is_set():
                            groups = (await client.call("status"))["groups"]
                            if groups and groups[0]["phase"] != "starting":
                                break
                            await trio.sleep(0.05)  # polling the coordinator's status
                    start = time.monotonic()
                    print(f"  [ 0.00s] all {ranks} ranks joined and hold checkpoint 0", file=out)
                    for victim, when in sorted(kills, key=lambda k: k[1]):
                        with trio.move_on_after(max(0.0, start + when - time.monotonic())):
                            await all_done.wait()
                        if all_done.is_set():
                            print(f"  [{time.monotonic() - start:5.2f}s] finished before the kill of rank {victim}",
                                  file=out)
                            break
                        async with await connect_tcp(coord, token=token) as client:
                            groups = (await client.call("status"))["groups"]
                        if not groups or groups[0]["phase"] == "finished":
                            print(f"  [{time.monotonic() - start:5.2f}s] the app finished before the kill of "
                                  f"rank {victim}", file=out)
                            break
                        proc = procs.get(victim)
                        if proc is not None and proc.returncode is None:
                            proc.send_signal(signal.SIGKILL)
                            await proc.wait()
                            print(f"  [{time.monotonic() - start:5.2f}s] SIGKILL rank {victim} "
                                  f"(pid {proc.pid}); starting a replacement", file=out)
                            ranks_nursery.start_soon(spawn, victim)
                    await all_done.wait()
                if deadline.cancelled_caught:
                    print(f"timed out after {timeout}s", file=out)
                    for p in procs.values():
                        if p.returncode is None:
                            p.kill()
                    ranks_nursery.cancel_scope.cancel()
            async with await connect_tcp(coord, token=token) as client:
                status = await client.call("status")
            cscope.cancel()
            bscope.cancel()
        elapsed = time.monotonic() - began
        reference = module.reference(ranks, size)
        equal, stats = [], {}
        for i in range(ranks):
            path = tmp / f"rank{i}"
            equal.append(path.exists() and path.read_bytes() == reference[i])
            if (tmp / f"rank{i}.json").exists():
                stats[i] = json.loads((tmp / f"rank{i}.json").read_text())
    ok = all(equal) and all(code == 0 for code in exits.values()) and len(exits) == ranks
    return Outcome(ok, elapsed, equal, status, stats, list(kills))


def figures(g: dict) -> str:
    """A group's O, L and R (the coordinator's means) with T_opt and r, from its status record."""
    return (f"O={g['O'] * 1e3:.2f} ms  L={g['L'] * 1e3:.2f} ms  R={g['R'] * 1e3:.2f} ms  "
            f"T_opt={g['T_opt']:.1f} s  r={g['r']:.5f}")


def describe(outcome: Outcome, out=sys.stdout) -> None:
    for g in outcome.status["groups"]:
        print(f"  group {g['group']}: n={g['n']} mode={g['mode']} epoch={g['epoch']} checkpoints={g['numbers']}",
              file=out)
        print(f"  {figures(g)}", file=out)
    for i, s in sorted(outcome.rank_stats.items()):
        extra = f", recovered {s['recovered_bytes']} bytes in {s['recovery_seconds']:.3f}s" \
            if s.get("recovery_seconds") is not None else ""
        print(f"  rank {i}: {s['checkpoints']} checkpoints, {s['rollbacks']} rollbacks, {s['replayed']} "
              f"messages replayed, {s['dropped']} orphans dropped{extra}", file=out)
    verdict = "bit-identical to the failure-free reference" if outcome.ok else "DIFFERENT from the reference"
    print(f"result: {verdict} ({sum(outcome.results_equal)}/{len(outcome.results_equal)} ranks) "
          f"in {outcome.elapsed:.2f}s", file=out)


# -- one rank process --------------------------------------------------------------


async def _rank(args: argparse.Namespace) -> int:
    module = load(args.app)
    rank = Rank(ListenAddr.parse(args.coordinator), args.group, args.rank, args.n, mode=args.mode,
                interval=args.interval, block_size=args.block_size, parity_shards=args.shards,
                token=read_token(args.token_file, "--token-file"), listen=ListenAddr.parse(args.listen))
    module.setup(rank, args.size)
    result = await rank.run(module.main)
    out = Path(args.out)
    atomic_write(out, result)
    stats = {k: v for k, v in rank.stats.items() if k != "overhead"}
    atomic_write(out.with_suffix(".json"), json.dumps(stats).encode())
    return 0


def rank_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="shoal-ckpt-rank")
    p.add_argument("--app", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--group", default="demo")
    p.add_argument("--mode", default="enhanced", choices=["enhanced", "blocking"])
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--block-size", type=int, default=65536)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--out", required=True)
    # Off loopback (ranks on other hosts, as in the lab): the group's shared token, and the
    # address this rank's own server listens on (its peers deliver their messages there).
    p.add_argument("--token-file", default=None, help="the group's RPC token (needed off loopback)")
    p.add_argument("--listen", default=str(ANY_LOOPBACK_PORT), help="this rank's server, HOST:PORT (0: any port)")
    args = p.parse_args(argv)
    from shoal.daemons.runtime.logs import setup_logging

    setup_logging("warning", f"rank{args.rank}")
    return trio.run(_rank, args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["rank"]:
        sys.exit(rank_main(sys.argv[2:]))
    print("usage: python -m shoal.ckpt.launcher rank ...", file=sys.stderr)
    sys.exit(2)
