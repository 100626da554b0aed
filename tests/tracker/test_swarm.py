"""The swarm table: membership, random peer choice, expiry, bounds and snapshots."""

import random

import pytest

from shoal.daemons.tracker.swarm import SwarmTable, TableFull, _window
from shoal.protocol.tracker import Announce, Event

IH = b"\x11" * 20
IH2 = b"\x22" * 20


def pid(n: int) -> bytes:
    return b"-XX0000-" + n.to_bytes(12, "big")


def ann(n: int, *, left: int = 100, event: Event = Event.NONE, ih: bytes = IH, port: int | None = None) -> Announce:
    return Announce(info_hash=ih, peer_id=pid(n), port=port or 6000 + n, uploaded=0, downloaded=0,
                    left=left, event=event)


def table(**kw) -> SwarmTable:
    limits = dict(max_torrents=100, max_peers_per_torrent=1000, max_peers=10_000)
    limits.update(kw)
    return SwarmTable(**limits)


def test_requester_is_left_out_and_numwant_bounds_the_reply():
    t = table()
    for n in range(60):
        t.announce(ann(n, event=Event.STARTED), "10.0.0.1", 0, now=0.0)
    res = t.announce(ann(7), "10.0.0.1", 50, now=1.0)
    assert len(res.peers) == 50
    assert pid(7) not in {p.peer_id for p in res.peers}
    assert len({p.peer_id for p in res.peers}) == 50
    assert (res.complete, res.incomplete) == (0, 60)


def test_choice_is_random_not_always_the_same_peers():
    t = table()
    for n in range(200):
        t.announce(ann(n), "10.0.0.1", 0, now=0.0)
    seen = set()
    for _ in range(20):
        seen |= {p.peer_id for p in t.announce(ann(0), "10.0.0.1", 10, now=0.0).peers}
    # 20 draws of 10 from 199: a fixed choice would give 10 distinct peers.
    assert len(seen) > 60


def test_a_leechers_window_over_leeches_and_seeds_is_the_window_of_both_end_to_end():
    """The reply is a run of the leeches then the seeds, wrapping, without joining the lists per announce."""
    for trial in range(400):
        rng = random.Random(trial)
        a, b = list(range(rng.randrange(0, 30))), list(range(100, 100 + rng.randrange(0, 30)))
        pool = a + b
        exclude = rng.choice(pool) if pool and rng.random() < 0.7 else None
        numwant = rng.randrange(0, 40)
        random.seed(trial)
        got = _window((a, b), numwant, exclude)  # type: ignore[arg-type]
        random.seed(trial)  # the joined list's window, from the same start
        k, n = numwant + (exclude is not None), len(pool)
        if numwant == 0 or n == 0:
            want = []
        elif k >= n:
            want = pool[:]
        else:
            start = random.randrange(n)
            want = (pool + pool)[start:start + k]
        want = [p for p in want if p != exclude][:numwant]
        assert got == want, (trial, a, b, exclude, numwant)


def test_seeder_gets_leechers_first_then_other_seeders():
    t = table()
    for n in range(5):
        t.announce(ann(n, left=0), "10.0.0.1", 0, now=0.0)
    for n in range(5, 8):
        t.announce(ann(n), "10.0.0.1", 0, now=0.0)
    res = t.announce(ann(0, left=0), "10.0.0.1", 50, now=0.0)
    ids = [p.peer_id for p in res.peers]
    # Every leecher, before any seeder; then the other seeders, never itself.
    assert set(ids[:3]) == {pid(5), pid(6), pid(7)}
    assert set(ids[3:]) == {pid(1), pid(2), pid(3), pid(4)}
    assert (res.complete, res.incomplete) == (5, 3)
    # With room for fewer than the leechers, only leechers.
    few = t.announce(ann(1, left=0), "10.0.0.1", 2, now=0.0)
    assert len(few.peers) == 2 and {p.peer_id for p in few.peers} <= {pid(5), pid(6), pid(7)}


