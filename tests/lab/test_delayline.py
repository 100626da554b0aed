"""The delay line's holding logic, with a fake clock (the kernel side is in test_net.py)."""

from __future__ import annotations

from shoal.lab.delayline import DelayLine


def line(**queues) -> DelayLine:
    return DelayLine({"seed": 1, "queues": {k[1:]: v for k, v in queues.items()}})


def test_each_packet_leaves_after_its_queues_delay_and_a_batch_names_the_last_due():
    d = line(q1={"delay": 0.010, "jitter": 0.0, "loss": 0.0}, q2={"delay": 0.050, "jitter": 0.0, "loss": 0.0})
    for i, t in enumerate([0.000, 0.001, 0.002]):
        assert d.arrive(1, 10 + i, t)
        assert d.arrive(2, 20 + i, t)
    assert d.due(0.0095) == []
    assert d.next_due() == 0.010
    assert d.due(0.0115) == [(1, 11)]  # packets 10 and 11, in one batch verdict
    assert d.due(0.0125) == [(1, 12)]
    assert d.due(0.0515) == [(2, 21)]
    assert d.due(1.0) == [(2, 22)]
    assert d.next_due() is None


def test_jitter_varies_the_delay_but_never_reorders_a_queue():
    d = line(q0={"delay": 0.020, "jitter": 0.010, "loss": 0.0})
    arrivals = [i * 0.0005 for i in range(2000)]
    for i, t in enumerate(arrivals):
        d.arrive(0, i, t)
    releases = [r for r, _ in d.queues[0].held]
    assert releases == sorted(releases)
    delays = [r - t for r, t in zip(releases, arrivals, strict=True)]
    assert min(delays) >= 0.010 - 1e-9
    assert max(delays) > 0.029  # the spread is really used
    # packets never overtake, so under dense traffic the mean rises above the
    # delay, but never past delay + jitter
    assert 0.020 < sum(delays) / len(delays) <= 0.030


def test_loss_drops_about_its_share_on_arrival():
    d = line(q0={"delay": 0.0, "jitter": 0.0, "loss": 0.2})
    kept = sum(d.arrive(0, i, 0.0) for i in range(20000))
    assert 0.78 < kept / 20000 < 0.82
    assert d.queues[0].dropped == 20000 - kept


def test_a_reload_changes_the_delay_of_later_packets_only():
    d = line(q0={"delay": 0.100, "jitter": 0.0, "loss": 0.0})
    d.arrive(0, 1, 0.0)
    d.configure({"queues": {"0": {"delay": 0.001, "jitter": 0.0, "loss": 0.0}}})
    d.arrive(0, 2, 0.0)
    # packet 2 may not overtake packet 1: it leaves with it
    assert d.due(0.050) == []
    assert d.due(0.100) == [(0, 2)]


def test_packets_of_an_unknown_queue_pass():
    assert line().arrive(9, 1, 0.0)
