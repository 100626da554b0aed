"""The choker: the seeds' tit-for-tat rules on a fake clock (plain floats), seeded rng."""

import random

import pytest

from shoal.core.swarm.choker import Choker


def choker(seed=0, **kw) -> Choker:
    return Choker(rng=random.Random(seed), **kw)


def join(c: Choker, peers, now=0.0, interested=True):
    for p in peers:
        c.add_peer(p, now)
        c.set_interested(p, interested)


def feed(c: Choker, rates: dict, t0: float, t1: float, upload=False):
    """Each peer sends (or is sent) rates[p] bytes every second in [t0, t1).

    Every interested peer also keeps requesting from us, as a real one does:
    slots go only to peers that use them (see the request_grace tests).
    """
    record = c.record_upload if upload else c.record_download
    t = t0
    while t < t1:
        for p, r in rates.items():
            record(p, r, t)
            c.record_request(p, t)
        t += 1.0


def test_the_four_fastest_get_the_regular_slots_plus_one_optimistic():
    c = choker()
    peers = list(range(8))
    join(c, peers)
    rates = {p: (p + 1) * 10_000 for p in peers}  # peer 7 fastest
    feed(c, rates, 0, 10)
    d = c.tick(10.0)
    assert d.recomputed and c.rounds == 1
    assert d.unchoke - {d.optimistic} == {4, 5, 6, 7}
    assert d.optimistic in {0, 1, 2, 3}
    assert len(d.unchoke) == 5
    assert d.unchoke | d.choke == set(peers) and not d.unchoke & d.choke


def test_a_peer_that_becomes_fastest_waits_for_the_next_10s_boundary():
    c = choker()
    peers = list(range(8))
    join(c, peers)
    rates = {p: (p + 1) * 10_000 for p in peers}
    feed(c, rates, 0, 10)
    first = c.tick(10.0)
    climber = min(p for p in range(4) if p != first.optimistic)
    assert climber not in first.unchoke
    rates[climber] = 2_000_000  # suddenly the best uploader to us
    for t in range(10, 20):
        feed(c, rates, t, t + 1)
        d = c.tick(t + 0.5)
        assert d.unchoke == first.unchoke and not d.recomputed  # no churn between rounds
    assert c.download_rate(climber, 19.5) > c.download_rate(7, 19.5)
    feed(c, rates, 20, 21)
    d = c.tick(20.0)
    assert d.recomputed and c.rounds == 2
    assert climber in d.unchoke and climber != d.optimistic
    assert d.unchoke - {d.optimistic} == {climber, 5, 6, 7}  # the slowest of the old four lost out


def test_optimistic_unchoke_rotates_every_30s_and_only_then():
    c = choker(seed=3)
    fast, slow = list(range(4)), list(range(4, 14))
    join(c, fast + slow)
    history = []
    for t in range(0, 901):
        feed(c, {p: 1_000_000 for p in fast} | {p: 100 for p in slow}, t, t + 1)
        d = c.tick(float(t))
        assert d.unchoke - {d.optimistic} == set(fast) or t == 0
        assert d.optimistic in slow and len(d.unchoke) == 5
        history.append(d.optimistic)
    changes = [t for t in range(1, 901) if history[t] != history[t - 1]]
    assert changes and all(t % 30 == 0 for t in changes)
    assert len(changes) == 30  # a new one every time (never the previous holder twice)
    assert len(set(history)) >= 6  # many different peers get the chance
    assert c.rounds == 91 and c.optimistic_rounds == 31


@pytest.mark.parametrize("weight, lo, hi", [(3.0, 2.0, 4.5), (1.0, 0.6, 1.6)])
def test_newcomers_get_the_optimistic_slot_more_often(weight, lo, hi):
    """3 newcomers (< 60 s) vs 3 old peers competing for the optimistic slot, 600 trials."""
    rng = random.Random(2024)
    new = old = 0
    for _ in range(600):
        c = Choker(rng=rng, newcomer_weight=weight)
        fast, olds, news = ["f1", "f2", "f3", "f4"], ["o1", "o2", "o3"], ["n1", "n2", "n3"]
        join(c, fast + olds, now=0.0)
        join(c, news, now=990.0)
        feed(c, {p: 1_000_000 for p in fast}, 995, 1000)
        d = c.tick(1000.0)
        assert d.unchoke - {d.optimistic} == set(fast)
        if d.optimistic in news:
            new += 1
        else:
            old += 1
    # expected ratio: 3 x weight / 3 (weight 3: 3.0; weight 1: 1.0)
    assert lo < new / old < hi, (new, old)


