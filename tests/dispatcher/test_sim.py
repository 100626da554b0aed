"""The discrete-event simulator: seed 004's cost model and its invariants."""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.dispatch.policy import make_dispatch_policy, make_queue_policy
from shoal.core.dispatch.sim import (
    PAIRINGS,
    SimJob,
    SimResult,
    SimServer,
    SimTask,
    Workload,
    generate_workload,
    simulate,
)
from shoal.lab import dispatch_simulate as sim_cli

EPS = 1e-9


def run(w: Workload, d: str, q: str, seed: int = 0) -> SimResult:
    opts = {"time_scale": 10.0}
    dp = make_dispatch_policy(d, seed=seed, **(opts if d == "dqn" else {}))
    qp = make_queue_policy(q, seed=seed, **(opts if q == "marl" else {}))
    return simulate(w, dp, qp)


def check_invariants(w: Workload, r: SimResult) -> None:
    servers = {s.id: s for s in w.servers}
    tasks = {t.id: (job, t) for job in w.jobs for t in job.tasks}
    # Conservation: every task finished exactly once, nothing extra.
    assert set(r.records) == set(tasks)
    assert all(rec.finish_count == 1 for rec in r.records.values())
    mem_events: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    cpu_events: dict[str, list[tuple[float, int, float]]] = defaultdict(list)
    for tid, rec in r.records.items():
        job, t = tasks[tid]
        s = servers[rec.server]
        # Causality: dispatched after the job arrived, D1 before arrival, ready
        # after every predecessor's result came in, started when ready.
        assert rec.dispatched >= job.arrival - EPS
        assert rec.arrived == pytest.approx(rec.dispatched + s.rtt + t.data_size / s.bandwidth)
        for p in t.preds:
            pr = r.records[p]
            d3 = 0.0 if pr.server == rec.server else servers[pr.server].rtt
            assert rec.ready >= pr.finished + d3 - EPS
            assert r.records[p].dispatched <= rec.dispatched + EPS
        assert rec.ready >= rec.arrived - EPS
        assert rec.started >= rec.ready - EPS
        # Processing time = size / CPU, response = finish + D2 - submitted.
        assert rec.finished - rec.started == pytest.approx(t.work / (s.cpu_speed * t.cpus))
        assert rec.response == pytest.approx(rec.finished + s.rtt - job.arrival)
        assert rec.missed == (rec.finished + s.rtt > job.arrival + t.deadline)
        # Memory is held from dispatch to finish; CPUs from start to finish.
        mem_events[rec.server] += [(rec.dispatched, 1, t.mem), (rec.finished, 0, -t.mem)]
        cpu_events[rec.server] += [(rec.started, 1, t.cpus), (rec.finished, 0, -t.cpus)]
    # Memory admission and CPU slots never exceeded (releases sort before
    # reservations at the same instant: kind 0 < 1).
    for sid, evs in mem_events.items():
        used = 0.0
        for _, _, delta in sorted(evs):
            used += delta
            assert used <= servers[sid].mem_total + 1e-6
    for sid, evs in cpu_events.items():
        used = 0
        for _, _, delta in sorted(evs):
            used += delta
            assert used <= servers[sid].cpus


@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_invariants_hold_for_every_pairing(pairing: str) -> None:
    w = generate_workload(n_tasks=300, density=10, n_servers=6, seed=11)
    d, q = PAIRINGS[pairing]
    r = run(w, d, q)
    check_invariants(w, r)
    assert r.decisions >= 2 * w.n_tasks  # one dispatch + one pick per task


def test_memory_pressure_holds_tasks_at_the_access_point() -> None:
    w = generate_workload(n_tasks=300, density=40, n_servers=3, seed=2)
    for s in w.servers:
        s.mem_total = 3.0  # room for 1..15 tasks: the AP must hold the rest
    r = run(w, "nearest", "fcfs")
    assert r.max_ap_queue > 50
    check_invariants(w, r)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_tasks=st.integers(1, 60),
    n_servers=st.integers(1, 5),
    density=st.floats(0.5, 50),
    pairing=st.sampled_from(list(PAIRINGS)),
)
def test_invariants_on_random_workloads(seed, n_tasks, n_servers, density, pairing) -> None:
    w = generate_workload(n_tasks=n_tasks, density=density, n_servers=n_servers, seed=seed,
                          edge_prob=0.5)
    d, q = PAIRINGS[pairing]
    check_invariants(w, run(w, d, q, seed=seed))


