"""``shoal lab``: check, render, up, status, exec, down and run a lab scenario.

Every problem is one line on stderr (``shoal: ...``) and exit status 2, as for
every other shoal command.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from shoal.daemons.runtime.cli import fail
from shoal.daemons.runtime.config import ConfigError


def add_arguments(lab: argparse.ArgumentParser) -> None:
    sub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("check", help="validate a scenario file (one line per problem)")
    c.add_argument("file")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("render", help="write every host's configs, tokens, certificates and units for a real LAN")
    r.add_argument("file")
    r.add_argument("--out", required=True, help="directory to write the bundle into (must not exist)")
    r.add_argument("--config-root", default="/etc/shoal", help="where the configs live on each machine")
    r.add_argument("--shoal-exe", default="/usr/local/bin/shoal", help="the shoal command on each machine")
    r.set_defaults(func=cmd_render)

    u = sub.add_parser("up", help="bring the scenario's hosts and daemons up; Ctrl-C takes them down")
    u.add_argument("file")
    u.set_defaults(func=cmd_up)

    s = sub.add_parser("status", help="the running labs: hosts, daemons, links and live rates")
    s.add_argument("--run", help="one run id (default: every run)")
    s.set_defaults(func=cmd_status)

    e = sub.add_parser("exec", help="run a command inside a lab host: shoal lab exec [--run ID] HOST -- CMD ...")
    e.add_argument("host")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.add_argument("--run", help="the run id (needed when several labs run)")
    e.set_defaults(func=cmd_exec)

    d = sub.add_parser("down", help="take a lab down, or remove what a crashed one left")
    d.add_argument("--run", help="one run id (default: every run)")
    d.set_defaults(func=cmd_down)

    x = sub.add_parser("run", help="run the scenario's experiment: live progress, then a table, JSON and plots")
    x.add_argument("file")
    x.add_argument("--out", help="results directory (default lab-results/<scenario>-<time>)")
    x.set_defaults(func=cmd_run)


def _load(path: str):
    from shoal.lab.scenario import load_scenario

    return load_scenario(path)


def cmd_check(args: argparse.Namespace) -> int:
    from shoal.lab.net import subnet_conflicts
    from shoal.lab.render import render

    try:
        scenario = _load(args.file)
        with tempfile.TemporaryDirectory() as tmp:
            render(scenario, Path(tmp) / "bundle")
    except ConfigError as exc:
        return fail(str(exc))
    conflicts = subnet_conflicts(scenario.subnet)
    if conflicts:
        return fail(f"{args.file}: lab.subnet: {scenario.subnet} overlaps this machine's routes "
                    f"({', '.join(conflicts)})")
    daemons = sum(len(h.daemons) for h in scenario.hosts)
    print(f"{args.file}: ok: {len(scenario.hosts)} hosts, {daemons} daemons, experiment "
          f"{scenario.experiment.kind}, {len(scenario.faults)} faults")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from shoal.lab.render import render

    out = Path(args.out)
    if out.exists():
        return fail(f"{out}: already exists; render into a new directory")
    try:
        bundle = render(_load(args.file), out, config_root=args.config_root, exe=args.shoal_exe)
    except ConfigError as exc:
        return fail(str(exc))
    for host, plans in bundle.plans.items():
        print(f"{host}: {', '.join(p.daemon for p in plans) or '(no daemons)'}")
    print(f"bundle: {out} (see {out / 'README'})")
    return 0


def _run_trio(main) -> int:
    import trio

    from shoal.lab.lab import LabError

    try:
        return trio.run(main)
    except BaseException as exc:  # noqa: B036 - sorted below: ours become one line, the rest is re-raised
        leaf = exc
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        if isinstance(leaf, (LabError, ConfigError)):
            return fail(str(leaf))
        if isinstance(leaf, KeyboardInterrupt):
            print("shoal lab: interrupted; the lab is down", file=sys.stderr)
            return 130
        raise


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from shoal.lab.lab import Lab

    try:
        scenario = _load(args.file)
    except ConfigError as exc:
        return fail(str(exc))

    async def main() -> int:
        async with Lab(scenario) as lab:
            # listen for the signals before saying "up": a Ctrl-C right after it is a clean stop
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                print(f"lab {lab.run_id} is up; `shoal lab status`, `shoal lab exec HOST -- CMD`; "
                      "Ctrl-C or `shoal lab down` takes it down", flush=True)
                async for _ in signals:
                    break
        return 0

    return _run_trio(main)


def cmd_run(args: argparse.Namespace) -> int:
    from shoal.lab.experiment import run_scenario

    try:
        scenario = _load(args.file)
    except ConfigError as exc:
        return fail(str(exc))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("lab-results") / f"{Path(args.file).stem}-{stamp}"

    async def main() -> int:
        result = await run_scenario(scenario, out)
        return 0 if result.ok else 1

    return _run_trio(main)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _select(run: str | None) -> dict[str, dict]:
    from shoal.lab.lab import records

    recs = records()
    if run:
        return {run: recs[run]} if run in recs else {}
    return recs


def cmd_status(args: argparse.Namespace) -> int:
    from shoal.lab.net import MIB, switch_counters

    recs = _select(args.run)
    if not recs:
        print("no lab is running")
        return 0
    for run_id, rec in recs.items():
        alive = _alive(rec.get("pid"))
        print(f"run {run_id}: {rec.get('scenario', '?')}, lab process {rec.get('pid')} "
              f"{'running' if alive else 'GONE (shoal lab down removes what it left)'}")
        try:
            a = switch_counters(run_id)
            time.sleep(1.0)
            b = switch_counters(run_id)
        except OSError:
            a = b = {}
        for host, h in rec.get("hosts", {}).items():
            link = rec.get("links", {}).get(host, {})
            port = link.get("port", "")
            up = down = 0.0
            if port in a and port in b:
                up, down = ((b[port][i] - a[port][i]) / MIB for i in (0, 1))
            daemons = []
            for d in h.get("daemons", []):
                pid = rec.get("pids", {}).get(f"{host}/{d}")
                daemons.append(f"{d}{'' if _alive(pid) else ' (down)'}")
            shaped = (f"up {link.get('upload', 0):g} down {link.get('download', 0):g} MiB/s, "
                      f"delay {link.get('delay', 0):g}+-{link.get('jitter', 0):g} ms, loss {link.get('loss', 0):g}%")
            flag = " HOST DOWN" if host in rec.get("down", []) else ""
            print(f"  {host:<12} {h['address']:<15} {shaped}; now {up:.2f} up / {down:.2f} down MiB/s{flag}")
            print(f"  {'':<12} daemons: {', '.join(daemons) or '-'}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from shoal.lab.net import enter_netns

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        return fail("lab exec: no command given (shoal lab exec HOST -- CMD ...)")
    recs = _select(args.run)
    found = [(r, rec) for r, rec in recs.items() if args.host in rec.get("hosts", {})]
    if not found:
        return fail(f"lab exec: no running lab has a host {args.host!r}")
    if len(found) > 1:
        return fail(f"lab exec: several labs have a host {args.host!r}; choose one with --run "
                    f"({', '.join(r for r, _ in found)})")
    run_id, rec = found[0]
    try:
        enter_netns(rec["hosts"][args.host]["netns"])()
    except OSError as exc:
        return fail(f"lab exec: cannot enter {args.host}: {exc.strerror}")
    os.environ.update({"SHOAL_LAB_HOST": args.host, "SHOAL_LAB_RUN": run_id})
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        return fail(f"lab exec: {cmd[0]}: {exc.strerror}")


def cmd_down(args: argparse.Namespace) -> int:
    from shoal.lab.lab import teardown
    from shoal.lab.net import lab_namespaces, remove, run_of

    recs = _select(args.run)
    if args.run and not recs and not lab_namespaces(args.run):
        return fail(f"lab down: no run {args.run!r}")
    for run_id, rec in recs.items():
        pid = rec.get("pid")
        if pid and _alive(pid) and pid != os.getpid():
            os.kill(pid, signal.SIGTERM)  # the lab's own process takes itself down
            for _ in range(600):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            removed = teardown(run_id)  # what it could not remove, if anything
            print(f"run {run_id}: taken down by its lab process {pid}"
                  + (f"; removed {len(removed)} namespaces and directories it left" if removed else ""))
        else:
            removed = teardown(run_id)
            print(f"run {run_id}: its lab process is gone; removed {len(removed)} namespaces and directories")
    # Namespaces of a run with no record (the record was lost): remove them too.
    orphans = sorted({run_of(n) for n in lab_namespaces()} - set(recs))
    if args.run:
        orphans = [r for r in orphans if r == args.run]
    for run_id in orphans:
        removed = remove(run_id)
        print(f"run {run_id}: removed {len(removed)} namespaces left without a record")
    if not recs and not orphans:
        print("no lab is running")
    return 0

