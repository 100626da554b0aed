"""``shoal peer add|status|remove|create`` and ``shoal get``.

Finding the daemon: ``--socket PATH``, else ``$SHOAL_PEER_SOCKET``, else the
control socket named by ``--config FILE`` (its ``control_socket``, or
``control.sock`` in its state directory, as ``shoal peer run --config FILE``
started here would put it), else the first that exists of the socket of
/etc/shoal/peer.toml, ``/var/lib/shoal-peer/control.sock`` (systemd) and
``./state/peer/control.sock`` (a daemon started by hand here). If none
exists the command says where it looked.

A torrent is named by its name, its info-hash, or a unique prefix of the
info-hash (``status`` shows the first 8 digits). Output is plain lines when
stdout is not a terminal: no ``\r`` progress, no screen clearing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shoal.daemons.runtime import cli

DEFAULT_SOCKET = "/var/lib/shoal-peer/control.sock"
DEFAULT_CONFIG = "/etc/shoal/peer.toml"
# The info-hash digits `status` shows; any unique prefix of at least MIN_PREFIX is accepted.
SHORT_HASH = 8
MIN_PREFIX = 4


def add_commands(peer: argparse._SubParsersAction, top: argparse._SubParsersAction) -> None:
    def with_socket(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--socket", default=os.environ.get("SHOAL_PEER_SOCKET"),
                       help="the daemon's control socket (default: $SHOAL_PEER_SOCKET, else found from "
                            f"--config, {DEFAULT_CONFIG}, {DEFAULT_SOCKET} or ./state/peer/control.sock)")
        p.add_argument("--config", help="the daemon's config file: its control socket is used")
        return p

    a = with_socket(peer.add_parser("add", help="add a .torrent to the running peer daemon"))
    a.add_argument("torrent", help="a .torrent file or a magnet link")
    a.add_argument("--dest", help="download directory (default: the daemon's download_dir)")
    a.add_argument("--upload-rate", type=int, default=0, help="this torrent's upload limit, bytes/s (0: none)")
    a.add_argument("--download-rate", type=int, default=0, help="this torrent's download limit, bytes/s (0: none)")
    a.set_defaults(func=cmd_add)

    lim = with_socket(peer.add_parser("limit", help="set a torrent's own upload and download limits"))
    lim.add_argument("which", help="name, info-hash, or a unique prefix of it")
    lim.add_argument("--upload-rate", type=int, default=0, help="bytes/s (0: none)")
    lim.add_argument("--download-rate", type=int, default=0, help="bytes/s (0: none)")
    lim.set_defaults(func=cmd_limit)

    s = with_socket(peer.add_parser("status", help="progress, rates, peers and ETA of every torrent"))
    s.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    s.set_defaults(func=cmd_status)

    r = with_socket(peer.add_parser("remove", help="stop a torrent (files stay on disk)"))
    r.add_argument("which", help="name, info-hash, or a unique prefix of it")
    r.set_defaults(func=cmd_remove)

    st = with_socket(peer.add_parser("stream", help="deadline mode: fetch in reading order for a reader at RATE"))
    st.add_argument("which", help="name, info-hash, or a unique prefix of it")
    st.add_argument("--rate", type=int, required=True, help="the reader's speed, bytes/s")
    st.add_argument("--offset", type=int, default=0, help="where the reader starts, bytes (default 0)")
    st.set_defaults(func=cmd_stream)

    c = peer.add_parser("create", help="make a .torrent from a file or directory")
    c.add_argument("path")
    c.add_argument("--tracker", action="append", required=True, help="announce URL (repeat for tiers)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--piece-length", type=int, default=0,
                   help="bytes, a power of two from 16384 (default: by size)")
    c.add_argument("--web-seed", action="append", default=[], help="BEP 19 URL")
    c.add_argument("--private", action="store_true")
    c.set_defaults(func=cmd_create)

    g = top.add_parser("get", help="download a torrent, seed it for a while, and exit")
    g.add_argument("torrent", help="a .torrent file or a magnet link")
    g.add_argument("--dest", default=".", help="where to put the files (default: here)")
    g.add_argument("--seed-time", type=float, default=0.0, help="seconds to seed after completing")
    g.add_argument("--listen", default="127.0.0.1:0", help="host:port for incoming peers (default 127.0.0.1:0)")
    g.add_argument("--upload-rate", type=int, default=0, help="bytes/s, 0 = unlimited")
    g.add_argument("--tracker", action="append", default=[], help="announce URL to use too (repeatable)")
    g.add_argument("--peer", action="append", default=[],
                   help="HOST:PORT of a peer to dial (repeatable)")
    g.set_defaults(func=cmd_get)


# -- option checks: one line (``shoal: ...``), not argparse's usage and error --------


def _bad_options(args) -> str | None:
    """What is wrong with the options that argparse's types let through, if anything."""
    for name in ("upload_rate", "download_rate"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            return f"--{name.replace('_', '-')} {value}: a rate is bytes/s, 0 or more"
    seed_time = getattr(args, "seed_time", None)
    if seed_time is not None and not 0 <= seed_time < float("inf"):
        return f"--seed-time {seed_time}: seconds, 0 or more"
    length = getattr(args, "piece_length", None)
    if length and (length < 16384 or length & (length - 1)):
        return f"--piece-length {length}: must be a power of two, 16384 (16 KiB) or more"
    for text in getattr(args, "peer", None) or ():
        if host_port(text) is None:
            return f"--peer {text!r}: expected HOST:PORT (port 1 to 65535)"
    return None


def host_port(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


# -- finding the daemon -----------------------------------------------------------------


def _socket_of_config(path: str) -> Path:
    """Where the daemon run with this config file (from here) puts its control socket."""
    from shoal.daemons.peer.config import PeerConfig
    from shoal.daemons.runtime.config import ConfigError, load_config
    from shoal.daemons.runtime.daemon import resolve_state_dir

    try:
        cfg = load_config(path, PeerConfig)
    except ConfigError as exc:
        cli.die(str(exc))
    if cfg.peer.control_socket:
        return Path(cfg.peer.control_socket)
    return resolve_state_dir("peer", cfg.daemon.state_directory, os.environ) / "control.sock"


def control_socket(args) -> str:
    """The control socket to use (see the module docstring); dies saying where it looked."""
    if args.socket:
        found = Path(args.socket)
    elif args.config:
        found = _socket_of_config(args.config)
    else:
        looked = []
        if Path(DEFAULT_CONFIG).is_file():
            looked.append(_socket_of_config(DEFAULT_CONFIG))
        looked += [Path(DEFAULT_SOCKET), Path("state/peer/control.sock")]
        for candidate in looked:
            if candidate.exists():
                found = candidate
                break
        else:
            cli.die("no peer daemon found: no control socket at " + ", ".join(str(p) for p in looked)
                    + " (pass --socket PATH or --config FILE)")
    # runtime.cli.call takes a target with a "/" as a unix socket path.
    return str(found) if "/" in str(found) else f"./{found}"


def _rpc(args, method: str, params=None):
    return cli.call(control_socket(args), method, params, what="the peer daemon")


def cmd_add(args) -> int:
    if bad := _bad_options(args):
        return cli.fail(bad)
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
    verb = "already added" if reply.get("already") else "added"
    print(f"{verb} {reply['name']} ({reply['info_hash']}), {reply['state']}")
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
        head = f"{t['info_hash'][:SHORT_HASH]} {t['name'][:28]:<28}"
        if t["state"] == "metadata":
            lines.append(f"{head} [{_bar(0.0)}] fetching the metadata from peers (magnet link)")
            continue
        if t["state"] == "error":
            lines.append(f"{head} [{_bar(0.0)}] error: {t.get('error', '')}")
            continue
        done = 1 - t["left"] / t["size"] if t["size"] else 1.0
        eta = "-" if t["eta"] is None else time.strftime("%H:%M:%S", time.gmtime(t["eta"]))
        lines.append(f"{head} [{_bar(done)}] {done:6.1%} {t['state']:<11} "
                     f"down {_rate(t['down_rate'])} up {_rate(t['up_rate'])} peers {t['peers']:>3} eta {eta}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    tty = sys.stdout.isatty()
    while True:
        text = format_status(_rpc(args, "status"))
        if not args.watch:
            print(text)
            return 0
        # A terminal is redrawn in place; a pipe or file gets plain lines.
        print(("\x1b[2J\x1b[H" if tty else "") + text, flush=True)
        try:
            time.sleep(1.0)  # a display refresh
        except KeyboardInterrupt:
            return 0


def pick_torrent(rows: list[dict], which: str) -> str:
    """The info-hash of the one torrent ``which`` names (name, info-hash or its prefix); dies otherwise."""
    key = which.lower()
    match = [t for t in rows if which == t["name"] or key == t["info_hash"]]
    if not match and len(key) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in key):
        match = [t for t in rows if t["info_hash"].startswith(key)]
    if len(match) != 1:
        names = ", ".join(f"{t['info_hash'][:SHORT_HASH]} {t['name']}" for t in match)
        cli.die(f"{which!r} matches {len(match)} torrents" + (f" ({names}): use the info-hash" if names else ""))
    return match[0]["info_hash"]


def _which(args) -> str:
    return pick_torrent(_rpc(args, "status"), args.which)


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

    if bad := _bad_options(args):
        return cli.fail(bad)

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
    if total == 0:
        return cli.fail(f"{root}: nothing to share (0 bytes)")
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

    if bad := _bad_options(args):
        return cli.fail(bad)
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


def progress_printer(tty: bool, every: float = 10.0):
    """``show(text, now, final)``: redraws one line on a terminal, else a line every ``every`` s."""
    last = [-float("inf")]

    def show(text: str, now: float, final: bool = False) -> None:
        if tty:
            print("\r" + text, end="\n" if final else "", flush=True)
        elif final or now - last[0] >= every:
            last[0] = now
            print(text, flush=True)

    return show


async def _get(meta, args) -> int:
    import tempfile
    from dataclasses import replace

    import trio
    from prometheus_client import CollectorRegistry

    from shoal.daemons.peer.config import LimitsSection, PeerConfig, PeerSection
    from shoal.daemons.peer.metadata import NoSource, fetch_metadata
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
            found: tuple = ()
            x_pe: tuple = ()
            if isinstance(meta, Magnet):
                print(f"fetching the metadata of {meta.display_name or meta.info_hash.hex()} from peers")
                magnet = replace(meta, trackers=tuple(dict.fromkeys((*meta.trackers, *args.tracker))),
                                 peers=tuple(dict.fromkeys((*meta.peers, *map(host_port, args.peer)))))
                try:
                    fetched = await fetch_metadata(session, magnet)
                except NoSource as exc:
                    nursery.cancel_scope.cancel()
                    return cli.fail(str(exc))
                meta, found, x_pe = fetched.meta, fetched.tracker_peers, magnet.peers
            if args.tracker:
                meta = replace(meta, announce_list=(*meta.announce_list, *((url,) for url in args.tracker)))
            torrent = await session.add(meta, dest)
            torrent.add_addresses(found, "tracker")
            torrent.add_addresses(x_pe, "magnet")
            torrent.add_addresses([host_port(p) for p in args.peer], "manual")
            start = trio.current_time()
            show = progress_printer(sys.stdout.isatty())
            while not torrent.completed.is_set():
                show(format_status([torrent.status()]), trio.current_time())
                with trio.move_on_after(1.0):  # a display refresh
                    await torrent.completed.wait()
            show(format_status([torrent.status()]), trio.current_time(), final=True)
            print(f"done in {trio.current_time() - start:.1f}s: {dest / meta.name}")
            if args.seed_time > 0:
                print(f"seeding for {args.seed_time:.0f}s")
                await trio.sleep(args.seed_time)
            nursery.cancel_scope.cancel()
    return 0