def test_hand_computed_chain_on_two_servers() -> None:
    # Two servers, a job a -> b. Nearest puts both on s0 (k=0.01, bw=1e6, 1 cpu of speed 2).
    servers = [SimServer("s0", 1, 2.0, 8.0, 1e6, 0.01), SimServer("s1", 1, 1.0, 8.0, 1e6, 0.05)]
    job = SimJob("j", 1.0, [SimTask("a", 4.0, 1e6, 1.0, 1, 10.0),
                            SimTask("b", 2.0, 5e5, 1.0, 1, 3.0, ("a",))])
    r = run(Workload(servers, [job]), "nearest", "fcfs")
    a, b = r.records["a"], r.records["b"]
    assert (a.server, b.server) == ("s0", "s0")
    assert a.arrived == pytest.approx(1.0 + 0.01 + 1.0)  # D1 = k + size/bd
    assert a.started == pytest.approx(2.01)
    assert a.finished == pytest.approx(4.01)  # 4 work / speed 2
    assert b.ready == pytest.approx(4.01)  # same server: D3 = 0
    assert b.finished == pytest.approx(5.01)
    assert a.response == pytest.approx(4.01 + 0.01 - 1.0)  # D2 = k
    assert b.response == pytest.approx(5.02 - 1.0)
    assert not a.missed and b.missed  # b's deadline is 1.0 + 3.0 = 4.0
    assert r.miss_rate == pytest.approx(0.5)
    assert r.mean_response == pytest.approx((3.02 + 4.02) / 2)


def test_remote_predecessor_costs_its_propagation_delay() -> None:
    # s0 has memory for one task only, so b goes to s1 and waits for a's result: D3 = k(s0).
    servers = [SimServer("s0", 1, 1.0, 1.0, 1e9, 0.2), SimServer("s1", 1, 1.0, 8.0, 1e9, 0.3)]
    job = SimJob("j", 0.0, [SimTask("a", 1.0, 0.0, 1.0, 1, None),
                            SimTask("b", 1.0, 0.0, 1.0, 1, None, ("a",))])
    r = run(Workload(servers, [job]), "nearest", "fcfs")
    a, b = r.records["a"], r.records["b"]
    assert (a.server, b.server) == ("s0", "s1")
    assert a.finished == pytest.approx(0.2 + 1.0)
    assert b.ready == pytest.approx(a.finished + 0.2)
    assert r.miss_rate == 0.0


def test_simulation_is_deterministic() -> None:
    w = generate_workload(n_tasks=200, density=8, n_servers=5, seed=4)
    r1 = run(w, "dqn", "marl", seed=3)
    r2 = run(w, "dqn", "marl", seed=3)
    key = lambda r: [(t.server, t.started, t.finished) for t in r.records.values()]  # noqa: E731
    assert key(r1) == key(r2)
    r3 = run(w, "dqn", "marl", seed=4)
    assert key(r3) != key(r1)


def test_bad_workloads_are_refused() -> None:
    s = [SimServer("s0", 1, 1.0, 2.0, 1e6, 0.01)]
    with pytest.raises(ValueError, match="predecessor"):
        simulate(Workload(s, [SimJob("j", 0, [SimTask("a", 1, 1, 1, 1, None, ("zz",))])]),
                 make_dispatch_policy("random"), make_queue_policy("fcfs"))
    with pytest.raises(ValueError, match="fits on no server"):
        simulate(Workload(s, [SimJob("j", 0, [SimTask("a", 1, 1, 5.0, 1, None)])]),
                 make_dispatch_policy("random"), make_queue_policy("fcfs"))
    with pytest.raises(ValueError):
        generate_workload(n_tasks=0)


def test_generator_matches_requested_size_and_density() -> None:
    w = generate_workload(n_tasks=2000, density=10, n_servers=7, seed=0)
    assert w.n_tasks == 2000 and len(w.servers) == 7
    span = w.jobs[-1].arrival - w.jobs[0].arrival
    assert 0.85 < w.n_tasks / span / 10 < 1.15


def test_simulate_cli_writes_tables_json_and_plots(tmp_path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    args = parser.parse_args(["--sweep", "servers", "--values", "3,5", "--tasks", "60",
                              "--seeds", "1", "--train", "1", "--pairings", "NF,LS,DAMD",
                              "--json", str(tmp_path / "r.json"), "--plots", str(tmp_path / "p")])
    out = io.StringIO()
    assert sim_cli.run(args, out) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    rows = data["sweeps"]["servers"]
    assert [r["value"] for r in rows] == [3, 5]
    for row in rows:
        for p in ("NF", "LS", "DAMD"):
            assert math.isfinite(row["results"][p]["mean_response_s"])
            assert 0.0 <= row["results"][p]["miss_rate"] <= 1.0
    svg = (tmp_path / "p" / "servers_miss_rate.svg").read_text()
    assert svg.startswith("<svg") and "DAMD" in svg
    assert "number of servers" in out.getvalue()


def test_simulate_cli_refuses_bad_input(capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    assert sim_cli.run(parser.parse_args(["--pairings", "NF,XYZ"])) == 2
    err = capsys.readouterr().err
    assert "unknown pairing" in err and err.count("\n") == 1
    assert sim_cli.run(parser.parse_args(["--tasks", "0"])) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--sweep", "tasks", "--values", "1,x"])
