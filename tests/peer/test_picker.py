"""The piece picker: the seeds' rules on small, fully controlled torrents.

No clocks: ``now`` is a plain number. Randomness: a seeded random.Random.
"""

import random
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shoal.core.swarm.picker import Block, PiecePicker, queue_depth

KB16 = 16384


def picker(n=10, piece_length=4 * KB16, total=None, *, seed=0, **kw) -> PiecePicker:
    total = n * piece_length if total is None else total
    return PiecePicker(n, piece_length, total, rng=random.Random(seed), **kw)


def bitfield(n: int, pieces) -> bytes:
    raw = bytearray((n + 7) // 8)
    for i in pieces:
        raw[i >> 3] |= 0x80 >> (i & 7)
    return bytes(raw)


def complete_piece(pk: PiecePicker, peer, index: int) -> None:
    """Request and receive every missing block of ``index`` from ``peer``, then verify it."""
    while not pk.all_blocks_received(index):
        for b in pk.pick(peer, {index}, 1000, 0.0):
            pk.block_received(peer, b.index, b.begin)
    pk.we_have(index)


# ------------------------------------------------------------ sizes, bitfields


def test_last_piece_and_last_block_are_shorter():
    pk = picker(5, 40000, 4 * 40000 + 20000, random_first=0)
    assert [pk.piece_size(i) for i in range(5)] == [40000] * 4 + [20000]
    assert pk.blocks_in_piece(0) == 3 and pk.blocks_in_piece(4) == 2
    pk.peer_have_all("s")
    pk.mode = "sequential"
    got = pk.pick("s", None, 100, 0.0)
    assert got[:3] == [Block(0, 0, KB16), Block(0, KB16, KB16), Block(0, 2 * KB16, 40000 - 2 * KB16)]
    assert got[-2:] == [Block(4, 0, KB16), Block(4, KB16, 20000 - KB16)]
    assert sum(b.length for b in got) == 180000
    assert pk.block(4, KB16).length == 3616
    with pytest.raises(ValueError):
        pk.block(4, 2 * KB16)  # past the end of the last piece
    with pytest.raises(ValueError):
        pk.block(0, 100)  # not a block boundary


def test_inconsistent_geometry_is_refused():
    with pytest.raises(ValueError):
        PiecePicker(3, 100, 301, rng=random.Random(0))
    with pytest.raises(ValueError):
        PiecePicker(3, 100, 200, rng=random.Random(0))


def test_bitfield_bytes_are_checked_and_counted():
    pk = picker(10)
    pk.peer_bitfield("a", bitfield(10, {0, 3, 9}))
    assert [pk.availability(i) for i in range(10)] == [1, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError):
        pk.peer_bitfield("b", b"\x00")  # 10 pieces need 2 bytes
    with pytest.raises(ValueError):
        pk.peer_bitfield("b", b"\x00\x01")  # a spare bit set
    with pytest.raises(ValueError):
        pk.peer_have("b", 10)
    with pytest.raises(ValueError):
        pk.peer_bitfield("b", {11})
    pk._check()


def test_availability_is_incremental_and_seeds_are_counted_once():
    pk = picker(10)
    pk.peer_bitfield("a", {1, 2})
    pk.peer_have("a", 3)
    pk.peer_have("a", 3)  # repeated Have: no double count
    pk.peer_have_all("s")
    pk.peer_bitfield("f", bitfield(10, range(10)))  # a full bitfield is a seed too
    assert pk._seeds == 2
    assert [pk.availability(i) for i in range(5)] == [2, 3, 3, 3, 2]
    pk._check()
    pk.peer_gone("a")
    pk.peer_gone("s")
    assert [pk.availability(i) for i in range(5)] == [1] * 5
    for i in range(10):
        pk.peer_have("h", i)  # a peer that completes via Have becomes a seed
    assert pk._seeds == 2 and pk.availability(0) == 2
    pk._check()


# ------------------------------------------------------------ the seeds' order


def first_pieces(seed: int, random_first: int, k: int = 4) -> list[int]:
    """100 one-block pieces; pieces 0-3 are held by one seed only, the rest by 21 peers."""
    pk = PiecePicker(100, KB16, 100 * KB16, random_first=random_first, rng=random.Random(seed))
    pk.peer_have_all("seed")
    for p in range(20):
        pk.peer_bitfield(p, set(range(4, 100)))
    order = []
    for _ in range(k):
        (b,) = pk.pick("seed", None, 1, 0.0)
        pk.block_received("seed", b.index, b.begin)
        pk.we_have(b.index)
        order.append(b.index)
    return order


def test_random_first_then_rarest_first():
    rare = {0, 1, 2, 3}
    # Without random first the seed's 4 rarest pieces come first, in some order.
    assert set(first_pieces(0, random_first=0)) == rare
    runs = [first_pieces(seed, random_first=4, k=5) for seed in range(10)]
    for run in runs:
        assert len(set(run[:4]) & rare) <= 1, run  # not the rarest-first choice...
        assert run[4] in rare, run  # ...until 4 pieces are in: then rarest first
    assert len({tuple(r[:4]) for r in runs}) == 10  # and random: every seed differs


def test_rarest_first_picks_the_piece_fewest_peers_have():
    pk = picker(20, KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_bitfield("b", set(range(20)) - {7, 11})
    pk.peer_bitfield("c", set(range(20)) - {7})
    assert pk.availability(7) == 1 and pk.availability(11) == 2
    assert [b.index for b in pk.pick("a", None, 2, 0.0)] == [7, 11]


def test_rarest_first_ties_are_broken_at_random():
    firsts = set()
    for seed in range(20):
        pk = picker(50, KB16, random_first=0, seed=seed)
        pk.peer_have_all("a")
        firsts.add(pk.pick("a", None, 1, 0.0)[0].index)
    assert len(firsts) >= 10


def test_rarest_first_only_among_pieces_the_peer_has():
    pk = picker(20, KB16, random_first=0)
    pk.peer_bitfield("a", {5})
    pk.peer_bitfield("b", {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17})
    pk.peer_bitfield("c", set(range(6, 20)))
    # b's pieces: 5 held by a and b (2), 6..17 held by b and c (2); 18, 19 (c only) are not b's.
    got = {b.index for b in pk.pick("b", None, 13, 0.0)}
    assert got == set(range(5, 18))
    assert [b.index for b in pk.pick("c", None, 2, 0.0)] in ([18, 19], [19, 18])


def test_partial_pieces_are_completed_before_new_ones():
    pk = picker(10, 4 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_have_all("b")
    first = pk.pick("a", None, 2, 0.0)
    x = first[0].index
    assert [b.begin for b in first] == [0, KB16]
    assert pk.pick("b", None, 2, 0.0) == [Block(x, 2 * KB16, KB16), Block(x, 3 * KB16, KB16)]
    y = pk.pick("a", None, 1, 0.0)[0].index
    assert y != x
    pk.request_failed("a", x, 0)  # rejected: wanted again, and first in line for b
    assert pk.pick("b", None, 1, 0.0) == [Block(x, 0, KB16)]
    pk._check()


def test_a_peer_continues_the_piece_it_already_works_on():
    pk = picker(10, 4 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_have_all("b")
    p1 = pk.pick("a", {1}, 1, 0.0)[0].index  # a opens piece 1 (the older partial)
    p2 = pk.pick("b", {2}, 1, 0.0)[0].index  # b opens piece 2
    assert (p1, p2) == (1, 2)
    assert [b.index for b in pk.pick("b", None, 3, 0.0)] == [2, 2, 2]
    assert [b.index for b in pk.pick("a", None, 3, 0.0)] == [1, 1, 1]


def test_endgame_duplicates_requests_and_cancels_the_rest():
    pk = picker(2, 2 * KB16, random_first=0, endgame_max=2)
    pk.peer_have_all("a")
    pk.peer_have_all("b")
    pk.peer_have_all("c")
    a = pk.pick("a", None, 10, 0.0)
    assert len(a) == 4 and pk.in_endgame
    b = pk.pick("b", None, 10, 1.0)
    assert sorted((x.index, x.begin) for x in b) == sorted((x.index, x.begin) for x in a)
    assert pk.pick("a", None, 10, 1.0) == []  # never twice to the same peer
    assert pk.pick("c", None, 10, 1.0) == []  # at most endgame_max requesters per block
    first = a[0]
    assert pk.block_received("b", first.index, first.begin) == ["a"]  # cancel it at a
    assert pk.block_received("a", first.index, first.begin) == []  # a's copy arrives late: ignored
    assert not pk.is_requested("a", first.index, first.begin)
    assert len(pk.outstanding("a")) == 3 and len(pk.outstanding("b")) == 3
    pk._check()


def test_no_endgame_while_some_block_is_unrequested():
    pk = picker(3, KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_bitfield("b", {0, 1})
    got = pk.pick("b", None, 10, 0.0)
    assert {b.index for b in got} == {0, 1}
    assert not pk.in_endgame  # piece 2 (only a has it) is still wanted
    assert pk.pick("b", None, 10, 0.0) == []  # b has nothing unrequested and no end-game yet
    got = pk.pick("a", None, 10, 0.0)
    # the wanted piece first; that starts the end-game, so the rest are duplicates
    assert got[0].index == 2 and sorted(b.index for b in got[1:]) == [0, 1]
    assert pk.in_endgame


def test_piece_failed_makes_every_block_wanted_again():
    pk = picker(3, 2 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_have_all("b")
    x = pk.pick("a", None, 1, 0.0)[0]
    (y,) = pk.pick("b", None, 1, 0.0)
    assert y.index == x.index
    pk.block_received("a", x.index, x.begin)
    pk.block_received("b", y.index, y.begin)
    assert pk.all_blocks_received(x.index)
    assert pk.piece_failed(x.index) == {"a", "b"}
    assert not pk.all_blocks_received(x.index)
    again = pk.pick("a", {x.index}, 10, 1.0)
    assert again == [Block(x.index, 0, KB16), Block(x.index, KB16, KB16)]
    pk._check()


def test_never_a_piece_we_have():
    pk = picker(4, KB16, random_first=0)
    for i in (0, 2):
        pk.we_have(i)
    pk.peer_have_all("a")
    assert sorted(b.index for b in pk.pick("a", None, 10, 0.0)) == [1, 3]
    assert pk.block_received("a", 0, 0) == []  # a block of a piece we have is ignored
    pk._check()


def test_unsolicited_and_duplicate_blocks():
    pk = picker(4, 2 * KB16, random_first=0)
    pk.peer_have_all("a")
    assert pk.block_received("a", 1, KB16) == []  # never requested: still taken
    assert pk.block_received("a", 1, KB16) == []  # twice: ignored
    got = pk.pick("a", None, 1, 0.0)
    assert got == [Block(1, 0, KB16)]  # the partial piece first, its missing block
    with pytest.raises(ValueError):
        pk.block_received("a", 1, 5)
    pk._check()


def test_peer_gone_releases_its_requests():
    pk = picker(4, 2 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_bitfield("b", {0, 1, 2, 3} - {3})
    got = pk.pick("a", None, 3, 0.0)
    assert sorted(pk.peer_gone("a"), key=lambda b: (b.index, b.begin)) == sorted(
        got, key=lambda b: (b.index, b.begin))
    assert pk.queued_bytes("a") == 0 and pk.availability(3) == 0
    again = pk.pick("b", None, 10, 1.0)
    assert {(b.index, b.begin) for b in got if b.index != 3} <= {(b.index, b.begin) for b in again}
    pk._check()


# ------------------------------------------------------- sequential, deadlines


def test_sequential_mode_picks_lowest_index_first():
    pk = picker(10, KB16, mode="sequential")
    pk.peer_bitfield("a", {9, 2, 5, 3, 7})
    pk.peer_bitfield("b", set(range(10)) - {2, 5, 3, 7})
    assert [b.index for b in pk.pick("a", None, 3, 0.0)] == [2, 3, 5]
    assert [b.index for b in pk.pick("b", None, 3, 0.0)] == [0, 1, 4]
    pk.mode = "rarest"
    with pytest.raises(ValueError):
        pk.mode = "fastest"


def test_deadlines_come_first_earliest_first():
    pk = picker(100, KB16, random_first=0)
    pk.peer_have_all("a")
    pk.set_deadline(50, 5.0)
    pk.set_deadline(30, 3.0)
    pk.set_deadline(70, 9.0)
    pk.set_deadline(70, None)
    assert [b.index for b in pk.pick("a", None, 2, 0.0)] == [30, 50]
    pk.peer_have("b", 80)
    pk.set_deadline(80, 1.0)
    assert pk.pick("a", {1, 2}, 1, 0.0)[0].index in (1, 2)  # a deadline the peer lacks is skipped


def test_spotify_most_urgent_block_goes_to_the_fastest_expected_peer():
    pk = picker(10, 4 * KB16, random_first=0)
    for p in ("fast", "slow", "none"):
        pk.peer_have_all(p) if p != "none" else pk.peer_bitfield(p, {9})
    pk.set_deadline(3, 10.0)
    pk.set_deadline(6, 20.0)
    rates = {"fast": 1_000_000.0, "slow": 100_000.0, "none": 10_000_000.0}
    got = pk.assign_urgent(rates, now=0.0)
    # greedy by expected time: fast takes blocks until its queue makes slow quicker
    # (8 blocks at 1 MB/s: 0.13 s; slow's first: 0.16 s), so all 8 go to fast.
    assert got == {"fast": [Block(3, k * KB16, KB16) for k in range(4)] + [Block(6, k * KB16, KB16) for k in range(4)]}
    assert pk.assign_urgent(rates, now=0.0) == {}  # nothing left to hand out
    pk._check()


def test_spotify_a_busy_fast_peer_loses_the_urgent_block_to_an_idle_one():
    pk = picker(200, 4 * KB16, random_first=0)
    pk.peer_have_all("fast")
    pk.peer_have_all("slow")
    pk.pick("fast", None, 150, 0.0)  # 2.4 MB queued at fast: 2.4 s at 1 MB/s
    urgent = next(i for i in range(200) if pk._pos[i] >= 0)
    pk.set_deadline(urgent, 1.0)
    got = pk.assign_urgent({"fast": 1_000_000.0, "slow": 100_000.0}, now=0.0)
    assert got["slow"][0] == Block(urgent, 0, KB16)
    pk._check()


def test_assign_urgent_respects_queue_depth():
    pk = picker(10, 64 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.set_deadline(0, 1.0)
    got = pk.assign_urgent({"a": 1.0}, now=0.0)  # a crawl: queue depth 2
    assert len(got["a"]) == 2


# ------------------------------------------------------ queue depth, timeouts


def test_queue_depth_follows_rate_and_is_clamped():
    assert queue_depth(0.0) == 2
    assert queue_depth(float("nan")) == 2
    assert queue_depth(10_000.0) == 2
    assert queue_depth(1_000_000.0) == int(3 * 1_000_000 / 16384) == 183
    assert queue_depth(1e12) == 500
    assert queue_depth(1_000_000.0, seconds=1.0, lo=4, hi=50) == 50
    assert queue_depth(100_000.0, seconds=1.0, lo=8) == 8


def test_expired_requests_are_returned_oldest_first_and_wanted_again():
    pk = picker(10, 2 * KB16, random_first=0)
    pk.peer_have_all("a")
    pk.peer_have_all("b")
    old = pk.pick("a", None, 2, 0.0)
    new = pk.pick("b", None, 2, 5.0)
    assert pk.expired(9.0, 10.0) == []
    assert pk.expired(12.0, 10.0) == [("a", old[0]), ("a", old[1])]
    assert pk.outstanding("a") == [] and len(pk.outstanding("b")) == 2
    assert pk.pick("b", None, 2, 12.0) == old  # the released blocks come first
    assert pk.block_received("a", old[0].index, old[0].begin) == ["b"]  # late but welcome
    assert [blk for _, blk in pk.expired(100.0, 10.0)] == new + [old[1]]
    pk._check()


# ---------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_simulated_download_completes_every_piece_exactly_once(data):
    n = data.draw(st.integers(1, 12), label="pieces")
    bs = 4
    pl = data.draw(st.sampled_from([4, 6, 8, 12, 16]), label="piece_length")
    total = data.draw(st.integers((n - 1) * pl + 1, n * pl), label="total")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    endgame_max = data.draw(st.integers(1, 3), label="endgame_max")
    pk = PiecePicker(n, pl, total, block_size=bs, random_first=data.draw(st.integers(0, 3)),
                     mode=data.draw(st.sampled_from(["rarest", "sequential"])),
                     endgame_max=endgame_max, rng=random.Random(seed))
    rng = random.Random(seed ^ 0x5EED)
    npeers = data.draw(st.integers(1, 5), label="peers")
    pieces = [data.draw(st.sets(st.integers(0, n - 1)), label=f"peer {p}") for p in range(npeers)]
    for i in range(n):  # every piece is somewhere
        if not any(i in s for s in pieces):
            pieces[rng.randrange(npeers)].add(i)

    def join(p):
        how = rng.randrange(3)
        if how == 0:
            pk.peer_bitfield(p, bitfield(n, pieces[p]))
        elif how == 1:
            for i in pieces[p]:
                pk.peer_have(p, i)
        elif len(pieces[p]) == n:
            pk.peer_have_all(p)
        else:
            pk.peer_bitfield(p, set(pieces[p]))

    def nblocks(i):
        return -(-pk.piece_size(i) // bs)

    outstanding: dict[tuple[int, int], set] = {}  # block -> peers it is requested from
    got: dict[int, set[int]] = {i: set() for i in range(n)}
    completed = [0] * n
    failed_once: set[int] = set()
    late: list[tuple[int, tuple[int, int]]] = []
    connected = set(range(npeers))
    for p in connected:
        join(p)
    now = 0.0

    def do_pick(p, count):
        blocks = pk.pick(p, None if rng.random() < 0.5 else pieces[p], count, now)
        assert len(blocks) <= count
        for b in blocks:
            key = (b.index, b.begin)
            assert not pk.have(b.index) and b.index in pieces[p]
            assert b == pk.block(b.index, b.begin)
            holders = outstanding.setdefault(key, set())
            assert p not in holders, "requested twice from the same peer"
            assert b.begin not in got[b.index], "requested a block we hold"
            if holders:
                assert pk.in_endgame, "duplicate request outside end-game"
                event("end-game duplicate")
            holders.add(p)
            assert len(holders) <= endgame_max

    def deliver(p, key):
        i, begin = key
        others = pk.block_received(p, i, begin)
        if pk.have(i) or begin in got[i]:
            assert others == []
            outstanding.get(key, set()).discard(p)
            return
        assert set(others) == outstanding.pop(key, set()) - {p}
        got[i].add(begin)
        if len(got[i]) == nblocks(i):
            assert pk.all_blocks_received(i)
            if i not in failed_once and rng.random() < 0.3:
                failed_once.add(i)
                event("hash failure")
                pk.piece_failed(i)
                got[i].clear()
            else:
                assert pk.we_have(i) == []
                completed[i] += 1

    for _ in range(rng.randrange(20, 200)):
        r = rng.random()
        now += rng.random()
        live = [(p, k) for k, ps in outstanding.items() for p in ps]
        if r < 0.35 and connected:
            do_pick(rng.choice(sorted(connected)), rng.randint(1, 6))
        elif r < 0.7 and live:
            deliver(*rng.choice(live))
        elif r < 0.75 and live:
            p, (i, begin) = rng.choice(live)
            pk.request_failed(p, i, begin)
            outstanding[(i, begin)].discard(p)
        elif r < 0.8 and connected:
            p = rng.choice(sorted(connected))
            released = pk.peer_gone(p)
            assert {(b.index, b.begin) for b in released} == {k for k, ps in outstanding.items() if p in ps}
            for ps in outstanding.values():
                ps.discard(p)
            connected.discard(p)
        elif r < 0.85 and len(connected) < npeers:
            p = rng.choice(sorted(set(range(npeers)) - connected))
            connected.add(p)
            join(p)
        elif r < 0.9:
            for p, b in pk.expired(now, 3.0):
                outstanding[(b.index, b.begin)].remove(p)
                if p in connected:
                    late.append((p, (b.index, b.begin)))
        elif r < 0.95 and late:
            p, key = late.pop(rng.randrange(len(late)))
            if p in connected:
                event("late block")
                deliver(p, key)
        else:
            i = rng.randrange(n)
            pk.set_deadline(i, None if rng.random() < 0.3 else now + rng.random() * 10)
        if rng.random() < 0.2:
            pk._check()
    pk._check()

    # Let every peer back and finish the download.
    for p in range(npeers):
        if p not in connected:
            connected.add(p)
            join(p)
    for _ in range(20 * (n + 1) * (pl // bs + 1)):
        if pk.complete:
            break
        for p in sorted(connected):
            do_pick(p, rng.randint(1, 8))
        live = [(p, k) for k, ps in outstanding.items() for p in ps]
        rng.shuffle(live)
        for p, key in live[: max(1, len(live) // 2)]:  # slow links: end-games overlap
            if p in outstanding.get(key, ()):
                deliver(p, key)
    assert pk.complete, "download did not finish"
    assert completed == [1] * n
    assert pk.pick(0, None, 10, now) == []
    pk._check()


# ----------------------------------------------------------------------- cost


def test_pick_cost_16k_pieces_30_peers(capsys):
    """Steady-state pick() cost at libtorrent scale; printed, never asserted (see bench/)."""
    n, pl = 16384, 256 * 1024
    rng = random.Random(7)
    pk = PiecePicker(n, pl, n * pl, rng=random.Random(1))
    peers = list(range(30))
    for p in peers:
        pk.peer_bitfield(p, bitfield(n, (i for i in range(n) if rng.random() < 0.5)))
    received = [0] * n
    blocks_per_piece = pl // KB16

    # fill each peer's queue, as after connecting
    inflight = {p: pk.pick(p, None, 16, 0.0) for p in peers}
    calls, spent, now = 0, 0.0, 0.0
    for step in range(30_000):
        p = peers[step % 30]
        if inflight[p]:
            b = inflight[p].pop(0)
            pk.block_received(p, b.index, b.begin)
            received[b.index] += 1
            if received[b.index] == blocks_per_piece:
                pk.we_have(b.index)
        now += 0.001
        t0 = time.perf_counter()
        more = pk.pick(p, None, 1, now)  # one block per received block, as the daemon does
        spent += time.perf_counter() - t0
        calls += 1
        inflight[p].extend(more)
    us = spent / calls * 1e6
    with capsys.disabled():
        print(f"\npick(): {us:.1f} us per call (16,384 pieces, 30 peers, {pk.num_have} pieces done)")
    assert pk.num_have > 0
    pk._check()


def test_released_partial_piece_returns_to_a_new_availability_level():
    # Found by an 8-leecher swarm: a piece went partial at availability 1,
    # more peers announced it while it was partial (outside the buckets),
    # then its only requester left, so it went back into a bucket level that
    # had never existed.
    pk = picker(4, random_first=0)
    pk.peer_have(0, 2)
    (block,) = pk.pick(0, None, 1, now=0.0)
    assert block.index == 2
    for peer in range(1, 6):
        pk.peer_have(peer, 2)
    assert pk.availability(2) == 6
    assert pk.peer_gone(0) == [block]
    assert pk.availability(2) == 5
    (again,) = pk.pick(1, None, 1, now=1.0)
    assert again == block


def test_block_length_matches_block_and_refuses_what_block_refuses():
    pk = picker(3, 4 * KB16, 2 * 4 * KB16 + KB16 + 100)  # last piece: one full block and 100 bytes
    for index in range(3):
        for begin in range(0, pk.piece_size(index), KB16):
            assert pk.block_length(index, begin) == pk.block(index, begin).length
    assert pk.block_length(2, KB16) == 100
    for index, begin in ((3, 0), (-1, 0), (0, 1), (0, -KB16), (2, 2 * KB16), (0, 4 * KB16)):
        with pytest.raises(ValueError):
            pk.block(index, begin)
        with pytest.raises(ValueError):
            pk.block_length(index, begin)
