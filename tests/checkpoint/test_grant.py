"""The Timeout rule: no rank is ever more than one checkpoint ahead of another."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shoal.core.checkpoint.grant import BLOCKING, ENHANCED, GrantRule


def test_grant_hold_release_with_a_fake_clock():
    g = GrantRule(3)
    assert g.request(0, 1, now=0.0) is True  # global 0, asking 1: within one
    assert g.done(0, 1, now=1.0) == []
    assert g.numbers() == [1, 0, 0]
    assert g.request(0, 2, now=2.0) is False  # 2 would be two ahead of rank 1 and 2: held
    assert g.is_held(0)
    assert g.request(1, 1, now=3.0) is True
    assert g.done(1, 1, now=4.0) == []  # rank 2 still at 0
    assert g.request(2, 1, now=5.0) is True
    assert g.done(2, 1, now=7.5) == [0]  # global number is 1 now: rank 0's request released
    assert g.is_taking(0) and not g.is_held(0)
    assert list(g.held_seconds) == [5.5]
    assert (g.granted_total, g.held_total) == (4, 1)
    assert g.global_number == 1


def test_misuse_is_refused():
    g = GrantRule(2)
    with pytest.raises(ValueError):
        g.request(0, 2, now=0)  # must ask for completed + 1
    with pytest.raises(ValueError):
        g.request(5, 1, now=0)  # unknown rank
    assert g.request(0, 1, now=0)
    with pytest.raises(ValueError):
        g.request(0, 1, now=0)  # already pending
    with pytest.raises(ValueError):
        g.done(1, 1, now=0)  # never granted
    with pytest.raises(ValueError):
        GrantRule(0)
    with pytest.raises(ValueError):
        GrantRule(2, mode="other")


def test_abort_forgets_pending_work_but_keeps_the_completed_number():
    g = GrantRule(2)
    g.request(0, 1, now=0)
    g.done(0, 1, now=0)
    g.request(0, 2, now=0)
    assert g.is_held(0)
    g.abort(0)
    assert not g.is_held(0) and g.completed(0) == 1
    assert g.request(0, 2, now=1) is False  # may ask again, still held by rank 1


def test_blocking_round_waits_for_every_rank_and_an_empty_channel():
    g = GrantRule(3, mode=BLOCKING)
    assert g.request(0, 1, now=0, sent=2, received=0) is False
    assert g.request(1, 1, now=1, sent=1, received=1) is False
    # rank 2 asks last, but a message (3 sent, 2 received) is still in transit
    assert g.request(2, 1, now=2, sent=0, received=1) is False
    assert g.in_transit() == 1
    # the frozen rank 1 receives it and reports: the round is granted to everyone
    assert g.report(1, sent=1, received=2, now=3) == [0, 1, 2]
    assert g.numbers() == [1, 1, 1]
    for r in range(3):
        assert g.done(r, 1, now=4) == []
    assert g.global_number == 1
    assert (g.granted_total, g.held_total) == (3, 3)


def test_blocking_round_granted_by_the_last_request():
    g = GrantRule(2, mode=BLOCKING)
    assert g.request(0, 1, now=0) is False
    assert g.request(1, 1, now=0) is True
    assert g.is_taking(0) and g.is_taking(1)


def test_enhanced_report_is_a_no_op():
    g = GrantRule(2, mode=ENHANCED)
    assert g.report(0, 5, 5, now=0) == []


class TimeoutRule(RuleBasedStateMachine):
    """Random requests, completions, failures and clock steps for 1..5 ranks."""

    def __init__(self):
        super().__init__()
        self.g = None
        self.now = 0.0

    @precondition(lambda self: self.g is None)
    @rule(ranks=st.integers(1, 5))
    def start(self, ranks):
        self.g = GrantRule(ranks)

    @precondition(lambda self: self.g is not None)
    @rule(data=st.data())
    def request(self, data):
        idle = [r for r in range(self.g.ranks) if not self.g.is_held(r) and not self.g.is_taking(r)]
        if not idle:
            return
        r = data.draw(st.sampled_from(idle))
        granted = self.g.request(r, self.g.completed(r) + 1, self.now)
        assert granted == self.g.is_taking(r)
        # granted exactly when the rank is not already ahead of the global number
        assert granted == (self.g.completed(r) == self.g.global_number)

    @precondition(lambda self: self.g is not None)
    @rule(data=st.data())
    def done(self, data):
        taking = [r for r in range(self.g.ranks) if self.g.is_taking(r)]
        if not taking:
            return
        r = data.draw(st.sampled_from(taking))
        held_before = {x for x in range(self.g.ranks) if self.g.is_held(x)}
        released = self.g.done(r, self.g.completed(r) + 1, self.now)
        assert set(released) <= held_before
        for x in released:
            assert self.g.is_taking(x)
        # nothing that could go is left held
        for x in range(self.g.ranks):
            if self.g.is_held(x):
                assert self.g.completed(x) > self.g.global_number

    @precondition(lambda self: self.g is not None)
    @rule(data=st.data())
    def fail(self, data):
        self.g.abort(data.draw(st.integers(0, self.g.ranks - 1)))

    @rule(dt=st.floats(0, 10))
    def tick(self, dt):
        self.now += dt

    @invariant()
    def within_one(self):
        if self.g is None:
            return
        done = [self.g.completed(r) for r in range(self.g.ranks)]
        assert max(done) - min(done) <= 1
        nums = self.g.numbers()  # counting checkpoints in progress
        assert max(nums) - min(nums) <= 1
        assert all(s >= 0 for s in self.g.held_seconds)


TestTimeoutRule = TimeoutRule.TestCase
TestTimeoutRule.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class BlockingRounds(RuleBasedStateMachine):
    """Plank's blocking mode with a real channel of messages between 3 ranks: a round
    is granted only when every rank has frozen and the channel is empty."""

    N = 3

    def __init__(self):
        super().__init__()
        self.g = GrantRule(self.N, mode=BLOCKING)
        self.channel: list[int] = []  # destination of every message in transit
        self.sent = [0] * self.N
        self.received = [0] * self.N
        self.frozen = [False] * self.N

    def _granted(self, ranks):
        if ranks:
            assert not self.channel, "granted with a message in transit"
            assert sorted(ranks) == list(range(self.N))
            assert len(set(self.g.numbers())) == 1
            self.frozen = [False] * self.N  # granted ranks take the checkpoint

    @rule(src=st.integers(0, N - 1), dst=st.integers(0, N - 1))
    def send(self, src, dst):
        if self.frozen[src] or self.g.is_taking(src) or src == dst:
            return  # a frozen rank sends nothing
        self.sent[src] += 1
        self.channel.append(dst)

    @rule(data=st.data())
    def deliver(self, data):
        if not self.channel:
            return
        dst = self.channel.pop(data.draw(st.integers(0, len(self.channel) - 1)))
        self.received[dst] += 1
        if self.frozen[dst]:
            self._granted(self.g.report(dst, self.sent[dst], self.received[dst], now=0))

    @rule(r=st.integers(0, N - 1))
    def request(self, r):
        if self.frozen[r] or self.g.is_taking(r):
            return
        self.frozen[r] = True
        granted = self.g.request(r, self.g.completed(r) + 1, 0, self.sent[r], self.received[r])
        if granted:
            self._granted(list(range(self.N)))

    @rule(r=st.integers(0, N - 1))
    def done(self, r):
        if self.g.is_taking(r):
            assert self.g.done(r, self.g.completed(r) + 1, now=0) == []

    @invariant()
    def rounds_stay_together(self):
        if all(self.frozen):  # every total is current: the rule sees the real channel
            assert self.g.in_transit() == len(self.channel)
        done = [self.g.completed(r) for r in range(self.N)]
        assert max(done) - min(done) <= 1


TestBlockingRounds = BlockingRounds.TestCase
TestBlockingRounds.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
