"""Shoal peers with real clients: libtorrent (PyPI) and aria2 (Debian).

Each pair meets only through a shoal tracker. .ci/run installs both clients;
a missing one fails here, it is not skipped.
"""

import shutil

import pytest
import trio

from shoal.demo.realclients import Aria2Client, LibtorrentClient, make_shared_file
from shoal.protocol.metainfo import parse_metainfo

from .conftest import next_client_ip, sha1

pytestmark = pytest.mark.interop


def require_aria2():
    assert shutil.which("aria2c"), "aria2c is missing: .ci/run (scripts/setup) installs Debian aria2"


async def shared_file(lab, tmp_path, size=4 << 20, scheme="http"):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", size, f"{scheme}://{tracker[scheme]}/announce")
    return shared, parse_metainfo(shared.torrent.read_bytes())


async def test_shoal_downloads_from_libtorrent(lab, tmp_path):
    shared, meta = await shared_file(lab, tmp_path)
    client = LibtorrentClient(next_client_ip())
    try:
        client.add(shared.torrent, shared.path.parent, seed=True)
        with trio.fail_after(60):
            t = await (await lab.peer()).add(meta)
            await t.completed.wait()
        assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    finally:
        client.close()


async def test_shoal_fetches_a_magnet_link_from_libtorrent(lab, tmp_path):
    """The info dictionary comes from libtorrent over BEP 9 (its x.pe address
    and the tracker both name it), then the pieces do."""
    from shoal.daemons.peer.metadata import fetch_metadata
    from shoal.protocol.metainfo import Magnet

    shared, meta = await shared_file(lab, tmp_path)
    client = LibtorrentClient(next_client_ip())
    try:
        client.add(shared.torrent, shared.path.parent, seed=True)
        magnet = Magnet(meta.info_hash, "data.bin", meta.trackers, peers=((client.ip, client.port),))
        session = await lab.peer()
        with trio.fail_after(60):
            fetched = await fetch_metadata(session, magnet)
            assert fetched.meta.raw_info == meta.raw_info and fetched.meta.trackers == meta.trackers
            t = await session.add(fetched.meta)
            await t.completed.wait()
        assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    finally:
        client.close()


async def test_libtorrent_fetches_a_magnet_link_from_shoal(lab, tmp_path):
    shared, meta = await shared_file(lab, tmp_path)
    await (await lab.peer()).add(meta, shared.path.parent)
    client = LibtorrentClient(next_client_ip())
    try:
        client.add_magnet(meta.magnet().uri(), tmp_path / "lt")
        ok = await trio.to_thread.run_sync(client.wait_until, lambda: meta.info_hash in client.finished, 60)
        assert ok, client.errors[-5:]
        assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
    finally:
        client.close()


async def test_libtorrent_downloads_from_shoal(lab, tmp_path):
    shared, meta = await shared_file(lab, tmp_path, scheme="udp")
    seed = await (await lab.peer()).add(meta, shared.path.parent)
    assert seed.state == "seeding"
    client = LibtorrentClient(next_client_ip())
    try:
        client.add(shared.torrent, tmp_path / "lt")
        ok = await trio.to_thread.run_sync(client.wait_until, lambda: meta.info_hash in client.finished, 60)
        assert ok, client.errors[-5:]
        assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
        assert seed.uploaded >= meta.total_length
    finally:
        client.close()


async def test_aria2_downloads_from_shoal(lab, tmp_path):
    require_aria2()
    shared, meta = await shared_file(lab, tmp_path)
    seed = await (await lab.peer()).add(meta, shared.path.parent)
    aria = Aria2Client(shared.torrent, tmp_path / "aria2", seed=False, ip=next_client_ip(), log=tmp_path / "aria2.log")
    try:
        with trio.fail_after(60):
            rc = await aria.wait()
        assert rc == 0, (tmp_path / "aria2.log").read_text()[-2000:]
        assert sha1(tmp_path / "aria2" / "data.bin") == sha1(shared.path)
        assert seed.uploaded >= meta.total_length
    finally:
        aria.close()


async def test_shoal_downloads_from_aria2(lab, tmp_path):
    require_aria2()
    shared, meta = await shared_file(lab, tmp_path)
    aria = Aria2Client(shared.torrent, shared.path.parent, seed=True, ip=next_client_ip(), seed_time_min=10,
                       log=tmp_path / "aria2.log")
    try:
        with trio.fail_after(60):
            t = await (await lab.peer()).add(meta)
            await t.completed.wait()
        assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    finally:
        aria.close()


async def test_mixed_swarm_through_the_shoal_tracker(lab, tmp_path):
    """libtorrent seeds; shoal, libtorrent and aria2 leech; all meet only through the tracker."""
    require_aria2()
    shared, meta = await shared_file(lab, tmp_path, size=6 << 20)
    seeder = LibtorrentClient(next_client_ip())
    leecher = LibtorrentClient(next_client_ip())
    aria = None
    try:
        seeder.add(shared.torrent, shared.path.parent, seed=True)
        shoal = [await (await lab.peer()).add(meta) for _ in range(2)]
        leecher.add(shared.torrent, tmp_path / "lt")
        aria = Aria2Client(shared.torrent, tmp_path / "aria2", seed=False, ip=next_client_ip(),
                           log=tmp_path / "aria2.log")
        with trio.fail_after(90):
            for t in shoal:
                await t.completed.wait()
            assert await trio.to_thread.run_sync(
                leecher.wait_until, lambda: meta.info_hash in leecher.finished, 60)
            assert await aria.wait() == 0
        want = sha1(shared.path)
        assert all(sha1(t.save_dir / "data.bin") == want for t in shoal)
        assert sha1(tmp_path / "lt" / "data.bin") == want
        assert sha1(tmp_path / "aria2" / "data.bin") == want
    finally:
        seeder.close()
        leecher.close()
        if aria:
            aria.close()