def test_left_0_started_with_nothing_yet_still_gets_the_seeders():
    """aria2 fetching a magnet's metadata announces started with left=0: the
    swarm holds only seeders, and it must be handed them, or it never finds
    a peer to fetch the metadata from."""
    t = table()
    for n in range(3):
        assert t.announce(ann(n, left=0, event=Event.STARTED), "10.0.0.1", 50, now=0.0) is not None
    magnet = t.announce(ann(9, left=0, event=Event.STARTED), "10.0.0.9", 50, now=1.0)
    assert {p.peer_id for p in magnet.peers} == {pid(0), pid(1), pid(2)}
    # Nor is any seeder sent back empty-handed while another peer exists.
    for n in (0, 1, 2, 9):
        reply = t.announce(ann(n, left=0), "10.0.0.9" if n == 9 else "10.0.0.1", 50, now=2.0)
        assert len(reply.peers) == 3 and pid(n) not in {p.peer_id for p in reply.peers}
    # A lone seeder gets nobody: there is nobody else.
    alone = table()
    assert alone.announce(ann(1, left=0), "10.0.0.1", 50, now=0.0).peers == []


def test_completed_turns_leecher_into_seeder_and_counts_download():
    t = table()
    t.announce(ann(1, event=Event.STARTED), "10.0.0.1", 0, now=0.0)
    t.announce(ann(1, left=0, event=Event.COMPLETED), "10.0.0.1", 0, now=1.0)
    assert t.scrape(IH) == (1, 1, 0)
    assert t.stats() == (1, 1, 0)


def test_stopped_removes_peer_and_empty_swarm():
    t = table()
    t.announce(ann(1), "10.0.0.1", 0, now=0.0)
    t.announce(ann(2), "10.0.0.1", 0, now=0.0)
    t.announce(ann(1, event=Event.STOPPED), "10.0.0.1", 0, now=1.0)
    assert t.scrape(IH) == (0, 0, 1)
    t.announce(ann(2, event=Event.STOPPED), "10.0.0.1", 0, now=1.0)
    assert IH not in t.swarms and t.peer_count == 0
    # A stopped announce for an unknown torrent creates nothing.
    t.announce(ann(3, event=Event.STOPPED, ih=IH2), "10.0.0.1", 0, now=1.0)
    assert t.swarms == {}


def test_peer_that_moves_address_is_replaced_not_duplicated():
    t = table()
    t.announce(ann(1), "10.0.0.1", 0, now=0.0)
    t.announce(ann(1, port=7777), "10.0.0.9", 0, now=1.0)
    (entry,) = t.swarms[IH].order
    assert (entry.ip, entry.port) == ("10.0.0.9", 7777)
    assert t.peer_count == 1


def test_client_restarted_with_new_peer_id_on_same_address_replaces_its_entry():
    # Most clients make a new peer_id per run; the old entry's ip:port is the
    # same listening socket, so it is the same client.
    t = table()
    t.announce(ann(1, event=Event.STARTED, port=6881), "10.0.0.1", 0, now=0.0)
    t.announce(ann(2, event=Event.STARTED, port=7000), "10.0.0.2", 0, now=0.0)
    restarted = t.announce(ann(3, event=Event.STARTED, port=6881), "10.0.0.1", 50, now=10.0)
    # It is not handed its own address, only the other peer.
    assert [(p.ip, p.port) for p in restarted.peers] == [("10.0.0.2", 7000)]
    assert (restarted.complete, restarted.incomplete) == (0, 2)
    assert set(t.swarms[IH].peers) == {pid(2), pid(3)} and t.peer_count == 2
    # Others see the address once, under its new peer_id.
    other = t.announce(ann(2, port=7000), "10.0.0.2", 50, now=11.0)
    assert [(p.ip, p.port, p.peer_id) for p in other.peers] == [("10.0.0.1", 6881, pid(3))]
    # The replaced peer_id is gone for good: its stopped announce removes nothing.
    t.announce(ann(1, event=Event.STOPPED, port=6881), "10.0.0.1", 0, now=12.0)
    assert set(t.swarms[IH].peers) == {pid(2), pid(3)}


