"""The swarm experiment's per-host programs: ``python -m shoal.lab.agents_swarm ACTION ...``.

Each runs as its own process inside one lab host (``Lab.spawn``), so every
host's client has its own address, sockets and share of the CPU, like the
shoal peer daemons it is compared with:

* ``serve ROOT ADDR:PORT``: a static HTTP server for the files under ROOT,
  with byte ranges (``Range: bytes=a-b`` and ``bytes=a-``), on the runtime's
  own HTTP server. It is the client-server baseline's server and the
  streaming test's web seed (the CDN).
* ``libtorrent TORRENT SAVE --ip ADDR [--seed]``: one libtorrent session
  (:class:`shoal.demo.realclients.LibtorrentClient`) on the host's address.
* ``http URL DEST``: fetch one file over HTTP into DEST (the client-server
  baseline's client).

Protocol with the experiment: each agent prints JSON lines on stdout.
``{"event": "ready"}`` means it is set up (a seed: its torrent is checked
and the tracker has answered); a downloader then waits for SIGUSR1, the
experiment's "go", so that all hosts start together however long each took to
start, and prints ``{"event": "done", "t": T}`` when the file is complete on
disk, T being its ``time.monotonic()`` (one clock for every namespace of the
machine). A libtorrent agent goes on seeding until it is terminated; the
others exit. An error is ``{"event": "error", "message": ...}`` and exit 1.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import urllib.parse
from pathlib import Path

__all__ = ["main", "range_of", "GO"]

GO = signal.SIGUSR1
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
CHUNK = 1 << 20  # bytes per read/write of the HTTP client


def _say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _wait_for_go() -> None:
    """Block until SIGUSR1 (blocked at start, so one sent early is not lost)."""
    _say("ready")
    signal.sigwait({GO})


def range_of(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a ``Range`` header value within ``size``; None if unsatisfiable.

    Raises ValueError for a header that is not one ``bytes=a-b`` / ``bytes=a-`` range.
    """
    m = RANGE.match(header)
    if not m:
        raise ValueError(header)
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if first > last or first >= size:
        return None
    return first, min(last, size - 1)


async def _serve(root: Path, listen: str) -> None:
    import trio

    from shoal.daemons.runtime.config import ListenAddr
    from shoal.daemons.runtime.http import HttpRequest, HttpResponse, serve_http

    def locate(target: str) -> tuple[Path, int] | None:
        """The file a request names, and its size; None outside ROOT or missing."""
        base = root.resolve()
        path = (base / target.lstrip("/")).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            return None
        return path, path.stat().st_size

    def read(path: Path, first: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(first)
            return f.read(length)

    async def handle(req: HttpRequest) -> HttpResponse:
        if req.method not in (b"GET", b"HEAD"):
            return HttpResponse(405, body=b"GET only")
        found = await trio.to_thread.run_sync(
            locate, urllib.parse.unquote(req.target.decode("latin-1").partition("?")[0]))
        if found is None:
            return HttpResponse(404, body=b"no such file")
        path, size = found
        header = req.header(b"range")
        if header is None:
            return HttpResponse(200, [(b"accept-ranges", b"bytes")],
                                await trio.to_thread.run_sync(read, path, 0, size))
        try:
            span = range_of(header.decode("latin-1"), size)
        except ValueError:
            return HttpResponse(400, body=b"one byte range, please")
        if span is None:
            return HttpResponse(416, [(b"content-range", f"bytes */{size}".encode())])
        first, last = span
        body = await trio.to_thread.run_sync(read, path, first, last - first + 1)
        return HttpResponse(206, [(b"content-range", f"bytes {first}-{last}/{size}".encode())], body)

    async with trio.open_nursery() as nursery:
        # A client-server transfer of a whole file to one of N clients sharing
        # the server's link can take minutes: the idle timeout covers a send.
        bound = await nursery.start(lambda task_status: serve_http(
            handle, ListenAddr.parse(listen), max_request_bytes=16384, idle_timeout=3600.0,
            task_status=task_status))
        _say("ready", listen=str(bound))


def _libtorrent(torrent: Path, save: Path, ip: str, seed: bool, timeout: float) -> int:
    from shoal.demo.realclients import LibtorrentClient

    client = LibtorrentClient(ip, name=f"lt-{ip}")
    if seed:
        handle = client.add(torrent, save, seed=True)
        if not client.wait_until(lambda: client.replies(handle) > 0, timeout):
            _say("error", message=f"no tracker reply in {timeout:g}s: {client.errors[-1:]}")
            return 1
        _say("ready", port=client.port)
    else:
        _wait_for_go()
        handle = client.add(torrent, save)
        info_hash = bytes(handle.info_hashes().v1.to_bytes())
        if not client.wait_until(lambda: info_hash in client.finished, timeout):
            _say("error", message=f"not complete in {timeout:g}s ({client.progress(handle)[0]:.1%}): "
                                  f"{client.errors[-1:]}")
            return 1
        _say("done", t=time.monotonic())
    signal.sigwait({signal.SIGTERM, signal.SIGINT})  # seed on until the experiment ends the round
    client.close()
    return 0


def _http(url: str, dest: Path, timeout: float) -> int:
    import http.client

    u = urllib.parse.urlsplit(url)
    _wait_for_go()
    # http.client, not urllib.request: no proxy from the environment may be used inside the lab.
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=timeout)
    conn.request("GET", u.path or "/")
    resp = conn.getresponse()
    if resp.status != 200:
        _say("error", message=f"GET {url}: HTTP {resp.status}")
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:
        while chunk := resp.read(CHUNK):
            f.write(chunk)
    conn.close()
    _say("done", t=time.monotonic())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shoal.lab.agents_swarm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="action", required=True)
    s = sub.add_parser("serve", help="serve the files under ROOT over HTTP, with byte ranges")
    s.add_argument("root", type=Path)
    s.add_argument("listen", help="ADDR:PORT")
    lt = sub.add_parser("libtorrent", help="seed or download one torrent with libtorrent")
    lt.add_argument("torrent", type=Path)
    lt.add_argument("save", type=Path, help="the directory the file is (to be) in")
    lt.add_argument("--ip", required=True, help="the host's address, to listen on and dial from")
    lt.add_argument("--seed", action="store_true", help="the file is complete in SAVE: seed it")
    lt.add_argument("--timeout", type=float, default=600.0, help="s to finish (or, seeding, to hear the tracker)")
    h = sub.add_parser("http", help="download URL to DEST")
    h.add_argument("url")
    h.add_argument("dest", type=Path)
    h.add_argument("--timeout", type=float, default=600.0, help="s a read may stall")
    args = ap.parse_args(argv)
    # The "go" and the end of a round are signals taken with sigwait: block them before anything can arrive.
    if args.action == "libtorrent":
        signal.pthread_sigmask(signal.SIG_BLOCK, {GO, signal.SIGTERM, signal.SIGINT})
    elif args.action == "http":
        signal.pthread_sigmask(signal.SIG_BLOCK, {GO})
    try:
        if args.action == "serve":
            import trio

            trio.run(_serve, args.root, args.listen)
            return 0
        if args.action == "libtorrent":
            return _libtorrent(args.torrent, args.save, args.ip, args.seed, args.timeout)
        return _http(args.url, args.dest, args.timeout)
    except OSError as exc:
        _say("error", message=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
