"""``shoal demo``: a live tour of the suite on loopback, one part per capability.

The parts (``PARTS``, in order; ``--only`` picks some): swarm distribution,
node telemetry, diskless checkpointing and dispatch. Each lives with its
daemon; the swarm part is here. In it a shoal tracker starts on 127.0.0.1
(HTTP and UDP, ports chosen by the kernel), and a shoal peer shares a file
with real BitTorrent clients that Shoal did not write, libtorrent and aria2. Each client has its
own 127.0.0.x address and learns of the others only from the tracker. The
tracker's swarm view is printed as it changes; at the end every downloaded
copy is checked against the original and the tracker's own /metrics endpoint
is scraped.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from shoal.daemons.peer.announce import http_get
from shoal.daemons.peer.config import PeerConfig, PeerSection
from shoal.daemons.peer.session import Session
from shoal.daemons.peer.torrent import Torrent
from shoal.daemons.runtime.config import DaemonSection, ListenAddr
from shoal.daemons.runtime.daemon import serve
from shoal.daemons.tracker.config import AccessSection, TrackerConfig, TrackerSection
from shoal.daemons.tracker.daemon import TrackerApp
from shoal.demo.realclients import Aria2Client, LibtorrentClient, aria2_available, make_shared_file
from shoal.protocol.metainfo import parse_metainfo

REFRESH = 1.0  # seconds between swarm views


def client_name(peer_id: bytes) -> str:
    """Name a client from its peer_id (Azureus style "-LT2110-", or aria2's "A2-")."""
    if peer_id.startswith(b"-LT"):
        return "libtorrent"
    if peer_id.startswith(b"A2-"):
        return "aria2"
    if peer_id.startswith(b"-SH"):
        return "shoal"
    return peer_id[:8].decode("latin-1")


def swarm_view(app: TrackerApp, info_hash: bytes, size: int, elapsed: float) -> str:
    swarm = app.table.swarms.get(info_hash)
    m = app.metrics
    counts = {p: int(sum(m.announce_by[p, e]._value.get() for e in ("none", "started", "completed", "stopped")))
              for p in ("http", "udp")}
    head = (f"[{elapsed:5.1f}s] swarm {info_hash.hex()[:12]}  "
            f"seeders {swarm.seeders if swarm else 0}  leechers {swarm.leechers if swarm else 0}  "
            f"announces http {counts['http']} udp {counts['udp']}")
    lines = [head]
    for p in sorted(swarm.order if swarm else [], key=lambda p: (p.ip, p.port)):
        done = 1 - p.left / size if size else 1
        bar = "#" * int(done * 20)
        lines.append(f"    {client_name(p.peer_id):<11} {p.ip + ':' + str(p.port):<21} [{bar:<20}] {done:6.1%}"
                     f"{'  seed' if p.left == 0 else ''}")
    return "\n".join(lines)


async def swarm_tour(size_mib: int, timeout: float, out) -> int:
    holder: dict[str, TrackerApp] = {}

    def make_app(ctx):
        holder["app"] = TrackerApp(ctx)
        return holder["app"]

    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmpname:
        tmp = Path(tmpname)
        config = TrackerConfig(
            daemon=DaemonSection(metrics_listen=ListenAddr("127.0.0.1", 0), state_directory=str(tmp / "state")),
            tracker=replace(
                TrackerSection(),
                http_listen=ListenAddr("127.0.0.1", 0),
                udp_listen=ListenAddr("127.0.0.1", 0),
                # Lab timing: clients re-announce every 2 s so the view moves.
                announce_interval=2,
                min_interval=1,
                peer_timeout=60,
            ),
            access=AccessSection(),
        )
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(partial(serve, "tracker", config, None, make_app, handle_signals=False))
            app = holder["app"]
            http, udp = ctx.addresses["http"], ctx.addresses["udp"]
            print(f"shoal tracker: http://{http}/announce  udp://{udp}/announce  "
                  f"metrics http://{ctx.addresses['metrics']}/metrics", file=out)
            try:
                async with trio.open_nursery() as peers:  # the shoal peer's tasks
                    code = await _swarm(app, ctx, peers, tmp, size_mib << 20, http, udp, timeout, out)
                    peers.cancel_scope.cancel()
            finally:
                ctx.request_stop()
        return code


async def _swarm(app, ctx, peers: trio.Nursery, tmp: Path, size: int, http, udp, timeout: float, out) -> int:
    shared = make_shared_file(tmp / "seed", "dataset.bin", size, f"http://{http}/announce")
    want = hashlib.sha1(shared.path.read_bytes()).hexdigest()
    print(f"sharing {shared.path.name}: {size >> 20} MiB, info-hash {shared.info_hash.hex()}", file=out)

    # One leecher uses a torrent whose only tracker is udp://. Only one
    # session in this process speaks UDP: libtorrent caches BEP 15 connection
    # ids per process, and the tracker binds each id to the client's IP.
    udp_torrent = shared.torrent_for(f"udp://{udp}/announce", tmp / "udp-only.torrent")

    # libtorrent re-announces no more often than every 5 minutes unless told;
    # the seeder's upload is capped so the swarm has time to be watched.
    lab = {"min_announce_interval": 1}
    seeder = LibtorrentClient("127.0.0.2", name="libtorrent seeder", **lab)
    seeder.add(shared.torrent, shared.path.parent, seed=True).set_upload_limit(max(1 << 20, size // 6))
    leechers: list[tuple[str, Path, Any]] = []  # (libtorrent session, handle), a Torrent or an Aria2Client
    lt_http = LibtorrentClient("127.0.0.3", name="libtorrent (http)", **lab)
    lt_http_dir = tmp / "lt-http"
    h1 = lt_http.add(shared.torrent, lt_http_dir)
    h1.set_upload_limit(max(1 << 20, size // 12))
    lt_udp = LibtorrentClient("127.0.0.4", name="libtorrent (udp)", **lab)
    lt_udp_dir = tmp / "lt-udp"
    (lt_udp_dir).mkdir()
    h2 = lt_udp.add(udp_torrent, lt_udp_dir)
    h2.set_upload_limit(max(1 << 20, size // 12))
    leechers += [("libtorrent (http)", lt_http_dir, (lt_http, h1)), ("libtorrent (udp)", lt_udp_dir, (lt_udp, h2))]
    # A shoal peer joins the same swarm, in this process.
    shoal_session = Session(PeerConfig(peer=replace(PeerSection(), listen=ListenAddr("127.0.0.6", 0))),
                            CollectorRegistry(), tmp / "shoal", tmp / "shoal-resume")
    await peers.start(shoal_session.run)
    shoal_torrent = await shoal_session.add(parse_metainfo(shared.torrent.read_bytes()))
    leechers.append(("shoal", tmp / "shoal", shoal_torrent))
    aria = None
    if aria2_available():
        aria_dir = tmp / "aria2"
        aria = Aria2Client(shared.torrent, aria_dir, seed=False, ip="127.0.0.5", log=tmp / "aria2.log")
        leechers.append(("aria2", aria_dir, aria))
    else:
        print("aria2c not installed: the tour runs without it (scripts/setup installs it)", file=out)

    start = time.monotonic()
    finished_at: dict[str, float] = {}
    code = 0
    try:
        while len(finished_at) < len(leechers):
            elapsed = time.monotonic() - start
            if elapsed > timeout:
                print(f"timed out after {timeout:.0f}s; finished: {sorted(finished_at)}", file=out)
                code = 1
                break
            for name, _dir, client in leechers:
                if name in finished_at:
                    continue
                if isinstance(client, Torrent):
                    if client.completed.is_set():
                        finished_at[name] = elapsed
                elif isinstance(client, Aria2Client):
                    rc = client.poll()
                    if rc is not None:
                        finished_at[name] = elapsed
                        if rc != 0:
                            print(f"aria2c exited {rc}; see its log", file=out)
                            code = 1
                elif client[0].progress(client[1])[1]:
                    finished_at[name] = elapsed
            print(swarm_view(app, shared.info_hash, size, elapsed), file=out, flush=True)
            await trio.sleep(REFRESH)  # display refresh, not synchronisation
        print(swarm_view(app, shared.info_hash, size, time.monotonic() - start), file=out)
        for name, directory, _client in leechers:
            got = directory / "dataset.bin"
            ok = got.exists() and hashlib.sha1(got.read_bytes()).hexdigest() == want
            t = finished_at.get(name)
            print(f"  {name:<18} {'identical copy' if ok else 'MISSING OR DIFFERENT'}"
                  f"{f' after {t:.1f}s' if t is not None else ''}", file=out)
            code |= 0 if ok else 1
    finally:
        for c in (seeder, lt_http, lt_udp):
            c.close()
        if aria is not None:
            aria.close()
        shoal_torrent.stop()
    print(await _scrape_metrics(ctx.addresses["metrics"]), file=out)
    return code


async def _scrape_metrics(addr: ListenAddr) -> str:
    """Fetch our own /metrics over HTTP, as Prometheus would, and keep the tracker lines."""
    _status, raw = await http_get(addr.host, addr.port, b"/metrics")
    body = raw.decode()
    keep = [line for line in body.splitlines()
            if line.startswith(("shoal_tracker_announces_total", "shoal_tracker_scrapes", "shoal_tracker_swarms",
                                "shoal_tracker_seeders", "shoal_tracker_leechers", "shoal_tracker_rejected"))
            and not line.endswith(" 0.0")]
    return "tracker metrics (from /metrics):\n  " + "\n  ".join(keep)


#: The parts of the tour, in order: name -> ``module:function``. Each function
#: is ``async (size_mib, timeout, out) -> exit code`` and cleans up after
#: itself; a part that fails does not stop the later ones.
PARTS: dict[str, str] = {
    "swarm": "shoal.demo.tour:swarm_tour",
    "telemetry": "shoal.demo.telemetry:tour",
    "checkpoint": "shoal.demo.checkpoint:tour",
    "dispatch": "shoal.demo.dispatch:tour",
}


def run_demo(size_mib: int = 32, timeout: float = 120.0, out=sys.stdout, only: list[str] | None = None) -> int:
    import importlib

    names = only if only else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"shoal demo: unknown part {', '.join(unknown)} (parts: {', '.join(PARTS)})", file=sys.stderr)
        return 2
    code = 0
    for name in names:
        module, attr = PARTS[name].split(":")
        tour = getattr(importlib.import_module(module), attr)
        print(f"\n=== {name} ===", file=out, flush=True)
        rc = trio.run(tour, size_mib, timeout, out)
        print(f"=== {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} ===", file=out, flush=True)
        code |= rc
    return code
