"""The torrent core (core.swarm.torrent): events in with an explicit ``now``, actions out.

Pure: a real PiecePicker, no trio, no disk. Peers are plain strings.
"""

import random

import pytest

from shoal.core.swarm.picker import BLOCK_SIZE, PiecePicker
from shoal.core.swarm.torrent import Cancel, HashFailed, PauseRequests, Refill, TorrentCore, Verified, Verify, Write

PIECE = 4 * BLOCK_SIZE
LAST = BLOCK_SIZE + 3616  # the last piece is short: one whole block and a short one
TOTAL = 2 * PIECE + LAST


def core(**kw) -> TorrentCore:
    picker = PiecePicker(3, PIECE, TOTAL, mode="sequential", random_first=0, rng=random.Random(7))
    c = TorrentCore(picker, **kw)
    for peer in ("a", "b", "c"):
        picker.peer_have_all(peer)
    return c


def data(index: int, begin: int, length: int = BLOCK_SIZE) -> bytes:
    return bytes([index * 16 + begin // BLOCK_SIZE]) * length


def feed(c: TorrentCore, peer: str, blocks, now: float = 0.0) -> list:
    """Deliver ``blocks`` from ``peer``; every action that came back."""
    out = []
    for b in blocks:
        out += c.block_received(peer, b.index, b.begin, data(b.index, b.begin, b.length))
    return out


def writes(actions) -> list[Write]:
    return [a for a in actions if type(a) is Write]


def test_a_whole_piece_is_one_write_and_is_announced_when_it_checks():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    assert {b.index for b in blocks} == {0}
    actions = feed(c, "a", blocks)
    assert actions == [Write(0, tuple((b.begin, data(0, b.begin)) for b in blocks), whole=True)]
    assert c.writing(0) == 1 and c.pending_bytes == 0
    assert c.write_done(0, True) == [Verified(0, complete=False)]
    assert c.picker.have(0) and c.writing(0) == 0


def test_the_last_piece_completes_the_torrent():
    c = core()
    for index in range(3):
        blocks = c.picker.pick("a", None, 4, now=0.0)
        (w,) = writes(feed(c, "a", blocks))
        assert w.index == index and w.whole
        assert c.write_done(index, True) == [Verified(index, complete=index == 2)]
    assert c.picker.complete


def test_a_duplicate_block_is_ignored_and_not_written_twice():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    first = blocks[0]
    assert feed(c, "a", [first]) == []
    assert feed(c, "a", [first]) == []  # again: nothing buffered twice
    assert c.buffered(0) == BLOCK_SIZE
    (w,) = writes(feed(c, "a", blocks[1:]))
    assert sorted(begin for begin, _ in w.blocks) == [0, BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE]
    assert w.whole


def test_a_block_of_a_piece_we_have_changes_nothing():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    feed(c, "a", blocks)
    c.write_done(0, True)
    assert feed(c, "b", blocks) == []
    assert c.pending_bytes == 0 and c.writing(0) == 0


def test_a_block_never_requested_is_kept_and_its_sender_answers_for_it():
    """A block nobody asked for is still data we need (the link polices who
    sends unrequested blocks); if its piece fails, its sender shares the blame."""
    c = core()
    assert feed(c, "b", [c.picker.block(1, 0)]) == []  # piece 1 was never requested from anyone
    assert c.buffered(1) == BLOCK_SIZE
    rest = c.picker.pick("a", None, 8, now=0.0)
    assert all(b.index != 1 or b.begin != 0 for b in rest)  # the block is not asked for again
    actions = feed(c, "a", [b for b in rest if b.index == 1])
    (w,) = writes(actions)
    assert w.index == 1 and w.whole
    failed = c.write_done(1, False)
    assert failed[0] == HashFailed(1, failed[0].senders, points=1) and set(failed[0].senders) == {"a", "b"}


def test_end_game_the_first_copy_wins_and_the_other_peer_is_cancelled():
    c = core()
    c.picker.pick("a", None, 100, now=0.0)  # everything is requested from a
    dup = c.picker.pick("b", None, 1, now=1.0)  # end-game: b is asked for the same block
    assert dup and c.picker.in_endgame
    b0 = dup[0]
    assert c.block_received("b", b0.index, b0.begin, data(b0.index, b0.begin, b0.length)) == \
        [Cancel("a", b0.index, b0.begin, b0.length)]
    assert c.block_received("a", b0.index, b0.begin, data(b0.index, b0.begin, b0.length)) == []  # crossed the Cancel


def test_a_piece_that_fails_from_one_sender_blames_it_certainly_and_is_wanted_again():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    feed(c, "a", blocks)
    assert c.write_done(0, False) == [HashFailed(0, ("a",), points=2), Refill()]
    assert HashFailed(0, ("a",), 2).certain
    again = c.picker.pick("b", None, 4, now=1.0)
    assert [(b.index, b.begin) for b in again] == [(b.index, b.begin) for b in blocks]
    (w,) = writes(feed(c, "b", again))  # the offsets received before do not count any more
    assert w.whole and len(w.blocks) == 4
    assert c.write_done(0, True) == [Verified(0, complete=False)]


def test_a_piece_from_two_senders_blames_each_by_one_point_and_nobody_else():
    c = core()
    first = c.picker.pick("a", None, 2, now=0.0)
    second = c.picker.pick("b", None, 2, now=0.0)
    c.picker.pick("c", None, 4, now=0.0)  # c has requests in piece 1 only
    assert {b.index for b in first + second} == {0}
    feed(c, "a", first)
    (w,) = writes(feed(c, "b", second))
    (failed, refill) = c.write_done(w.index, False)
    assert type(refill) is Refill
    assert failed.points == 1 and not failed.certain and sorted(failed.senders) == ["a", "b"]


def test_a_peer_gone_with_requests_in_flight_releases_them_and_keeps_what_it_sent():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    feed(c, "a", blocks[:2])
    assert c.peer_gone("a") == [Refill()]
    assert c.peer_gone("a") == []  # twice: nothing more to release
    again = c.picker.pick("b", None, 2, now=1.0)
    assert [(b.index, b.begin) for b in again] == [(0, 2 * BLOCK_SIZE), (0, 3 * BLOCK_SIZE)]
    (w,) = writes(feed(c, "b", again))
    assert w.whole and len(w.blocks) == 4
    failed = c.write_done(0, False)[0]
    assert sorted(failed.senders) == ["a", "b"]  # the gone peer is blamed too (bans outlive links)


def test_a_choke_or_reject_gives_the_blocks_to_other_peers():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    assert c.requests_failed("a", []) == []
    assert c.requests_failed("a", [(b.index, b.begin) for b in blocks[:3]]) == [Refill()]
    again = c.picker.pick("b", None, 4, now=1.0)
    assert [(b.index, b.begin) for b in again][:3] == [(b.index, b.begin) for b in blocks[:3]]
    assert c.requests_failed("a", [(99, 0)]) == [Refill()]  # a reject for nothing we asked: harmless


def test_requests_time_out_at_the_given_time_and_a_late_block_is_still_taken():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=100.0)
    assert c.expired(now=129.0, timeout=30.0) == []
    expired = c.expired(now=130.0, timeout=30.0)
    assert expired == [*(Cancel("a", b.index, b.begin, b.length) for b in blocks), Refill()]
    again = c.picker.pick("b", None, 4, now=130.0)
    assert [(b.index, b.begin) for b in again] == [(b.index, b.begin) for b in blocks]
    feed(c, "a", blocks[:1])  # late, after its Cancel: still the data we need
    assert feed(c, "b", again[:1]) == []  # and b's copy of it then changes nothing
    (w,) = writes(feed(c, "b", again[1:]))
    assert w.whole


def test_a_failed_write_releases_the_piece_and_blames_nobody():
    c = core()
    blocks = c.picker.pick("a", None, 4, now=0.0)
    (w,) = writes(feed(c, "a", blocks))
    assert c.write_failed(w.index, now=10.0) == [PauseRequests(until=11.0, seconds=1.0), Refill()]
    assert c.writing(0) == 0 and not c.picker.have(0)
    assert not c.may_request(10.5) and c.may_request(11.0)
    again = c.picker.pick("a", None, 4, now=11.0)
    assert [(b.index, b.begin) for b in again] == [(b.index, b.begin) for b in blocks]
    (w,) = writes(feed(c, "a", again))
    assert w.whole
    assert c.write_done(0, True) == [Verified(0, complete=False)]


def test_a_disk_that_stays_broken_pauses_requests_longer_each_time_until_a_write_succeeds():
    c = core(disk_retry_first=2.0, disk_retry_max=8.0)
    now = 100.0
    pauses = []
    for _ in range(5):
        blocks = c.picker.pick("a", None, 4, now)
        (w,) = writes(feed(c, "a", blocks))
        first, *rest = c.write_failed(w.index, now)
        assert type(first) is PauseRequests and rest == [Refill()]
        pauses.append(first.seconds)
        now = first.until
    assert pauses == [2.0, 4.0, 8.0, 8.0, 8.0]
    # Writes of blocks already on their way fail during the pause: no longer pause for them.
    blocks = c.picker.pick("a", None, 8, now)
    ws = writes(feed(c, "a", blocks))
    assert len(ws) == 2
    assert type(c.write_failed(ws[0].index, now)[0]) is PauseRequests
    assert c.write_failed(ws[1].index, now + 1.0) == [Refill()]
    # The disk works again: one good write and the next error pauses briefly.
    now += 8.0
    (w,) = writes(feed(c, "a", c.picker.pick("a", None, 4, now)))
    c.write_done(w.index, True)
    (w,) = writes(feed(c, "a", c.picker.pick("a", None, 4, now)))
    assert c.write_failed(w.index, now)[0] == PauseRequests(now + 2.0, 2.0)


def test_a_piece_in_batches_is_verified_after_its_last_write_only():
    c = core(write_batch=2 * BLOCK_SIZE)
    blocks = c.picker.pick("a", None, 4, now=0.0)
    (w1,) = writes(feed(c, "a", blocks[:2]))
    assert not w1.whole
    (w2,) = writes(feed(c, "a", blocks[2:]))
    assert not w2.whole and c.writing(0) == 2  # another write was in flight: no whole write
    assert c.write_done(0, None) == []  # one still on its way
    assert c.write_done(0, None) == [Verify(0)]
    assert c.piece_checked(0, True) == [Verified(0, complete=False)]


def test_a_failed_batch_while_another_is_in_flight_refetches_the_whole_piece():
    c = core(write_batch=2 * BLOCK_SIZE)
    blocks = c.picker.pick("a", None, 4, now=0.0)
    writes(feed(c, "a", blocks[:2]))
    writes(feed(c, "a", blocks[2:]))
    assert c.write_failed(0, now=0.0)[-1] == Refill()
    assert c.write_done(0, None) == []  # the other batch landed, but the piece is wanted again
    again = c.picker.pick("a", None, 4, now=1.0)
    assert len(again) == 4
    ws = writes(feed(c, "a", again))
    assert len(ws) == 2 and not any(w.whole for w in ws)
    assert c.write_done(0, None) == []
    assert c.write_done(0, None) == [Verify(0)]


def test_a_read_back_that_fails_releases_the_piece():
    c = core(write_batch=2 * BLOCK_SIZE)
    blocks = c.picker.pick("a", None, 4, now=0.0)
    writes(feed(c, "a", blocks))
    c.write_done(0, None)
    assert c.write_done(0, None) == [Verify(0)]
    assert c.piece_lost(0, now=5.0) == [PauseRequests(6.0, 1.0), Refill()]
    assert len(c.picker.pick("b", None, 4, now=6.0)) == 4


def test_memory_pressure_writes_early_and_a_disk_error_drops_what_waits():
    c = core(write_buffer=3 * BLOCK_SIZE)
    p0 = c.picker.pick("a", None, 4, now=0.0)
    p1 = c.picker.pick("b", None, 4, now=0.0)
    assert feed(c, "a", p0[:2]) == []
    assert writes(feed(c, "b", p1[:1])) == [Write(1, ((0, data(1, 0)),), whole=False)]  # 3 blocks wait: write
    assert c.pending_bytes == 2 * BLOCK_SIZE
    assert c.piece_lost(0, now=0.0)[-1] == Refill()  # piece 0's two buffered blocks go with it
    assert c.pending_bytes == 0 and c.buffered(0) == 0


def test_a_short_last_piece_and_bad_blocks():
    c = core()
    blocks = c.picker.pick("a", None, 100, now=0.0)
    last = [b for b in blocks if b.index == 2]
    assert [b.length for b in last] == [BLOCK_SIZE, 3616]
    (w,) = writes(feed(c, "a", last))
    assert w.whole
    with pytest.raises(ValueError):
        c.block_received("a", 2, BLOCK_SIZE, bytes(BLOCK_SIZE))  # the short block, too long
    with pytest.raises(ValueError):
        c.block_received("a", 3, 0, bytes(BLOCK_SIZE))  # no such piece
    with pytest.raises(ValueError):
        c.block_received("a", 0, 100, bytes(BLOCK_SIZE))  # not a block boundary
    with pytest.raises(ValueError):
        TorrentCore(c.picker, write_batch=0)


def test_the_picker_stays_consistent_through_a_hostile_sequence():
    c = core(write_batch=2 * BLOCK_SIZE)
    rng = random.Random(3)
    now = 0.0
    for _ in range(400):
        now += 1.0
        peer = rng.choice("abc")
        step = rng.random()
        if step < 0.4:
            c.picker.pick(peer, None, rng.randint(1, 6), now)
        elif step < 0.7:
            index = rng.randrange(3)
            begin = rng.randrange(c.picker.blocks_in_piece(index)) * BLOCK_SIZE
            for a in c.block_received(peer, index, begin, data(index, begin, c.picker.block_length(index, begin))):
                if type(a) is Write:
                    result = rng.choice((True, False, None, "disk"))
                    if result == "disk":
                        c.write_failed(a.index, now)
                    else:
                        c.write_done(a.index, result if a.whole else None)
        elif step < 0.8:
            c.peer_gone(peer)
            c.picker.peer_have_all(peer)
        else:
            c.expired(now, 5.0)
        c.picker._check()
