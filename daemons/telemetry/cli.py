"""``shoal telemetry label|status|train|install|features|inject|experiment``."""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from datetime import UTC
from typing import Any

from shoal.daemons.runtime.cli import call, fail
from shoal.daemons.telemetry.inject import ALIASES, KINDS
from shoal.protocol.contract import Contract
from shoal.protocol.telemetry import (
    MAX_INSTALL_BYTES,
    MAX_MODEL_CHUNK,
    MAX_MODEL_NAME,
    Features,
    Install,
    Label,
    Status,
    Train,
)

DEFAULT_SOCKET = "/var/lib/shoal-telemetry/control.sock"


def add_commands(tel: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=os.environ.get("SHOAL_TELEMETRY_SOCKET", DEFAULT_SOCKET),
                       help=f"the daemon's control socket (default $SHOAL_TELEMETRY_SOCKET or {DEFAULT_SOCKET})")
        return p

    s = with_socket(tel.add_parser("status", help="the node's recent windows, scores and model"))
    s.add_argument("-n", "--windows", type=int, default=20, help="how many recent windows (default 20)")
    s.set_defaults(func=cmd_status)

    lab = with_socket(tel.add_parser("label", help="label a time range (like the seed's Nagios annotations)"))
    lab.add_argument("label", help="e.g. normal, cpu-hog, maintenance; '' clears")
    lab.add_argument("--from", dest="start", default="now",
                     help="start: Unix time, ISO time (UTC), 'now' or 'now-SECONDS' (default now)")
    lab.add_argument("--to", dest="end", default="now+900",
                     help="end: same forms, or 'now+SECONDS' (default now+900)")
    lab.set_defaults(func=cmd_label)

    t = with_socket(tel.add_parser("train", help="train this node's autoencoder on its normal windows"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.set_defaults(func=cmd_train)

    i = with_socket(tel.add_parser("install", help="install an ONNX model (refused if corrupt or mismatched)"))
    i.add_argument("model", help="an .onnx file with shoal metadata")
    i.set_defaults(func=cmd_install)

    f = with_socket(tel.add_parser("features", help="this node's window feature names (what a model may use)"))
    f.add_argument("--prefix", default="", help="only names starting with this (e.g. cgroup_, net_)")
    f.add_argument("--model", action="store_true", help="mark each name the installed model uses")
    f.set_defaults(func=cmd_features)

    inj = with_socket(tel.add_parser(
        "inject", help="make this node anomalous for a while (HPAS fault kinds, every resource bounded)"))
    inj.add_argument("kind", choices=[*KINDS, *ALIASES],
                     help="cpuoccupy, cachecopy, membw, memleak, memeater, netoccupy, iobandwidth, iometadata "
                          "(cpu, mem, io, net: the old names of cpuoccupy, memleak, iobandwidth, netoccupy)")
    inj.add_argument("--duration", type=float, required=True, help="seconds")
    inj.add_argument("--intensity", type=float, default=None,
                     help="(0, 1]: the share of the resource (CPU duty, cores, MemTotal, max rate); "
                          "default 1, memleak/memeater 0.25")
    inj.add_argument("--workers", type=int, default=0,
                     help="cpuoccupy, cachecopy, membw: processes (default: sized to the node)")
    inj.add_argument("--mib", type=int, default=0,
                     help="memleak, memeater: MiB instead of a share of MemTotal; iobandwidth: scratch file MiB")
    inj.add_argument("--dir", default=None, help="io kinds: scratch directory (default $TMPDIR)")
    inj.add_argument("--dry-run", action="store_true", help="print the plan's bounds, inject nothing")
    inj.add_argument("--label", default="", help="label the range in the telemetry daemon first (e.g. cpu-hog)")
    inj.set_defaults(func=cmd_inject)


def _rpc(args, method: str, params: Contract | None = None) -> Any:
    """One call on the daemon's control socket; any failure is one line and exit 2."""
    socket = args.socket if "/" in args.socket else f"./{args.socket}"  # cli.call: a path has a "/"
    return call(socket, method, params, what="the telemetry daemon", timeout=600.0)


def parse_time(text: str, now: float) -> float:
    """Unix seconds, ISO 8601 UTC, 'now', 'now+S' or 'now-S'."""
    from datetime import datetime

    text = text.strip()
    if text.startswith("now"):
        rest = text[3:]
        return now + (float(rest) if rest else 0.0)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time (Unix seconds, ISO 8601, now, now+S)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def format_status(st: dict) -> str:
    m = st["model"]
    lines = []
    if m:
        lines.append(f"model: {m['origin']}" + (f" (run {m['run_id']})" if m.get("run_id") else "")
                     + f", {m['features']} features, threshold {m['threshold']:.6g}, installed {_iso(m['installed'])}Z")
    else:
        lines.append("model: none (windows are stored unscored; run `shoal telemetry train`)")
    lines.append(f"sources: {', '.join(st['sources']) or '-'}; absent: {', '.join(st['absent']) or '-'}")
    ow = st["open_window"]
    lines.append(f"windows: {st['stored']} stored, {st['window']:g} s long"
                 + (f"; open since {_iso(ow['start'])}Z with {ow['samples']} samples" if ow["start"] else ""))
    lines.append(f"{'window start (UTC)':<20} {'samples':>7} {'features':>8} {'score':>12}  verdict    label")
    for w in st["windows"]:
        score = "-" if w["score"] is None else f"{w['score']:.6g}"
        verdict = "-" if w["anomalous"] is None else ("ANOMALOUS" if w["anomalous"] else "normal")
        lines.append(f"{_iso(w['start']):<20} {w['samples']:>7} {w['features']:>8} {score:>12}  {verdict:<10} "
                     f"{w['label'] or ''}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    print(format_status(_rpc(args, "status", Status(windows=args.windows))))
    return 0


def cmd_label(args) -> int:
    now = time.time()
    try:
        start, end = parse_time(args.start, now), parse_time(args.end, now)
    except ValueError as exc:
        return fail(str(exc))
    r = _rpc(args, "label", Label(start=start, end=end, label=args.label or None))
    print(f"labelled {_iso(start)}Z .. {_iso(end)}Z as {args.label or '(none)'}: {r['windows']} stored windows now")
    return 0


def cmd_train(args) -> int:
    r = _rpc(args, "train", Train(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size))
    print(f"trained on {r['windows']} windows, {r['features']} features; threshold {r['threshold']:.6g}"
          f"; installed")
    return 0


def cmd_install(args) -> int:
    """Send the file in chunks of MAX_MODEL_CHUNK (one RPC frame each), up to MAX_INSTALL_BYTES."""
    try:
        with open(args.model, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INSTALL_BYTES:
                return fail(f"{args.model}: {size} bytes, over the {MAX_INSTALL_BYTES >> 20} MiB cap of "
                            f"`shoal telemetry install`")
            data = f.read(MAX_INSTALL_BYTES + 1)
    except OSError as exc:
        return fail(f"{args.model}: {exc.strerror}")
    if len(data) > MAX_INSTALL_BYTES:  # grew while we read it
        return fail(f"{args.model}: over the {MAX_INSTALL_BYTES >> 20} MiB cap of `shoal telemetry install`")
    name = args.model[:MAX_MODEL_NAME]
    r = _rpc(args, "install", Install(model=data[:MAX_MODEL_CHUNK], total=len(data) or None, name=name))
    while "upload" in r:
        off = r["received"]
        r = _rpc(args, "install", Install(model=data[off:off + MAX_MODEL_CHUNK], upload=r["upload"], offset=off,
                                          name=name))
    print(f"installed {args.model}: {r['features']} features, threshold {r['threshold']:.6g}")
    return 0


def cmd_features(args) -> int:
    offset = 0
    while True:
        r = _rpc(args, "features", Features(prefix=args.prefix, offset=offset))
        for name, used in zip(r["features"], r["in_model"], strict=True):
            print(f"{name}\t{'model' if used else '-'}" if args.model else name)
        offset += len(r["features"])
        if not r["features"] or offset >= r["total"]:
            return 0


def cmd_inject(args) -> int:
    from shoal.daemons.telemetry.inject import plan, run, this_node

    try:
        p = plan(args.kind, args.duration, this_node(args.dir), intensity=args.intensity, workers=args.workers,
                 mib=args.mib)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    print(f"{p.kind} for {p.duration:g} s, bounded to: {p.describe()}"
          + "".join(f"; {n}" for n in p.notes), flush=True)
    if args.dry_run:
        return 0
    if args.label:
        now = time.time()
        _rpc(args, "label", Label(start=now, end=now + args.duration, label=args.label))
    try:
        result = run(p, directory=args.dir)
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        return fail(f"inject {p.kind}: {exc}")
    print("done: " + ", ".join(f"{k} {v}" for k, v in result.items()))
    return 0
