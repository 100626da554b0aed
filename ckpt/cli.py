"""``shoal ckpt status`` and ``shoal ckpt demo APP --ranks N --kill RANK@SECONDS``.

These commands belong to the library, not to the daemon: ``demo`` runs the
example applications (:mod:`shoal.ckpt.apps`) through the launcher, which a
daemon package may not import. Errors are one line (``shoal.daemons.runtime.cli``).
"""

from __future__ import annotations

import argparse
import os

from shoal.daemons.runtime.cli import call, fail

DEFAULT_COORDINATOR = "127.0.0.1:7745"
#: A size per app that runs for a few seconds on a laptop (see each app's docstring).
DEMO_SIZES = {"ring": 3000, "mergesort": 4_000_000, "cannon": 800, "apsp": 200}


def add_commands(daemon: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    from shoal.ckpt.launcher import parse_kill

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
    reply = call(args.coordinator, "status", what="the coordinator", token_file=args.token_file)
    print(format_status(reply))
    return 0


def cmd_demo(args) -> int:
    import trio

    from shoal.ckpt.apps import load
    from shoal.ckpt.launcher import describe, run_app

    if args.ranks < 2 or args.ranks > 64:
        return fail("--ranks must be 2..64")
    if args.app == "cannon" and int(args.ranks ** 0.5) ** 2 != args.ranks:
        return fail("cannon needs a square number of ranks (4, 9, 16, ...)")
    for rank, _when in args.kill:
        if not 0 <= rank < args.ranks:
            return fail(f"--kill: rank {rank} is outside 0..{args.ranks - 1}")
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
