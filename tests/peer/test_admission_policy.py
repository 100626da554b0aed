"""The admission and eviction policy on its own (core.swarm.admission): plain values, a fake clock."""

from shoal.core.swarm.admission import Candidate, admit, least_useful


def c(key, *, seed=False, theirs=False, ours=False, last=0.0):
    return Candidate(key, seed, theirs, ours, last)


def test_useful_peers_are_never_evicted():
    trading = [c("a", theirs=True, ours=True, last=99.0), c("b", theirs=True, last=95.0)]
    assert least_useful(trading, 100.0, seeding=False) is None
    assert admit(50, 50, 60, None) == "admit" and admit(60, 50, 60, None) == "refuse"
    assert admit(10, 50, 60, None) == "admit"


def test_seeds_go_first_when_seeding_then_the_uninterested_then_the_idle_longest_first():
    peers = [
        c("idle-old", theirs=True, last=10.0),
        c("idle-new", theirs=True, last=60.0),
        c("nobody-wants", last=90.0),
        c("seed", seed=True, ours=True, last=99.0),
    ]
    assert least_useful(peers, 100.0, seeding=True) == "seed"
    assert least_useful(peers, 100.0, seeding=False) == "nobody-wants"  # a seed we download from is useful
    assert least_useful(peers[:2], 100.0, seeding=False) == "idle-old"
    assert least_useful(peers[:2], 100.0, seeding=False, idle_after=50.0) == "idle-old"
    assert least_useful(peers[1:2], 100.0, seeding=False, idle_after=50.0) is None  # 40 s idle < 50
    assert admit(50, 50, 60, "seed") == "evict"