def test_seeding_ranks_by_our_upload_rate():
    c = choker()
    peers = list(range(6))
    join(c, peers)
    c.set_seeding(True)
    feed(c, {p: (6 - p) * 10_000 for p in peers}, 0, 10, upload=True)  # peer 0 takes data fastest
    feed(c, {5: 10_000_000}, 0, 10)  # downloads do not matter while seeding
    d = c.tick(10.0)
    assert d.unchoke - {d.optimistic} == {0, 1, 2, 3}
    assert d.optimistic in {4, 5}


def test_seeding_round_robin_rotates_through_all_interested_peers():
    c = choker(seeding_policy="round_robin", optimistic_slots=0)
    peers = list(range(10))
    join(c, peers)
    c.set_seeding(True)
    served = {p: 0 for p in peers}
    seen_by_round = []
    for k in range(5):
        d = c.tick(10.0 * k)
        assert len(d.unchoke) == 4
        seen_by_round.append(d.unchoke)
        for p in d.unchoke:
            served[p] += 1
    assert set().union(*seen_by_round[:3]) == set(peers)  # everyone within 3 rounds
    assert set(served.values()) == {2}  # 20 slot-rounds, 10 peers: 2 each


def test_round_robin_with_the_optimistic_slot_still_reaches_everyone():
    c = choker(seeding_policy="round_robin")
    peers = list(range(12))
    join(c, peers)
    c.set_seeding(True)
    regular = set()
    for k in range(4):
        d = c.tick(10.0 * k)
        regular |= d.unchoke - {d.optimistic}
    assert regular == set(peers)


def test_anti_snubbing_takes_a_regular_slot_away():
    # A long rate window keeps A's rate the highest throughout; no optimistic
    # slot, so that only the regular slots are in play.
    c = choker(rate_window=120.0, optimistic_slots=0)
    join(c, "ABCDE")
    feed(c, {"A": 1_000_000}, 0, 5)  # A gives a lot, then nothing from t=5
    trickle = {"B": 400, "C": 300, "D": 200, "E": 100}
    feed(c, trickle, 0, 10)
    d = c.tick(10.0)
    assert d.unchoke == {"A", "B", "C", "D"}
    for t in range(10, 70):
        feed(c, trickle, t, t + 1)
        c.tick(float(t) + 0.5)
    assert c.download_rate("A", 70.0) > 10 * c.download_rate("B", 70.0)
    assert c.is_snubbed("A", 70.0) and not c.is_snubbed("B", 70.0)
    d = c.tick(70.0)
    assert d.recomputed and "A" not in d.unchoke and "A" in d.choke
    assert d.unchoke == {"B", "C", "D", "E"}  # the slot goes to the next best
    c.record_download("A", 16384, 75.0)  # a block again: no longer snubbed
    assert not c.is_snubbed("A", 75.0)
    assert "A" in c.tick(80.0).unchoke


def test_a_snubbed_peer_can_still_get_the_optimistic_slot():
    c = choker()
    join(c, ["S"])
    d = c.tick(100.0)  # S joined at 0 and never sent anything: snubbed
    assert c.is_snubbed("S", 100.0)
    assert d.optimistic == "S" and d.unchoke == {"S"}


def test_only_peers_we_want_data_from_can_snub_us():
    c = choker()
    join(c, ["X"])
    c.set_we_interested("X", False, 0.0)
    assert not c.is_snubbed("X", 500.0)
    c.set_we_interested("X", True, 500.0)  # the snub clock starts now
    assert not c.is_snubbed("X", 550.0) and c.is_snubbed("X", 560.0)
    c.set_seeding(True)
    assert not c.is_snubbed("X", 1000.0)  # no snubbing while seeding


def test_uninterested_peers_are_choked_and_their_slots_go_to_others():
    c = choker(optimistic_slots=0)
    join(c, range(6))
    c.set_interested(5, False)
    feed(c, {p: (p + 1) * 1000 for p in range(6)}, 0, 10)  # 5 is the fastest but wants nothing
    d = c.tick(10.0)
    assert d.unchoke == {1, 2, 3, 4} and 5 in d.choke
    c.set_interested(4, False)  # a holder loses interest between rounds
    d = c.tick(11.0)
    assert d.unchoke == {0, 1, 2, 3} and not d.recomputed  # the free slot is refilled at once


