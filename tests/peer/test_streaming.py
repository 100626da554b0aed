"""Streaming (deadline) mode: pieces arrive in reading order, from a slow swarm."""

import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo


async def swarm(lab, tmp_path, seeders=2):
    tracker = await lab.tracker()
    shared = make_shared_file(tmp_path / "seed", "movie.bin", 4 << 20, f"http://{tracker['http']}/announce",
                              piece_length=64 << 10)
    meta = parse_metainfo(shared.torrent.read_bytes())
    for _ in range(seeders):
        await (await lab.peer(upload_rate=512 << 10)).add(meta, shared.path.parent)
    return shared, meta


async def first_half_share(t, meta) -> float:
    """When half of the pieces are verified: the share of them in the file's first half."""
    half = meta.num_pieces // 2
    while t.storage.num_verified < half:
        await t.piece_verified.wait()
    return sum(t.storage.is_verified(i) for i in range(half)) / t.storage.num_verified


async def test_a_stream_gets_the_pieces_in_reading_order(lab, tmp_path):
    with trio.fail_after(60):
        shared, meta = await swarm(lab, tmp_path)
        t = await (await lab.peer()).add(meta)
        assert t.stream(0, 256 << 10) == meta.num_pieces
        share = await first_half_share(t, meta)
        await t.completed.wait()
    # rarest-first would give about one half; see the next test
    assert share >= 0.9, share


async def test_without_a_stream_the_order_is_rarest_first(lab, tmp_path):
    with trio.fail_after(60):
        shared, meta = await swarm(lab, tmp_path)
        t = await (await lab.peer()).add(meta)
        share = await first_half_share(t, meta)
    assert share < 0.9, share


async def test_stream_from_an_offset_and_bad_arguments(lab, tmp_path):
    import pytest

    with trio.fail_after(30):
        shared, meta = await swarm(lab, tmp_path, seeders=1)
        t = await (await lab.peer()).add(meta)
        offset = 48 * meta.piece_length + 100
        assert t.stream(offset, 1 << 20) == meta.num_pieces - 48
        while not all(t.storage.is_verified(i) for i in range(48, meta.num_pieces)):
            await t.piece_verified.wait()
        # the tail was wanted first: most of the head is still missing
        assert sum(t.storage.is_verified(i) for i in range(48)) < 40
        for bad in ((-1, 1.0), (meta.total_length, 1.0), (0, 0.0)):
            with pytest.raises(ValueError):
                t.stream(*bad)
