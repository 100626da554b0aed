"""Tit-for-tat has teeth: when upload capacity is scarce, a free-rider is served last.

Eight reciprocating leechers each start with a different half of the file
(every piece is on half of them) and there is no seeder, so every byte moves
by trade and the leechers' upload caps are the scarce resource. A ninth
peer, the free-rider, starts empty and never unchokes anyone (no regular
and no optimistic slots), so it uploads nothing.
Everyone runs the same choker: 3 regular slots for the peers uploading to
us fastest, 1 optimistic, short intervals so the test is quick. The
free-rider never earns a regular slot and lives on optimistic unchokes.

It is compared by bytes received up to the moment the first reciprocator
finishes (before that, nobody is a seed, so every byte moved was chosen by
tit-for-tat or by the optimistic unchoke), not by wall-clock time, so a slow machine changes nothing but
the test's duration. The expected shares: each reciprocator uploads a quarter
of its capacity optimistically, to one of about 4 choked interested peers,
so the free-rider gets about 8 x 1/4 x 1/4 = 0.5 of one cap and a
reciprocator close to a whole one.
"""

import random

import trio

from shoal.daemons.peer.config import ChokerSection
from shoal.demo.realclients import make_shared_file
from shoal.protocol.metainfo import parse_metainfo

CHOKER = ChokerSection(slots=3, interval=1.0, optimistic_interval=2.0, rate_window=3.0)
FREE_RIDER = ChokerSection(slots=0, optimistic_slots=0)
CAP = 64 << 10  # upload bytes/s of each reciprocator
RECIPROCATORS = 8
PIECE = 16 << 10


async def test_a_free_rider_downloads_slower_than_peers_that_reciprocate(lab, tmp_path):
    shared = make_shared_file(tmp_path / "seed", "data.bin", 128 * PIECE, "http://127.0.0.1:1/announce",
                              piece_length=PIECE)
    meta = parse_metainfo(shared.torrent.read_bytes())
    data = shared.path.read_bytes()
    rng = random.Random(7)
    holders = [rng.sample(range(RECIPROCATORS), RECIPROCATORS // 2) for _ in range(meta.num_pieces)]
    with trio.fail_after(120):
        reciprocators = []
        for i in range(RECIPROCATORS):
            # Start with the pieces this peer holds, zeros elsewhere; the
            # start-up recheck verifies exactly those.
            part = bytearray(len(data))
            for p, who in enumerate(holders):
                if i in who:
                    part[p * PIECE:(p + 1) * PIECE] = data[p * PIECE:(p + 1) * PIECE]
            (tmp_path / f"r{i}").mkdir()
            (tmp_path / f"r{i}" / "data.bin").write_bytes(part)
            session = await lab.peer(upload_rate=CAP, choker=CHOKER)
            reciprocators.append(await session.add(meta, tmp_path / f"r{i}"))
            assert reciprocators[-1].storage.num_verified == sum(i in who for who in holders)
        free_rider = await (await lab.peer(choker=FREE_RIDER)).add(meta)
        everyone = [*reciprocators, free_rider]
        for t in everyone:  # no tracker: each peer is told of all the others
            t.add_addresses((o.session.listen_addr.host, o.session.listen_addr.port) for o in everyone if o is not t)

        received: dict = {}
        done: list = []

        async def finish(t, cancel: trio.CancelScope) -> None:
            await t.completed.wait()
            done.append(t)
            if len(done) == 1:
                received.update(free_rider=free_rider.downloaded, others=[r.downloaded for r in reciprocators])
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            for t in reciprocators:
                nursery.start_soon(finish, t, nursery.cancel_scope)

    mine, others = received["free_rider"], sorted(received["others"])
    median = others[len(others) // 2]
    print(f"bytes received when the first reciprocator was done: free-rider {mine}, reciprocators {others}")
    # Expected about 0.5 (see above); measured 0.49-0.57 on a loaded 2-core machine.
    assert mine < 0.75 * median
    assert not free_rider.completed.is_set() and free_rider.uploaded == 0
