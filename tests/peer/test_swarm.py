"""Shoal peers on loopback: a seeder and eight leechers through a shoal tracker."""

import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo

from .conftest import sha1


async def test_one_seeder_and_eight_leechers_end_with_identical_files(lab, tmp_path):
    with trio.fail_after(90):
        tracker = await lab.tracker()
        shared = make_shared_file(tmp_path / "seed", "data.bin", 6 << 20, f"http://{tracker['http']}/announce",
                                  piece_length=128 * 1024)
        meta = parse_metainfo(shared.torrent.read_bytes())
        seeder = await lab.peer()
        seed = await seeder.add(meta, shared.path.parent)
        assert seed.state == "seeding"
        leechers = [await (await lab.peer()).add(meta) for _ in range(8)]
        for t in leechers:
            await t.completed.wait()
        want = sha1(shared.path)
        for t in leechers:
            assert sha1(t.save_dir / "data.bin") == want
        # Leechers traded with each other, not only with the seed.
        assert sum(t.uploaded for t in leechers) > 0
        assert all(t.status()["left"] == 0 for t in leechers)
        verified = sum(s.metrics.verified._value.get() for s in lab.sessions[1:])
        assert verified == 8 * meta.num_pieces
        assert sum(s.metrics.failed._value.get() for s in lab.sessions) == 0


async def test_a_link_keeps_downloading_while_a_piece_it_delivered_is_being_written(lab, tmp_path):
    # The disk stalls on the first whole piece the leecher writes. Before, the
    # link that delivered that piece waited for the write: with one seeder,
    # nothing more arrived until the disk came back.
    import threading

    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "data.bin", 2 << 20, f"http://{tracker['http']}/announce",
                              piece_length=64 * 1024)
    meta = parse_metainfo(shared.torrent.read_bytes())
    seed = await (await lab.peer()).add(meta, shared.path.parent)
    assert seed.state == "seeding"
    leech = await (await lab.peer()).add(meta)
    disk = threading.Event()
    stalled: list[int] = []
    write_piece = leech.storage.write_piece

    def slow_write_piece(index, blocks):
        if not stalled:
            stalled.append(index)
            disk.wait(60)
        return write_piece(index, blocks)

    leech.storage.write_piece = slow_write_piece
    try:
        with trio.fail_after(30):
            while leech.storage.num_verified < 4:  # pieces other than the stalled one
                await leech.piece_verified.wait()
        assert stalled and not leech.storage.is_verified(stalled[0])
    finally:
        disk.set()
    with trio.fail_after(30):
        await leech.completed.wait()
    assert sha1(leech.save_dir / "data.bin") == sha1(shared.path)
