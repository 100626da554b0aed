"""``shoal ckpt status`` and ``shoal ckpt demo APP --ranks N --kill RANK@SECONDS``."""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_COORDINATOR = "127.0.0.1:7745"
#: A size per app that runs for a few seconds on a laptop (see each app's docstring).
DEMO_SIZES = {"ring": 3000, "mergesort": 4_000_000, "cannon": 800, "apsp": 200}


def add_commands(daemon: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    from shoal.daemons.checkpoint.launcher import parse_kill

    ck = top.add_parser("ckpt", help="diskless checkpointing: group status, the example apps")
    sub = ck.add_subparsers(dest="ckpt_action", required=True, metavar="ACTION")
    s = sub.add_parser("status", help="each group's O, L, R, T_opt, Gamma, r and the recommended interval")
    s.add_argument("--coordinator", default=os.environ.get("SHOAL_CKPT_COORDINATOR", DEFAULT_COORDINATOR),
                   help=f"the coordinator's RPC address (default $SHOAL_CKPT_COORDINATOR or {DEFAULT_COORDINATOR})")
    s.add_argument("--token-file", help="the group token, when the coordinator is not on loopback")
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("demo", help="run an app as real processes, kill ranks, check the result bit for bit")
    d.add_argument("app", choices=sorted(DEMO_SIZES))
    d.add_argument("--ranks", type=int, default=4, help="number of rank processes (cannon: a square)")
    d.add_argument("--kill", type=parse_kill, action="append", default=[], metavar="RANK@SECONDS",
                   help="SIGKILL this rank at this time and start a replacement (repeatable)")
    d.add_argument("--mode", choices=["enhanced", "blocking"], default="enhanced")
    d.add_argument("--size", type=int, help="problem size (default: a few seconds' worth per app)")
    d.add_argument("--interval", type=float, default=0.2, help="checkpoint timer, seconds (default 0.2)")
    d.add_argument("--shards", type=int, default=1, help="parity shards: 1 = XOR, 2..4 = Reed-Solomon")
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=cmd_demo)


def _fail(message: str) -> int:
    print(f"shoal: {message}", file=sys.stderr)
    return 2


def format_status(reply: dict) -> str:
    lines = [f"MTBF {reply['mtbf']:.0f} s; backup {reply['backup'] or 'none'}"
             f"{' (in sync)' if reply['backup_in_sync'] else (' (NOT in sync)' if reply['backup'] else '')}"]
    if not reply["groups"]:
        return lines[0] + "\nno groups"
    head = (f"{'group':<16} {'n':>3} {'mode':<9} {'phase':<10} {'epoch':>5} {'O ms':>8} {'L ms':>8} {'R ms':>8} "
            f"{'T_opt s':>9} {'Gamma s':>9} {'r':>9}  recommended interval")
    lines.append(head)
    for g in reply["groups"]:
        rec = f"{g['recommended_interval']:.1f} s" if g["recommended_interval"] else "- (no checkpoint measured yet)"
        lines.append(f"{g['group'][:16]:<16} {g['n']:>3} {g['mode']:<9} {g['phase']:<10} {g['epoch']:>5} "
                     f"{g['O'] * 1e3:>8.2f} {g['L'] * 1e3:>8.2f} {g['R'] * 1e3:>8.2f} "
                     f"{g['T_opt']:>9.1f} {g['gamma']:>9.1f} {g['r']:>9.5f}  {rec}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    import trio

    from shoal.daemons.checkpoint.config import read_token
    from shoal.daemons.runtime.config import ListenAddr
    from shoal.daemons.runtime.rpc import RpcError, connect_tcp

    try:
        addr = ListenAddr.parse(args.coordinator)
    except ValueError as exc:
        return _fail(f"--coordinator: {exc}")
    try:
        token = read_token(None if args.token_file is None else __import__("pathlib").Path(args.token_file))
    except Exception as exc:  # noqa: BLE001 - a ConfigError is one line already
        return _fail(str(exc))

    async def call():
        async with await connect_tcp(addr, token=token) as client:
            return await client.call("status")

    try:
        reply = trio.run(call)
    except RpcError as exc:
        return _fail(f"{exc.code}: {exc.message}")
    except OSError as exc:
        return _fail(f"cannot reach the coordinator at {addr}: {exc.strerror or exc}")
    print(format_status(reply))
    return 0


def cmd_demo(args) -> int:
    import trio

    from shoal.ckpt.apps import load
    from shoal.daemons.checkpoint.launcher import describe, run_app

    if args.ranks < 2 or args.ranks > 64:
        return _fail("--ranks must be 2..64")
    if args.app == "cannon" and int(args.ranks ** 0.5) ** 2 != args.ranks:
        return _fail("cannon needs a square number of ranks (4, 9, 16, ...)")
    for rank, _when in args.kill:
        if not 0 <= rank < args.ranks:
            return _fail(f"--kill: rank {rank} is outside 0..{args.ranks - 1}")
    load(args.app)
    size = args.size or DEMO_SIZES[args.app]
    outcome = trio.run(partial_run(run_app, args, size))
    describe(outcome)
    return 0 if outcome.ok else 1


def partial_run(run_app, args, size):
    async def go():
        return await run_app(args.app, args.ranks, size=size, kills=args.kill, mode=args.mode,
                             interval=args.interval, shards=args.shards, timeout=args.timeout)
    return go
