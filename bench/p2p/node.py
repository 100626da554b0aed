"""One side of a bench/p2p measurement, run as its own process by bench.py.

    python bench/p2p/node.py '<json spec>'

The spec names the implementation ("shoal" or "libtorrent"), the role
("seed" or "leech"), the .torrent, and one or more nodes, each with its own
127.0.0.x address and directory. Several shoal nodes in one process are
several independent Sessions (own listener, peer_id, throttles) in one trio
loop; libtorrent runs one node per process (its sessions share process-wide
state).

The process talks to bench.py in JSON lines: it prints events on stdout
(times are time.monotonic(), i.e. CLOCK_MONOTONIC, comparable between
processes) and reads commands on stdin:

    -> {"ev": "seeding"}          a seed has its pieces checked and a tracker reply
    -> {"ev": "ready"}            a leecher's sessions are listening
    <- go                         leechers: add the torrent now
    -> {"ev": "added"|"first"|"done", "node": i, "t": ...}
    <- quit                       print {"ev": "stats", ...} and exit
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

POLL = 0.002  # seconds between looks at a leecher's byte counter before its first byte


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


# -- shoal ---------------------------------------------------------------------------


def run_shoal(spec: dict) -> None:
    from dataclasses import replace

    import trio
    from prometheus_client import CollectorRegistry

    from shoal.daemons.peer.config import LimitsSection, PeerConfig, PeerSection
    from shoal.daemons.peer.session import Session
    from shoal.daemons.runtime.config import DaemonSection, ListenAddr
    from shoal.protocol.metainfo import parse_metainfo

    meta = parse_metainfo(Path(spec["torrent"]).read_bytes())
    seed = spec["role"] == "seed"

    async def readline() -> str:
        return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            sessions, registries = [], []
            for node in spec["nodes"]:
                cfg = PeerConfig(
                    daemon=DaemonSection(metrics_listen=None),
                    peer=replace(PeerSection(), listen=ListenAddr(node["ip"], 0),
                                 super_seed=spec.get("super_seed", False)),
                    limits=LimitsSection(upload_rate=spec.get("upload_rate", 0),
                                         download_rate=spec.get("download_rate", 0)),
                )
                reg = CollectorRegistry()
                d = Path(node["dir"])
                s = Session(cfg, reg, d, Path(node.get("resume") or d.parent / (d.name + ".resume")))
                await nursery.start(s.run)
                sessions.append(s)
                registries.append(reg)
            torrents = []
            if seed:
                # One session and one registry were made per node above.
                for s, node, reg in zip(sessions, spec["nodes"], registries, strict=True):
                    t = await s.add(meta, Path(node["dir"]))
                    assert t.state == "seeding", f"seed not complete after recheck: {t.state}"
                    torrents.append(t)
                    # noqa reason: a metric has no event to wait on; the seed is ready once announced.
                    while not reg.get_sample_value("shoal_peer_announces_total", {"result": "ok"}):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                emit(ev="seeding", t=time.monotonic())
            else:
                emit(ev="ready", t=time.monotonic())
                line = await readline()
                assert line.strip() == "go", line

                async def leech(i: int, s: Session) -> None:
                    t = await s.add(meta)
                    torrents.append(t)
                    emit(ev="added", node=i, t=time.monotonic())
                    # A measurement (time of the first payload byte), at POLL resolution: nothing signals it.
                    while t.downloaded == 0 and not t.completed.is_set():  # noqa: ASYNC110
                        await trio.sleep(POLL)
                    emit(ev="first", node=i, t=time.monotonic())
                    await t.completed.wait()
                    emit(ev="done", node=i, t=time.monotonic(), downloaded=t.downloaded)

                async with trio.open_nursery() as leechers:
                    for i, s in enumerate(sessions):
                        leechers.start_soon(leech, i, s)
                emit(ev="all_done", t=time.monotonic())
            while (await readline()).strip() not in ("quit", ""):
                pass
            emit(ev="stats", nodes=[{"uploaded": t.uploaded, "downloaded": t.downloaded,
                                     "peers": len(t.links)} for t in torrents])
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- libtorrent ----------------------------------------------------------------------


def run_libtorrent(spec: dict) -> None:
    from shoal.demo.realclients import LibtorrentClient

    (node,) = spec["nodes"]
    client = LibtorrentClient(node["ip"])
    torrent = Path(spec["torrent"])

    def capped(h):
        # The torrent's own limit: libtorrent exempts local (here: loopback)
        # peers from the session-wide upload_rate_limit, not from this one.
        if spec.get("upload_rate"):
            h.set_upload_limit(int(spec["upload_rate"]))
        if spec.get("download_rate"):
            h.set_download_limit(int(spec["download_rate"]))
        return h

    if spec["role"] == "seed":
        # Not seed_mode: libtorrent checks every piece now, as shoal's recheck does,
        # instead of lazily while it serves them.
        h = capped(client.add(torrent, Path(node["dir"])))
        while not (h.status().is_seeding and client.replies(h) >= 1):
            client.session.wait_for_alert(50)
            client._drain()
        emit(ev="seeding", t=time.monotonic())
    else:
        emit(ev="ready", t=time.monotonic())
        assert sys.stdin.readline().strip() == "go"
        h = capped(client.add(torrent, Path(node["dir"])))
        emit(ev="added", node=0, t=time.monotonic())
        while h.status().total_payload_download == 0:
            time.sleep(POLL)
        emit(ev="first", node=0, t=time.monotonic())
        info = h.info_hashes().v1.to_bytes()
        client.wait_until(lambda: bytes(info) in client.finished, 600)
        st = h.status()
        emit(ev="done", node=0, t=time.monotonic(), downloaded=st.total_payload_download)
        emit(ev="all_done", t=time.monotonic())
    while sys.stdin.readline().strip() not in ("quit", ""):
        pass
    st = h.status()
    emit(ev="stats", nodes=[{"uploaded": st.total_payload_upload, "downloaded": st.total_payload_download,
                             "peers": st.num_peers}])
    client.close()


def main() -> None:
    emit(ev="start", t=time.monotonic())
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"node[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    if spec["impl"] == "shoal":
        run_shoal(spec)
    else:
        run_libtorrent(spec)


if __name__ == "__main__":
    main()
