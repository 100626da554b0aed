"""Per-torrent rate limits sit inside the session's: one torrent can be slowed alone."""

import trio

from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo


async def test_a_torrents_own_download_limit_slows_it_and_not_its_neighbour(lab, tmp_path):
    tracker = await lab.tracker()
    metas = []
    seeder = await lab.peer()
    for name in ("slow.bin", "fast.bin"):
        shared = make_shared_file(tmp_path / name, name, 2 << 20, f"http://{tracker['http']}/announce",
                                  piece_length=64 << 10)
        meta = parse_metainfo(shared.torrent.read_bytes())
        await seeder.add(meta, shared.path.parent)
        metas.append(meta)
    leecher = await lab.peer()
    with trio.fail_after(60):
        slow = await leecher.add(metas[0], download_rate=256 << 10)  # 8 s for 2 MiB at best
        fast = await leecher.add(metas[1])
        await fast.completed.wait()
        # The same seeder, the same link: only the limit differs.
        assert not slow.completed.is_set()
        assert slow.download_throttle.rate == 256 << 10
        slow.set_limits(0, 0)  # lifted: it finishes at full speed
        await slow.completed.wait()
