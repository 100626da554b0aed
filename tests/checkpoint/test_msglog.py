"""Partial message logging: the seed's Figure 3 scenario ends in its Tables 3-9.

The seed labels messages globally (m0..m4); here each process numbers its own sent
messages, so the test keeps a map from (sender, seq) to the seed's label and prints
every table in the seed's layout: (ack status, message, peer[, message slot]).
The message slots are the seed's strings. Table 8 prints m1's slot as
"Mt*hjkvd#$82^#" where Table 4 has "Mt*hjkvd#$62^#": the same message (m1 is sent
once, before t2), so the 8 is a typo in the seed and the test uses Table 4's text.
"""

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.checkpoint.msglog import ACKED, ARCHIVED, SENT, MessageLog

P1, P2 = 1, 2
SLOT = {
    "m0": b"Mq34#$62^#",
    "m1": b"Mt*hjkvd#$62^#",
    "m2": b"Mtlw*(0kvd#$62^#",
    "m3": b"Mtl@sv!54ju)62^#",
    "m4": b"Mtlw(dju)62^#",
}


class Net:
    """Two processes and a label map; delivery is done by hand, step by step."""

    def __init__(self):
        self.log = {P1: MessageLog(P1), P2: MessageLog(P2)}
        self.label: dict[tuple[int, int], str] = {}

    def send(self, src: int, dst: int, name: str) -> int:
        seq = self.log[src].on_send(dst, SLOT[name])
        self.label[(src, seq)] = name
        return seq

    def deliver(self, src: int, dst: int, seq: int) -> bool:
        fresh = self.log[dst].on_receive(src, seq)
        self.log[src].on_ack(dst, seq)  # the receiver acks every copy, duplicates too
        return fresh

    def sent_table(self, p: int):
        return [(e.status, self.label[(p, e.seq)], f"p{e.dest}", e.payload) for e in self.log[p].sent]

    def receipt_table(self, p: int):
        return [(e.status, self.label[(e.src, e.seq)], f"p{e.src}") for e in self.log[p].receipts]


def test_figure_3_tables_4_to_9_and_the_recovery():
    n = Net()
    # before t1, in the interval before checkpoint c: P2 sends m0 to P1, acked
    n.deliver(P2, P1, n.send(P2, P1, "m0"))
    # t1: both take in-memory checkpoint c (almost concurrently)
    n.log[P1].on_checkpoint()
    n.log[P2].on_checkpoint()
    assert n.sent_table(P2) == [(2, "m0", "p1", SLOT["m0"])]  # Table 3

    # interval c..c+1: P1 sends m1 to P2, P2 sends m2 to P1, both delivered and acked
    n.deliver(P1, P2, n.send(P1, P2, "m1"))
    n.deliver(P2, P1, n.send(P2, P1, "m2"))
    # t2: P1 takes checkpoint c+1
    n.log[P1].on_checkpoint()
    p1_ckpt = n.log[P1].snapshot()
    assert n.sent_table(P1) == [(2, "m1", "p2", SLOT["m1"])]  # Table 4
    assert n.receipt_table(P1) == [(2, "m2", "p2")]  # Table 5

    # after t2: P1 sends m3 to P2 and receives m4 from P2
    m3 = n.send(P1, P2, "m3")
    n.deliver(P1, P2, m3)
    m4 = n.send(P2, P1, "m4")
    n.deliver(P2, P1, m4)
    # t3: P2 takes checkpoint c+1 (m0, archived since c, is purged now)
    n.log[P2].on_checkpoint()
    p2_ckpt = n.log[P2].snapshot()
    assert n.sent_table(P2) == [(2, "m2", "p1", SLOT["m2"]), (2, "m4", "p1", SLOT["m4"])]  # Table 6
    assert n.receipt_table(P2) == [(2, "m1", "p1"), (2, "m3", "p1")]  # Table 7

    # t4: P1's tables
    assert n.sent_table(P1) == [(2, "m1", "p2", SLOT["m1"]), (1, "m3", "p2", SLOT["m3"])]  # Table 8
    assert n.receipt_table(P1) == [(2, "m2", "p2"), (1, "m4", "p2")]  # Table 9

    # after t4 P1's processor fails. P2 rolls back to its checkpoint c+1, P1 is recovered
    # to its checkpoint c+1: the tables are again Tables 6/7 and Tables 4/5.
    rb2 = n.log[P2].after_rollback(p2_ckpt)
    rb1 = n.log[P1].after_rollback(p1_ckpt)
    assert n.sent_table(P2) == [(2, "m2", "p1", SLOT["m2"]), (2, "m4", "p1", SLOT["m4"])]
    assert n.receipt_table(P2) == [(2, "m1", "p1"), (2, "m3", "p1")]
    assert n.sent_table(P1) == [(2, "m1", "p2", SLOT["m1"])]
    assert n.receipt_table(P1) == [(2, "m2", "p2")]
    assert (rb1.discarded_sent, rb1.discarded_receipts) == (1, 1)  # m3 and m4 forgotten by P1
    assert (rb2.discarded_sent, rb2.discarded_receipts) == (0, 0)

    # P1 re-executes and sends m3 again, with the same sequence number (its counter
    # was checkpointed): P2 finds it in Table 7 and discards it, no orphan.
    assert n.send(P1, P2, "m3") == m3
    assert n.deliver(P1, P2, m3) is False
    assert n.log[P2].duplicates_dropped == 1
    # Lost messages: the rolled-back ranks resend their sent-table entries at 2.
    assert [n.label[(P2, e.seq)] for e in rb2.replay] == ["m2", "m4"]
    assert [n.label[(P1, e.seq)] for e in rb1.replay] == ["m1"]
    delivered = {name: n.deliver(P2, P1, e.seq) for e, name in ((e, n.label[(P2, e.seq)]) for e in rb2.replay)}
    assert delivered == {"m2": False, "m4": True}  # m2 already in Table 5; m4 replayed
    assert n.deliver(P1, P2, rb1.replay[0].seq) is False  # m1 already in Table 7
    assert n.receipt_table(P1) == [(2, "m2", "p2"), (1, "m4", "p2")]  # m4 is back, once
    assert n.receipt_table(P2) == [(2, "m1", "p1"), (2, "m3", "p1")]


