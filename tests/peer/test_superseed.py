"""Super-seeding (BEP 16): the bookkeeping on its own, then a real swarm and libtorrent."""

import random

import trio

from shoal.core.swarm.superseed import SuperSeeder
from shoal.daemons.peer.config import PeerSection
from shoal.demo.realclients import LibtorrentClient, make_shared_file
from shoal.protocol.metainfo import parse_metainfo

from .conftest import next_client_ip, sha1


def seeder(n=10, per_peer=2):
    have: dict = {}
    s = SuperSeeder(n, lambda p, i: i in have.get(p, set()), per_peer=per_peer, rng=random.Random(1))
    return s, have


def test_each_peer_is_offered_the_least_sent_pieces_and_only_those_are_served():
    s, have = seeder()
    a = s.add_peer("a")
    b = s.add_peer("b")
    assert len(a) == len(b) == 2 and not set(a) & set(b)  # four different pieces out of ten
    assert all(s.may_serve("a", i) for i in a) and not any(s.may_serve("a", i) for i in b)


def test_a_piece_seen_elsewhere_earns_its_peer_a_new_offer():
    s, have = seeder()
    a = s.add_peer("a")
    s.add_peer("b")
    have["b"] = {a[0]}  # b got a's piece (from a): it is out in the swarm
    out = s.peer_has("b", a[0])
    assert list(out) == ["a"] and len(out["a"]) == 1
    assert not s.may_serve("a", a[0]) and s.may_serve("a", out["a"][0])


def test_pieces_a_peer_already_has_are_not_offered_to_it():
    s, have = seeder(n=4, per_peer=2)
    s.add_peer("a")
    have["a"] = {0, 1, 2}  # its bitfield arrives after our first offers
    s.peer_has("a", None)
    assert s.offered["a"] == {3}


def test_once_every_piece_is_out_everything_is_announced():
    s, have = seeder(n=4, per_peer=2)
    s.add_peer("a")
    s.add_peer("b")
    have["a"] = {0, 1}
    s.peer_has("a", None)
    assert s.missing == 2
    have["b"] = {2}
    s.peer_has("b", 2)
    have["b"].add(3)
    s.peer_has("b", 3)
    assert s.missing == 0
    rest = s.finish()
    for peer in ("a", "b"):  # everything it lacks is now announced to it
        assert set(rest.get(peer, [])) | s.announced[peer] | have[peer] == {0, 1, 2, 3}
    assert s.may_serve("a", 0) and s.may_serve("b", 3)


async def test_a_super_seed_uploads_about_one_copy_to_a_swarm(lab, tmp_path):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", 4 << 20, f"http://{tracker['http']}/announce",
                              piece_length=64 << 10)
    meta = parse_metainfo(shared.torrent.read_bytes())
    with trio.fail_after(60):
        seed = await (await lab.peer(upload_rate=1 << 20, super_seed=True)).add(meta, shared.path.parent)
        assert seed.super is not None
        leechers = [await (await lab.peer(upload_rate=1 << 20)).add(meta) for _ in range(4)]
        for t in leechers:
            await t.completed.wait()
    for t in leechers:
        assert sha1(t.save_dir / "data.bin") == sha1(shared.path)
    # A plain seed sends most of the file to each leecher early on; a
    # super-seed sends each piece about once, then the leechers trade.
    print(f"super-seed uploaded {seed.uploaded / meta.total_length:.2f} copies")
    assert seed.uploaded < 1.5 * meta.total_length, seed.uploaded / meta.total_length


async def test_libtorrent_downloads_from_a_super_seed(lab, tmp_path):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", 2 << 20, f"http://{tracker['http']}/announce")
    meta = parse_metainfo(shared.torrent.read_bytes())
    await (await lab.peer(super_seed=True)).add(meta, shared.path.parent)
    client = LibtorrentClient(next_client_ip())
    try:
        client.add(shared.torrent, tmp_path / "lt")
        ok = await trio.to_thread.run_sync(client.wait_until, lambda: meta.info_hash in client.finished, 60)
        assert ok, client.errors[-5:]
        assert sha1(tmp_path / "lt" / "data.bin") == sha1(shared.path)
    finally:
        client.close()


def test_super_seeding_is_off_by_default():
    assert PeerSection().super_seed is False
