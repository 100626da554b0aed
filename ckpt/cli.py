"""``shoal ckpt status``, ``shoal ckpt demo APP --ranks N --kill RANK@SECONDS`` and
``shoal ckpt run --ranks N -- PROGRAM ARGS``.

These commands belong to the library, not to the daemon: ``demo`` runs the
example applications (:mod:`shoal.ckpt.apps`) through the launcher, which a
daemon package may not import; ``run`` runs the user's own program
(:mod:`shoal.ckpt.run`). Errors are one line (``shoal.daemons.runtime.cli``).
"""

from __future__ import annotations

import argparse
import os
import sys

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

    r = sub.add_parser("run", help="run N ranks of your own program with recovery: a failed rank is restarted "
                                   "under its id; O, L, R at the end",
                       description="Start N ranks of PROGRAM (which builds its Rank with "
                                   "shoal.ckpt.rank_from_env()); each learns its rank id, group, coordinator and "
                                   "token file from SHOAL_CKPT_* environment variables. Exit 0 only if every rank "
                                   "finished.")
    r.add_argument("--ranks", type=int, required=True, help="number of ranks, 2..max_ranks")
    r.add_argument("--hosts", help="comma-separated IP addresses; rank i listens on host i mod len (default: "
                                   "--listen); a non-loopback host is started through --spawn")
    r.add_argument("--spawn", help="command prefix that runs a rank on {host} (default for non-loopback hosts: "
                                   "'ssh -o BatchMode=yes {host}'; '' runs every rank here)")
    r.add_argument("--coordinator", help="a running coordinator's RPC address (default: start a coordinator and a "
                                         "backup in this process)")
    r.add_argument("--backup", help="the backup's RPC address: checked against --coordinator's, or mirrored to by "
                                    "the coordinator this command starts")
    r.add_argument("--token-file", help="the coordinator's RPC token (required with --coordinator; default: a "
                                        "fresh random token for the coordinator started here)")
    r.add_argument("--listen", default="127.0.0.1", help="the IP address the coordinator and backup started here "
                                                         "listen on (default 127.0.0.1)")
    r.add_argument("--group", help="the group's name (default: run-PID-RANDOM)")
    r.add_argument("--mode", choices=["enhanced", "blocking"], default="enhanced")
    r.add_argument("--interval", type=float, default=1.0, help="checkpoint timer, seconds (default 1.0)")
    r.add_argument("--shards", type=int, default=1, help="parity shards: 1 = XOR, 2..4 = Reed-Solomon")
    r.add_argument("--max-restarts", type=int, default=3, help="restarts of failed ranks allowed in all (default 3)")
    r.add_argument("--timeout", type=float, help="stop every rank and fail after this many seconds (default: none)")
    r.add_argument("program", nargs=argparse.REMAINDER, metavar="-- PROGRAM ARGS")
    r.set_defaults(func=cmd_run)


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


def cmd_run(args) -> int:
    import trio

    from shoal.ckpt.run import report, run_program
    from shoal.daemons.runtime.config import ConfigError, ListenAddr

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        return fail("ckpt run: name the program after --, e.g. shoal ckpt run --ranks 4 -- python heat.py")
    if args.ranks < 2 or args.ranks > 1024:
        return fail("--ranks must be 2..1024")
    if args.max_restarts < 0:
        return fail("--max-restarts must be >= 0")
    if not 1 <= args.shards < args.ranks:
        return fail("--shards must be 1..ranks-1")
    if not args.interval > 0 or (args.timeout is not None and not args.timeout > 0):
        return fail("--interval and --timeout must be positive")
    try:
        coordinator = ListenAddr.parse(args.coordinator) if args.coordinator else None
        backup = ListenAddr.parse(args.backup) if args.backup else None
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else []

        async def go():
            return await run_program(program, args.ranks, group=args.group, coordinator=coordinator, backup=backup,
                                     token_file=args.token_file, listen=args.listen, hosts=hosts, spawn=args.spawn,
                                     mode=args.mode, interval=args.interval, shards=args.shards,
                                     max_restarts=args.max_restarts, timeout=args.timeout)

        result = trio.run(go)
    except (ValueError, ConfigError) as exc:
        return fail(str(exc))
    report(result)
    if not result.ok:
        print(f"shoal: {result.reason}", file=sys.stderr)
        return 1
    return 0
