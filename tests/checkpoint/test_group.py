"""The group's state machine (core/checkpoint/group.py), driven without I/O and with a fake clock."""

from __future__ import annotations

import pytest

from shoal.core.checkpoint.group import EVENTS, PHASES, TRANSITIONS, Group, GroupTable, Refusal
from shoal.protocol.contract import BadParams
from shoal.protocol.errors import LocalProtocolError


def joined(n: int = 3, m: int = 1) -> Group:
    g = Group("g", n, "enhanced", 4096, m)
    for i in range(n):
        g.admit(i, b"", bytes([i]) * 16, ("127.0.0.1", 1000 + i), -1, 0, now=0.0)
    return g


def test_the_table_names_only_known_phases_and_events():
    for (phase, event), new in TRANSITIONS.items():
        assert phase in PHASES and event in EVENTS and new in PHASES
    assert not any(phase in ("finished", "failed") for phase, _ in TRANSITIONS)  # final phases


def test_a_move_not_in_the_table_is_refused():
    g = joined()
    with pytest.raises(LocalProtocolError):
        g.move("all_finished")  # starting -> finished is no move
    assert g.phase == "starting"


def test_checkpoint_zero_then_a_failure_and_a_recovery():
    g = joined()
    for i in range(3):
        g.commit(i, 0, 100, [(0, b"\1" * 100)], now=1.0)
    assert g.phase == "running"
    assert g.lose(1, now=2.0) == "recovering" and g.epoch == 1
    # a survivor's stale call is refused by the epoch
    with pytest.raises(Refusal) as err:
        g.member(0, b"\0" * 16, 0, now=2.5)
    assert err.value.code == "stale_epoch"
    g.admit(1, b"", b"\7" * 16, ("127.0.0.1", 2000), -1, 0, now=3.0)
    assert g.ready(0, 0, [-1, -1, -1], now=3.0) is None
    assert g.ready(2, 0, [-1, -1, -1], now=3.5) is None
    assert g.ready(1, 0, [-1, -1, -1], now=4.5) == pytest.approx(2.5)  # R: detection to resume
    assert g.phase == "running" and list(g.R) == [pytest.approx(2.5)]


def test_more_losses_than_shards_fail_the_group_and_it_stays_failed():
    g = joined()
    g.lose(0, now=1.0)
    assert g.lose(2, now=1.0) == "failed"
    assert g.lose(1, now=1.0) is None
    with pytest.raises(LocalProtocolError):
        g.move("resume_running")


def test_a_rebuild_after_a_coordinator_restart():
    table = GroupTable(max_groups=4, max_ranks=8)
    g = table.open("g", 2, "enhanced", 4096, 1, have=3)
    assert g.phase == "rebuilding"
    assert g.admit(0, b"", b"\1" * 16, ("h", 1), 3, 5, now=0.0) == (False, False)
    assert g.admit(1, b"", b"\2" * 16, ("h", 2), 3, 5, now=0.0) == (False, True)  # everyone is back
    g.rebuilt()
    assert g.phase == "running" and g.epoch == 5 and g.rule.numbers() == [3, 3]


def test_the_table_refuses_what_the_config_bounds():
    table = GroupTable(max_groups=1, max_ranks=4)
    with pytest.raises(BadParams):
        table.open("g", 5, "enhanced", 4096, 1, have=-1)
    table.open("g", 2, "enhanced", 4096, 1, have=-1)
    with pytest.raises(Refusal) as err:
        table.open("h", 2, "enhanced", 4096, 1, have=-1)
    assert err.value.code == "too_many"
    with pytest.raises(Refusal) as err:
        table.open("g", 3, "enhanced", 4096, 1, have=-1)
    assert err.value.code == "group_mismatch"