def test_a_departed_peer_frees_its_slot_without_a_full_round():
    c = choker()
    join(c, range(8))
    feed(c, {p: (p + 1) * 1000 for p in range(8)}, 0, 10)
    d = c.tick(10.0)
    regular = d.unchoke - {d.optimistic}
    c.remove_peer(7)
    d2 = c.tick(12.0)
    assert 7 not in d2.unchoke | d2.choke
    assert len(d2.unchoke - {d2.optimistic}) == 4 and regular - {7} <= d2.unchoke
    assert d2.optimistic == d.optimistic


def test_boundaries_stay_on_the_grid_when_ticks_are_late():
    c = choker()
    join(c, range(3))
    c.tick(0.0)
    assert not c.tick(9.9).recomputed
    assert c.tick(10.7).recomputed
    assert not c.tick(19.9).recomputed
    assert c.tick(20.0).recomputed
    assert c.tick(55.0).recomputed  # a long gap: one round, next boundary 60
    assert not c.tick(59.0).recomputed
    assert c.tick(60.0).recomputed
    assert c.rounds == 5


def test_every_number_is_configurable():
    c = Choker(slots=2, interval=5.0, optimistic_interval=15.0, snub_after=10.0, rng=random.Random(1))
    join(c, range(6))
    feed(c, {p: (p + 1) * 1000 for p in range(6)}, 0, 5)
    d = c.tick(5.0)
    assert d.unchoke - {d.optimistic} == {4, 5} and len(d.unchoke) == 3
    opts = {c.tick(float(t)).optimistic for t in range(5, 200)}
    assert len(opts) >= 3
    with pytest.raises(ValueError):
        Choker(seeding_policy="fastest", rng=random.Random(0))
    with pytest.raises(ValueError):
        Choker(interval=0, rng=random.Random(0))


def test_no_peers_no_trouble():
    c = choker()
    d = c.tick(0.0)
    assert d.unchoke == set() and d.choke == set() and d.optimistic is None
    c.remove_peer("ghost")
    with pytest.raises(ValueError):
        c.add_peer("x", 0.0) or c.add_peer("x", 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_a_free_rider_loses_zero_rate_ties_to_peers_that_ever_gave(seed):
    """Rates in the window are all zero, but peers 0-3 sent data long ago and
    peer 9 never did: 9 gets no regular slot, whatever the dice say."""
    c = choker(seed, slots=4, optimistic_slots=0, rate_window=20.0, snub_after=1000.0)
    join(c, [9, 0, 1, 2, 3, 4, 5])
    feed(c, {0: 1000, 1: 1000, 2: 1000, 3: 1000}, 0, 1)
    d = c.tick(100.0)  # the window has long forgotten them
    assert d.unchoke == {0, 1, 2, 3}


def test_a_slot_holder_that_never_requests_loses_its_slot_after_request_grace():
    c = choker(request_grace=5.0, slots=2, optimistic_slots=0)
    join(c, ["idle", "user"])
    d = c.tick(0.0)
    assert d.unchoke == {"idle", "user"}
    c.record_request("user", 3.0)
    c.record_upload("user", 16384, 7.0)  # being served counts as using the slot too
    d = c.tick(5.0)
    assert d.unchoke == {"user"} and c.strikes("idle") == 1 and c.unused_slots == 1
    d = c.tick(11.9)
    # 4.9 s since the user's last block; the free slot goes back to the struck
    # peer (nobody else wants it), for another grace.
    assert d.unchoke == {"user", "idle"}
    d = c.tick(12.0)
    assert d.unchoke == {"idle"} and c.strikes("user") == 1  # the user went quiet too
    c.record_request("user", 12.5)  # it had nothing to ask for a while: forgiven once it asks
    assert c.strikes("user") == 0


def test_interest_without_requests_counts_for_nothing_a_crowd_rotates_through_the_slots():
    """50 peers that say Interested and never Request, and one real leecher:
    each crowd member holds a slot for request_grace once, and the leecher's
    turn comes within ceil(51 / 5) graces."""
    c = choker(seed=3, request_grace=1.0)
    crowd = [f"c{i}" for i in range(50)]
    join(c, crowd + ["leecher"])
    served_at = None
    for t in range(0, 12):
        d = c.tick(float(t))
        if "leecher" in d.unchoke:
            served_at = t
            break
    assert served_at is not None and served_at <= 11
    assert all(c.strikes(p) <= 1 for p in crowd)
    c.record_request("leecher", served_at + 0.5)
    for t in range(served_at + 1, served_at + 30):
        c.record_request("leecher", float(t))
        d = c.tick(float(t))
        assert "leecher" in d.unchoke  # it uses its slot: it keeps it
    # The crowd rotated again and again behind it, fewest strikes first.
    assert max(c.strikes(p) for p in crowd) - min(c.strikes(p) for p in crowd) <= 1