def test_ack_transitions_and_in_transit_count():
    log = MessageLog(0)
    a = log.on_send(1, b"a")
    b = log.on_send(2, b"bb")
    assert (a, b) == (0, 1)
    assert log.in_transit() == 2 and log.payload_bytes == 3
    assert log.on_ack(2, a) is False  # wrong destination
    assert log.on_ack(1, 99) is False  # unknown seq
    assert log.on_ack(1, a) is True
    assert log.on_ack(1, a) is False  # ack again: stays at 1
    assert [e.status for e in log.sent] == [ACKED, SENT]
    log.on_checkpoint()
    assert [e.status for e in log.sent] == [ARCHIVED, SENT]  # an unacked entry stays at 0
    assert log.on_ack(2, b) is True
    log.on_checkpoint()
    assert [(e.status, e.seq) for e in log.sent] == [(ARCHIVED, b)]
    assert log.in_transit() == 0


def test_rollback_replays_messages_in_transit_at_the_checkpoint():
    """Beyond the seed: an entry still at 0 when the checkpoint is taken was in
    transit; the sender will not send it again, so it is replayed too."""
    log = MessageLog(0)
    log.on_send(1, b"acked")
    log.on_ack(1, 0)
    log.on_send(1, b"in flight")
    log.on_checkpoint()
    snap = log.snapshot()
    log.on_send(1, b"after")
    rb = log.after_rollback(snap)
    assert [(e.seq, e.payload) for e in rb.replay] == [(0, b"acked"), (1, b"in flight")]
    assert rb.discarded_sent == 1
    assert log.next_seq == 2


def test_snapshot_restore_round_trip_and_bad_snapshots():
    log = MessageLog(3)
    log.on_send(4, b"x")
    log.on_receive(5, 7)
    snap = log.snapshot()
    other = MessageLog.from_snapshot(snap)
    assert other.rank == 3 and other.sent == log.sent and other.receipts == log.receipts
    assert other.next_seq == 1
    with pytest.raises(ValueError, match="rank"):
        MessageLog(9).restore(snap)
    bad_snapshots = (
        b"",
        b"\xc1",
        msgpack.packb([2, 3, 0, [], []]),  # unknown version
        msgpack.packb([1, 3, 0, [[1]], []]),  # short sent entry
        msgpack.packb([1, 3, 0, [[1, 2, 3, 5]], []]),  # message slot not bytes
        msgpack.packb({"a": 1}),
        msgpack.packb([1, 3, 0, [], [[1, "x", 2]]]),
    )
    for bad in bad_snapshots:
        with pytest.raises(ValueError):
            MessageLog(3).restore(bad)
        with pytest.raises(ValueError):
            MessageLog.from_snapshot(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "ack", "recv", "ckpt"]), st.integers(0, 5)), max_size=40))
def test_the_log_only_holds_the_present_and_previous_interval(ops):
    """After any sequence of events, an entry at 2 reached status 1 in the previous
    interval, one at 1 in the present one; nothing older survives, nothing newer is lost."""
    log = MessageLog(0)
    interval = 0
    reached_1: dict[tuple[str, int], int] = {}  # interval in which the entry got status 1
    for op, x in ops:
        if op == "send":
            log.on_send(1, b"p")
        elif op == "ack":
            if log.on_ack(1, x):
                reached_1[("s", x)] = interval
        elif op == "recv":
            if log.on_receive(1, x):
                reached_1[("r", x)] = interval
        else:
            log.on_checkpoint()
            interval += 1
    for kind, entries in (("s", log.sent), ("r", log.receipts)):
        for e in entries:
            if e.status == ARCHIVED:
                assert reached_1[(kind, e.seq)] == interval - 1
            elif e.status == ACKED:
                assert reached_1[(kind, e.seq)] == interval
            else:
                assert kind == "s" and (kind, e.seq) not in reached_1
    # and every entry that reached 1 in the present or previous interval is still there
    alive = {("s", e.seq) for e in log.sent} | {("r", e.seq) for e in log.receipts}
    assert {k for k, i in reached_1.items() if i >= interval - 1} <= alive


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.builds(msgpack.packb, st.recursive(
    st.none() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=5), max_leaves=20))))
def test_restore_of_arbitrary_bytes_succeeds_or_raises_value_error(data):
    with contextlib.suppress(ValueError):
        MessageLog.from_snapshot(data)
