"""Real BitTorrent clients against the shoal tracker daemon.

libtorrent (PyPI) and aria2 (Debian) announce over HTTP and UDP, a scrape
shows them, and pairs of them find each other only through the tracker and
complete a download. Clients never get each other's address any other way.
.ci/run installs both; a missing one fails here, it is not skipped.
"""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from shoal.daemons.peer.announce import open_tracker
from shoal.demo.realclients import Aria2Client, LibtorrentClient, aria2_argv, make_shared_file
from shoal.protocol.metainfo import Magnet

from .conftest import start_tracker
from .test_daemon import metrics, rejected

pytestmark = pytest.mark.interop


def sha1(path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def require_aria2():
    assert shutil.which("aria2c"), "aria2c is missing: .ci/run (scripts/setup) installs Debian aria2"


async def wait_lt(client: LibtorrentClient, condition, timeout=30.0):
    assert await trio.to_thread.run_sync(client.wait_until, condition, timeout), client.errors[-5:]


async def wait_aria2(client: Aria2Client, timeout=60.0) -> int:
    with trio.fail_after(timeout):
        return await client.wait()


async def test_libtorrent_over_http_and_udp_and_scrape_shows_them(config, tmp_path):
    async with await start_tracker(config) as d:
        http, udp = d.addresses["http"], d.addresses["udp"]
        shared = make_shared_file(tmp_path / "seed", "data.bin", 4 << 20, f"http://{http}/announce")
        udp_torrent = shared.torrent_for(f"udp://{udp}/announce", tmp_path / "udp.torrent")
        seeder = LibtorrentClient("127.0.0.2")
        leecher = LibtorrentClient("127.0.0.3")
        try:
            hs = seeder.add(shared.torrent, shared.path.parent, seed=True)
            await wait_lt(seeder, lambda: seeder.replies(hs) >= 1)
            hl = leecher.add(udp_torrent, tmp_path / "leech")
            await wait_lt(leecher, lambda: shared.info_hash in leecher.finished)
            # The leecher announces "completed" over UDP once it has the file.
            await wait_lt(leecher, lambda: leecher.replies(hl) >= 2)
            assert sha1(tmp_path / "leech" / "data.bin") == sha1(shared.path)

            for url in (f"http://{http}/announce", f"udp://{udp}/announce"):
                tracker = open_tracker(url, timeout=1.0)
                stats = (await tracker.scrape((shared.info_hash,)))[shared.info_hash]
                tracker.close()
                assert (stats.complete, stats.incomplete, stats.downloaded) == (2, 0, 1), url
            m = await metrics(d)
            assert m[("shoal_tracker_announces_total", (("event", "started"), ("protocol", "http")))] == 1
            assert m[("shoal_tracker_announces_total", (("event", "started"), ("protocol", "udp")))] == 1
            assert m[("shoal_tracker_announces_total", (("event", "completed"), ("protocol", "udp")))] == 1
        finally:
            seeder.close()
            leecher.close()
        assert await d.terminate() == 0


async def test_aria2_downloads_from_libtorrent_through_the_tracker(config, tmp_path):
    require_aria2()
    async with await start_tracker(config) as d:
        http = d.addresses["http"]
        shared = make_shared_file(tmp_path / "seed", "data.bin", 8 << 20, f"http://{http}/announce")
        seeder = LibtorrentClient("127.0.0.2")
        aria = None
        try:
            hs = seeder.add(shared.torrent, shared.path.parent, seed=True)
            await wait_lt(seeder, lambda: seeder.replies(hs) >= 1)
            aria = Aria2Client(shared.torrent, tmp_path / "aria2", seed=False, ip="127.0.0.3",
                               log=tmp_path / "aria2.log")
            rc = await wait_aria2(aria)
            assert rc == 0, (tmp_path / "aria2.log").read_text()[-2000:]
            assert sha1(tmp_path / "aria2" / "data.bin") == sha1(shared.path)
            m = await metrics(d)
            http_events = {dict(k[1])["event"]: v for k, v in m.items()
                           if k[0] == "shoal_tracker_announces_total" and dict(k[1])["protocol"] == "http"}
            # Both clients said started; aria2 said stopped as it exited (with
            # seed-time 0 it leaves without a completed event).
            assert http_events["started"] == 2 and http_events["stopped"] == 1
        finally:
            seeder.close()
            if aria:
                aria.close()
        assert await d.terminate() == 0


async def test_libtorrent_over_udp_downloads_from_aria2_over_http(config, tmp_path):
    """One swarm, two protocols: aria2 announces over HTTP, libtorrent over UDP.

    (aria2 sends UDP tracker requests only through its DHT socket, and DHT
    stays off in tests so nothing leaves loopback; libtorrent covers UDP.)
    """
    require_aria2()
    async with await start_tracker(config) as d:
        http, udp = d.addresses["http"], d.addresses["udp"]
        shared = make_shared_file(tmp_path / "seed", "data.bin", 8 << 20, f"http://{http}/announce")
        udp_torrent = shared.torrent_for(f"udp://{udp}/announce", tmp_path / "udp.torrent")
        aria = Aria2Client(shared.torrent, shared.path.parent, seed=True, ip="127.0.0.4",
                           seed_time_min=10, log=tmp_path / "aria2.log")
        leecher = LibtorrentClient("127.0.0.5")
        try:
            leecher.add(udp_torrent, tmp_path / "leech")
            await wait_lt(leecher, lambda: shared.info_hash in leecher.finished, timeout=60)
            assert sha1(tmp_path / "leech" / "data.bin") == sha1(shared.path)
            tracker = open_tracker(f"udp://{udp}/announce", timeout=1.0)
            stats = (await tracker.scrape((shared.info_hash,)))[shared.info_hash]
            tracker.close()
            assert stats.complete >= 1  # at least aria2, the seeder
        finally:
            leecher.close()
            aria.close()
        assert await d.terminate() == 0


def start_aria2_magnet(magnet: str, directory: Path, ip: str, log: Path) -> subprocess.Popen:
    """aria2c fetching a magnet link (aria2_argv ends with what to fetch: a
    .torrent, replaced here by the link)."""
    argv = [*aria2_argv(Path("unused.torrent"), directory, seed=False, ip=ip)[:-1], magnet]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def test_aria2_fetches_a_magnet_link_through_the_tracker(config, tmp_path):
    """aria2 is given only a magnet link naming the shoal tracker; a libtorrent
    seeder is in the swarm. While aria2 fetches the metadata it announces
    started with left=0, so the tracker takes it for a seeder: it must still
    be handed the seeder (a seeder gets leechers first, then other seeders),
    or it never finds a peer (the issue: 0 bytes, forever)."""
    require_aria2()
    async with await start_tracker(config) as d:
        url = f"http://{d.addresses['http']}/announce"
        shared = make_shared_file(tmp_path / "seed", "data.bin", 4 << 20, url)
        seeder = LibtorrentClient("127.0.0.8")
        aria = None
        log = tmp_path / "aria2.log"
        try:
            hs = seeder.add(shared.torrent, shared.path.parent, seed=True)
            await wait_lt(seeder, lambda: seeder.replies(hs) >= 1)
            magnet = Magnet(shared.info_hash, "data.bin", (url,)).uri()
            aria = start_aria2_magnet(magnet, tmp_path / "aria2", "127.0.0.9", log)
            with trio.fail_after(60):
                rc = await trio.to_thread.run_sync(aria.wait, abandon_on_cancel=True)
            assert rc == 0, log.read_text()[-2000:]
            assert sha1(tmp_path / "aria2" / "data.bin") == sha1(shared.path)
            m = await metrics(d)
            # The seeder, aria2's metadata phase (left=0) and its data phase.
            assert m[("shoal_tracker_announces_total", (("event", "started"), ("protocol", "http")))] >= 3
            assert rejected(m, "http") == {}
        finally:
            seeder.close()
            if aria is not None and aria.poll() is None:
                aria.kill()
                aria.wait()
        assert await d.terminate() == 0