def test_same_ip_other_port_is_another_client():
    # Behind a NAT, clients share the IP and differ by port.
    t = table()
    t.announce(ann(1, port=6881), "10.0.0.1", 0, now=0.0)
    t.announce(ann(2, port=6882), "10.0.0.1", 0, now=0.0)
    res = t.announce(ann(3, port=6883), "10.0.0.1", 50, now=0.0)
    assert sorted(p.port for p in res.peers) == [6881, 6882]
    assert t.peer_count == 3


def test_peer_moving_onto_an_address_held_by_another_peer_id_replaces_both():
    t = table()
    t.announce(ann(1, port=6881), "10.0.0.1", 0, now=0.0)
    t.announce(ann(2, port=7000), "10.0.0.2", 0, now=0.0)
    t.announce(ann(1, port=7000), "10.0.0.2", 0, now=1.0)  # 1 moved to where 2 was
    (entry,) = t.swarms[IH].order
    assert (entry.peer_id, entry.ip, entry.port) == (pid(1), "10.0.0.2", 7000)
    assert t.peer_count == 1
    # The replacement frees its slot: a full swarm takes a restarted client.
    full = table(max_peers_per_torrent=1)
    full.announce(ann(1, port=6881), "10.0.0.1", 0, now=0.0)
    full.announce(ann(9, port=6881), "10.0.0.1", 0, now=1.0)
    assert set(full.swarms[IH].peers) == {pid(9)}


def test_expiry_drops_only_silent_peers():
    t = table()
    t.announce(ann(1), "10.0.0.1", 0, now=0.0)
    t.announce(ann(2), "10.0.0.1", 0, now=50.0)
    assert t.expire(now=100.0, timeout=60.0) == 1
    assert set(t.swarms[IH].peers) == {pid(2)}
    assert t.expire(now=200.0, timeout=60.0) == 1
    assert t.swarms == {} and t.peer_count == 0


@pytest.mark.parametrize(
    "limits, reason",
    [
        (dict(max_torrents=1), "torrent_limit"),
        (dict(max_peers_per_torrent=1), "peer_limit"),
        (dict(max_peers=1), "peer_limit"),
    ],
)
def test_bounds_refuse_new_entries_but_serve_existing(limits, reason):
    t = table(**limits)
    t.announce(ann(1), "10.0.0.1", 0, now=0.0)
    other = ann(2, ih=IH2) if reason == "torrent_limit" else ann(2)
    with pytest.raises(TableFull) as exc:
        t.announce(other, "10.0.0.1", 0, now=0.0)
    assert exc.value.reason == reason
    # The refused peer left no trace, and the existing one is still served.
    assert t.peer_count == 1 and len(t.swarms) == 1
    assert t.announce(ann(1), "10.0.0.1", 5, now=1.0).incomplete == 1


def test_snapshot_round_trip_keeps_ages_and_drops_expired():
    t = table()
    t.announce(ann(1, left=0, event=Event.COMPLETED), "10.0.0.1", 0, now=100.0)
    t.announce(ann(2), "2001:db8::5", 0, now=130.0)
    t.announce(ann(3, ih=IH2), "10.0.0.3", 0, now=10.0)
    blob = t.snapshot(now=140.0)

    # Restored in a new process whose clock reads 5.0; peer_timeout 100 s.
    t2 = table()
    assert t2.restore(blob, now=5.0, timeout=100.0) == 2
    assert t2.scrape(IH) == (1, 1, 1)
    assert IH2 not in t2.swarms  # 130 s old: expired
    ages = {p.peer_id: 5.0 - p.last_seen for p in t2.swarms[IH].order}
    assert ages == {pid(1): pytest.approx(40.0), pid(2): pytest.approx(10.0)}
    v6 = t2.swarms[IH].peers[pid(2)]
    assert v6.v6 and len(v6.peer.compact) == 18


@pytest.mark.parametrize("blob", [b"", b"\x93\x01", b"garbage", b"\x92\x02\x90"])
def test_restore_refuses_garbage(blob):
    with pytest.raises(ValueError):
        table().restore(blob, now=0.0, timeout=10.0)
