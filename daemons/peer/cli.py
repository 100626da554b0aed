"""``shoal peer add|status|remove|create`` and ``shoal get``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from shoal.daemons.runtime import cli

DEFAULT_SOCKET = "/var/lib/shoal-peer/control.sock"


def add_commands(peer: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=os.environ.get("SHOAL_PEER_SOCKET", DEFAULT_SOCKET),
                       help=f"the daemon's control socket (default $SHOAL_PEER_SOCKET or {DEFAULT_SOCKET})")
        return p

    a = with_socket(peer.add_parser("add", help="add a .torrent to the running peer daemon"))
    a.add_argument("torrent", help="a .torrent file or a magnet link")
    a.add_argument("--dest", help="download directory (default: the daemon's download_dir)")
    a.add_argument("--upload-rate", type=int, default=0, help="this torrent's upload limit, bytes/s (0: none)")
    a.add_argument("--download-rate", type=int, default=0, help="this torrent's download limit, bytes/s (0: none)")
    a.set_defaults(func=cmd_add)

    lim = with_socket(peer.add_parser("limit", help="set a torrent's own upload and download limits"))
    lim.add_argument("which", help="info-hash (hex) or name")
    lim.add_argument("--upload-rate", type=int, default=0, help="bytes/s (0: none)")
    lim.add_argument("--download-rate", type=int, default=0, help="bytes/s (0: none)")
    lim.set_defaults(func=cmd_limit)

    s = with_socket(peer.add_parser("status", help="progress, rates, peers and ETA of every torrent"))
    s.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    s.set_defaults(func=cmd_status)

    r = with_socket(peer.add_parser("remove", help="stop a torrent (files stay on disk)"))
    r.add_argument("which", help="info-hash (hex) or name")
    r.set_defaults(func=cmd_remove)

    st = with_socket(peer.add_parser("stream", help="deadline mode: fetch in reading order for a reader at RATE"))
    st.add_argument("which", help="info-hash (hex) or name")
    st.add_argument("--rate", type=int, required=True, help="the reader's speed, bytes/s")
    st.add_argument("--offset", type=int, default=0, help="where the reader starts, bytes (default 0)")
    st.set_defaults(func=cmd_stream)

    c = peer.add_parser("create", help="make a .torrent from a file or directory")
    c.add_argument("path")
    c.add_argument("--tracker", action="append", required=True, help="announce URL (repeat for tiers)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--piece-length", type=int, default=0, help="bytes, a power of two (default: by size)")
    c.add_argument("--web-seed", action="append", default=[], help="BEP 19 URL")
    c.add_argument("--private", action="store_true")
    c.set_defaults(func=cmd_create)

    g = top.add_parser("get", help="download a torrent, seed it for a while, and exit")
    g.add_argument("torrent", help="a .torrent file or a magnet link")
    g.add_argument("--dest", default=".", help="where to put the files (default: here)")
    g.add_argument("--seed-time", type=float, default=0.0, help="seconds to seed after completing")
    g.add_argument("--listen", default="127.0.0.1:0", help="host:port for incoming peers (default 127.0.0.1:0)")
    g.add_argument("--upload-rate", type=int, default=0, help="bytes/s, 0 = unlimited")
    g.set_defaults(func=cmd_get)


def _rpc(args, method: str, params=None):

    # The control socket is a path; runtime.cli.call takes a target with a "/" for one.
    target = args.socket if "/" in args.socket else f"./{args.socket}"
    return cli.call(target, method, params, what="the peer daemon")


def cmd_add(args) -> int:
    dest = str(Path(args.dest).resolve()) if args.dest else None
    rates = {"upload_rate": args.upload_rate, "download_rate": args.download_rate}
    if args.torrent.startswith("magnet:"):
        reply = _rpc(args, "add", {"magnet": args.torrent, "dest": dest, **rates})
    else:
        try:
            raw = Path(args.torrent).read_bytes()
        except OSError as exc:
            return cli.fail(f"{args.torrent}: {exc.strerror}")
        reply = _rpc(args, "add", {"torrent": raw, "dest": dest, **rates})
    print(f"added {reply['name']} ({reply['info_hash']}), {reply['state']}")
    return 0


def _bar(fraction: float, width: int = 24) -> str:
    full = int(fraction * width)
    return "#" * full + "." * (width - full)


def _rate(bps: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if bps < 1024 or unit == "GiB":
            return f"{bps:6.1f} {unit}/s"
        bps /= 1024
    return ""


def format_status(rows: list[dict]) -> str:
    if not rows:
        return "no torrents"
    lines = []
    for t in rows:
        if t["state"] == "metadata":
            lines.append(f"{t['name'][:28]:<28} [{_bar(0.0)}] fetching the metadata from peers (magnet link)")
            continue
        done = 1 - t["left"] / t["size"] if t["size"] else 1.0
        eta = "-" if t["eta"] is None else time.strftime("%H:%M:%S", time.gmtime(t["eta"]))
        lines.append(f"{t['name'][:28]:<28} [{_bar(done)}] {done:6.1%} {t['state']:<11} "
                     f"down {_rate(t['down_rate'])} up {_rate(t['up_rate'])} peers {t['peers']:>3} eta {eta}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    while True:
        text = format_status(_rpc(args, "status"))
        if not args.watch:
            print(text)
            return 0
        print("\x1b[2J\x1b[H" + text, flush=True)
        try:
            time.sleep(1.0)  # a display refresh
        except KeyboardInterrupt:
            return 0


def _which(args) -> str:
    rows = _rpc(args, "status")
    match = [t for t in rows if args.which in (t["info_hash"], t["name"])]
    if len(match) != 1:
        cli.die(f"{args.which!r} matches {len(match)} torrents")
    return match[0]["info_hash"]


def cmd_limit(args) -> int:
    row = _rpc(args, "limits", {"info_hash": _which(args), "upload_rate": args.upload_rate,
                                "download_rate": args.download_rate})
    print(f"{row['name']}: upload limit {row['upload_limit'] or 'none'}, "
          f"download limit {row['download_limit'] or 'none'} (bytes/s)")
    return 0


def cmd_stream(args) -> int:
    reply = _rpc(args, "stream", {"info_hash": _which(args), "rate": args.rate, "offset": args.offset})
    print(f"streaming: {reply['pieces']} pieces now have deadlines")
    return 0


def cmd_remove(args) -> int:
    reply = _rpc(args, "remove", {"info_hash": _which(args)})
    print("removed" if reply["removed"] else "not running")
    return 0


def _default_piece_length(total: int) -> int:
    """About 1,000-2,000 pieces, within 16 KiB .. 16 MiB."""
    length = 16 * 1024
    while total // length > 2000 and length < 16 * 1024 * 1024:
        length *= 2
    return length


def cmd_create(args) -> int:
    from shoal.daemons.peer.storage import hash_files
    from shoal.protocol.metainfo import create_metainfo

    root = Path(args.path)
    if root.is_file():
        files: list[tuple[tuple[str, ...], int]] = [((root.name,), root.stat().st_size)]
        base = root.parent
    elif root.is_dir():
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        if not paths:
            return cli.fail(f"{root} has no files")
        files = [(p.relative_to(root).parts, p.stat().st_size) for p in paths]
        base = root
    else:
        return cli.fail(f"{root}: no such file or directory")
    total = sum(length for _path, length in files)
    piece_length = args.piece_length or _default_piece_length(total)
    layout = files if root.is_dir() else [((root.name,), files[0][1])]
    pieces = hash_files(base, layout, piece_length)
    data, info_hash = create_metainfo(root.name, layout, piece_length, pieces, [[t] for t in args.tracker],
                                      url_list=tuple(args.web_seed), private=args.private)
    Path(args.output).write_bytes(data)
    print(f"{args.output}: {info_hash.hex()} ({len(files)} files, {total} bytes, {len(pieces) // 20} pieces)")
    return 0


def cmd_get(args) -> int:
    import trio

    from shoal.protocol.errors import RemoteProtocolError
    from shoal.protocol.metainfo import parse_magnet, parse_metainfo

    try:
        if args.torrent.startswith("magnet:"):
            meta = parse_magnet(args.torrent)
        else:
            meta = parse_metainfo(Path(args.torrent).read_bytes())
    except OSError as exc:
        return cli.fail(f"{args.torrent}: {exc.strerror}")
    except RemoteProtocolError as exc:
        return cli.fail(f"{args.torrent}: not a valid .torrent or magnet link ({exc})")
    return trio.run(_get, meta, args)


async def _get(meta, args) -> int:
    import tempfile
    from dataclasses import replace

    import trio
    from prometheus_client import CollectorRegistry

    from shoal.daemons.peer.config import LimitsSection, PeerConfig, PeerSection
    from shoal.daemons.peer.metadata import fetch_metadata
    from shoal.daemons.peer.session import Session
    from shoal.daemons.runtime.config import ListenAddr
    from shoal.protocol.metainfo import Magnet

    try:
        listen = ListenAddr.parse(args.listen)
    except ValueError as exc:
        return cli.fail(f"--listen: {exc}")
    cfg = PeerConfig(peer=replace(PeerSection(), listen=listen), limits=LimitsSection(upload_rate=args.upload_rate))
    dest = Path(await trio.Path(args.dest).resolve())
    with tempfile.TemporaryDirectory(prefix="shoal-get-") as resume:
        session = Session(cfg, CollectorRegistry(), dest, Path(resume))
        async with trio.open_nursery() as nursery:
            await nursery.start(session.run)
            if isinstance(meta, Magnet):
                print(f"fetching the metadata of {meta.display_name or meta.info_hash.hex()} from peers")
                meta = (await fetch_metadata(session, meta)).meta
            torrent = await session.add(meta, dest)
            start = trio.current_time()
            while not torrent.completed.is_set():
                print("\r" + format_status([torrent.status()]), end="", flush=True)
                with trio.move_on_after(1.0):  # a display refresh
                    await torrent.completed.wait()
            print("\r" + format_status([torrent.status()]))
            print(f"done in {trio.current_time() - start:.1f}s: {dest / meta.name}")
            if args.seed_time > 0:
                print(f"seeding for {args.seed_time:.0f}s")
                await trio.sleep(args.seed_time)
            nursery.cancel_scope.cancel()
    return 0
