"""The dispatcher-worker contract (protocol/dispatch.py) and the unit life cycle's table."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.core.dispatch import lifecycle as lc
from shoal.protocol.contract import BadParams
from shoal.protocol.dispatch import (
    Lease,
    LeaseFacts,
    Pull,
    PullReply,
    Register,
    TaskResult,
    TaskSpec,
    UnitKey,
    decode_results,
)
from shoal.protocol.errors import RemoteProtocolError


def test_unit_keys_round_trip_and_bad_ones_are_bad_params():
    k = UnitKey.parse("12/t.3")
    assert (k.job, k.unit, str(k)) == (12, "t.3", "12/t.3")
    for bad in ("", "12", "/t", "x/t", "12/", 12, None, "1" * 200 + "/t", "٣/t"):
        with pytest.raises(BadParams):
            UnitKey.parse(bad)


def test_a_lease_round_trips_and_its_compact_facts_decode_in_one_place():
    spec = TaskSpec(name="t", command=["true"], builtin="", timeout=1.0, inputs=[], outputs=[["out", 10]])
    lease = Lease.make(UnitKey(3, "t"), 1, 2.0, [spec], LeaseFacts(1.0, 0.0, 0.0, 1.0, None, 5.0, 0))
    raw = lease.encode()
    assert raw["info"] == [1.0, 0.0, 0.0, 1.0, None, 5.0, 0]
    back = Lease.decode(raw)
    assert back == lease and back.unit_key == UnitKey(3, "t") and back.facts().submitted == 5.0
    for info in ([1, 2], [1, 0, 0, 1, None, "x", 0], [1, 0, 0, 1, None, 5.0, 0.5]):
        with pytest.raises(BadParams):
            Lease.decode({**raw, "info": info})
    with pytest.raises(BadParams):
        PullReply.decode({"units": [{**raw, "key": "nope"}], "rewards": []})


def test_task_results_travel_as_rows():
    r = TaskResult("t", 0, 1.0, 2.0, stdout=b"x" * 10, outputs=[["o", 1, "ab"]])
    [(key, [back])] = decode_results([["1/t", [r.to_row()]]], max_log_bytes=4)
    assert key == UnitKey(1, "t") and back.ok and back.stdout == b"xxxx" and back.outputs == [["o", 1, "ab"]]
    for bad in (None, [["1/t"]], [["1/t", [[1] * 8]]], [["1/t", [["t", True, 0, 0, "", b"", b"", []]]]]):
        with pytest.raises(BadParams):
            decode_results(bad, 10)


def test_rpc_params_are_checked():
    ok = {"worker": "w", "cpus": 1, "memory": 0, "cpu_speed": 1, "bandwidth": 1e9, "rtt": 0.0}
    assert Register.decode(ok).capacity()["cpus"] == 1.0
    for bad in ({**ok, "verdict": "sad"}, {**ok, "worker": ""}, {**ok, "worker": "a\nb"}, {**ok, "cpus": 0},
                {**ok, "typo": 1}):
        with pytest.raises(BadParams):
            Register.decode(bad)
    with pytest.raises(BadParams):
        Pull.decode({"worker": "w", "max": 1, "wait": 11.0})


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=8), lambda c: st.lists(c, max_size=9), max_leaves=40))
def test_decoding_reports_parses_or_raises_remote_protocol_error(raw):
    with contextlib.suppress(RemoteProtocolError):
        decode_results(raw, 100)


def test_the_life_cycle_table():
    s = lc.WAITING
    for event in (lc.RELEASE, lc.ASSIGN, lc.LEASE, lc.REQUEUE, lc.ASSIGN, lc.LEASE, lc.SUCCEED):
        s = lc.move(s, event)
    assert s == lc.DONE
    for state in lc.FINAL:
        for event in lc.EVENTS:
            with pytest.raises(lc.IllegalTransition):
                lc.move(state, event)
    with pytest.raises(lc.IllegalTransition):
        lc.move(lc.WAITING, lc.LEASE)
    assert {new for new in lc.TRANSITIONS.values()} <= set(lc.STATES)
    assert {lc.stored_state(s) for s in lc.STATES} == set(lc.STORED)
