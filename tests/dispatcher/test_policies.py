"""Dispatch and queue policies: unit behaviour, registry, persistence, and the
comparisons seed 004 predicts, on seeded simulator runs."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shoal.core.dispatch.policy import (
    DISPATCH_POLICIES,
    QUEUE_POLICIES,
    DispatchPolicy,
    QueuePolicy,
    ServerState,
    TaskInfo,
    admissible,
    make_dispatch_policy,
    make_queue_policy,
    reward,
)
from shoal.core.dispatch.sim import generate_workload, simulate

EVAL_SEEDS = (1, 2, 3)


def server(sid: str, *, cpus=2.0, speed=1.0, mem=8.0, free=8.0, bw=1e7, rtt=0.01,
           qlen=0, running=0, work=0.0) -> ServerState:
    return ServerState(sid, cpus, speed, mem, free, bw, rtt, qlen, running, work)


def task(tid: str = "t", *, work=1.0, data=1e6, mem=1.0, cpus=1.0, deadline=None,
         submitted=0.0, depth=0) -> TaskInfo:
    return TaskInfo(tid, "j", work, data, mem, cpus, deadline, submitted, depth)


# ----------------------------------------------------------------------------- registry


def test_registry_builds_every_policy_and_refuses_unknown_names() -> None:
    for name in DISPATCH_POLICIES:
        p = make_dispatch_policy(name, seed=1)
        assert p.name == name and isinstance(p, DispatchPolicy)
    for name in QUEUE_POLICIES:
        q = make_queue_policy(name, seed=1)
        assert q.name == name and isinstance(q, QueuePolicy)
    with pytest.raises(ValueError, match="known: nearest, random"):
        make_dispatch_policy("fastest")
    with pytest.raises(ValueError, match="known: fcfs"):
        make_queue_policy("lifo")
    with pytest.raises(ValueError, match="bad options"):
        make_dispatch_policy("nearest", colour="red")
    with pytest.raises(ValueError, match="gamma"):
        make_dispatch_policy("dqn", gamma=1.5)


def test_admissible_filters_on_memory_and_cpus() -> None:
    servers = [server("a", free=0.5), server("b", free=2.0, cpus=1.0), server("c", free=2.0)]
    assert admissible(task(mem=1.0, cpus=2.0), servers) == [2]
    assert admissible(task(mem=1.0, cpus=1.0), servers) == [1, 2]
    assert reward(0.0) == 1.0 and reward(1.0) == pytest.approx(np.exp(-1))
    assert reward(10.0, time_scale=10.0) == pytest.approx(np.exp(-1))


# ----------------------------------------------------------------------------- classic dispatch


def test_nearest_random_least_load() -> None:
    servers = [server("a", rtt=0.05, work=0.0), server("b", rtt=0.01, work=10.0),
               server("c", rtt=0.03, work=1.0, speed=4.0)]
    assert make_dispatch_policy("nearest").choose(task(), servers, 0.0) == 1
    # least-load: waiting time = queued work / (cpus * speed): a 0, b 5 s, c 0.125 s
    assert make_dispatch_policy("least-load").choose(task(), servers, 0.0) == 0
    servers[0].queued_work = 2.0  # a: 1 s
    assert make_dispatch_policy("least-load").choose(task(), servers, 0.0) == 2
    r1, r2 = make_dispatch_policy("random", seed=7), make_dispatch_policy("random", seed=7)
    picks = [r1.choose(task(), servers, 0.0) for _ in range(300)]
    assert picks == [r2.choose(task(), servers, 0.0) for _ in range(300)]
    assert set(picks) == {0, 1, 2}
    assert max(np.bincount(picks)) < 130  # roughly uniform


def test_heft_ranks_and_earliest_finish() -> None:
    heft = make_dispatch_policy("heft")
    a, b, c, d = (task(x, work=w) for x, w in (("a", 2.0), ("b", 1.0), ("c", 4.0), ("d", 1.0)))
    servers = [server("s0", speed=1.0, rtt=0.1), server("s1", speed=3.0, rtt=0.1)]
    heft.plan([a, b, c, d], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], servers, 0.0)
    mean = lambda w: (w / 1.0 + w / 3.0) / 2  # noqa: E731 - mean processing time
    assert heft.priority(d) == pytest.approx(mean(1.0))
    assert heft.priority(c) == pytest.approx(mean(4.0) + 0.1 + heft.priority(d))
    assert heft.priority(a) == pytest.approx(mean(2.0) + 0.1 + heft.priority(c))
    assert heft.priority(a) > heft.priority(c) > heft.priority(b) > heft.priority(d)
    # Earliest finish: the fast server unless its queue outweighs its speed.
    assert heft.choose(a, servers, 0.0) == 1
    servers[1].queued_work = 60.0  # 10 s of waiting on s1
    assert heft.choose(b, servers, 0.0) == 0
    with pytest.raises(ValueError, match="cycle"):
        heft.plan([a, b], [("a", "b"), ("b", "a")], servers, 0.0)


def test_heft_counts_the_delay_of_a_remote_predecessor() -> None:
    heft = make_dispatch_policy("heft")
    a, b = task("a", data=0.0), task("b", data=0.0)
    far = [server("s0", rtt=1.0), server("s1", rtt=0.9)]
    heft.plan([a, b], [("a", "b")], far, 0.0)
    assert heft.choose(a, far, 0.0) == 1  # nearer
    # b on s0 would pay D3 = k(s0) for a's result (1.0 + 1.0 + 0.5 = 2.5 s): s1
    # (0.9 + 1.0 = 1.9 s) stays the earliest finish even though s0 is faster now.
    far[0].cpu_speed = 2.0
    assert heft.choose(b, far, 0.0) == 1
    nohist = make_dispatch_policy("heft")
    nohist.plan([a, b], [("a", "b")], far, 0.0)
    assert nohist.choose(b, far, 0.0) == 0  # without a's placement s0 wins: 1.5 s


# ----------------------------------------------------------------------------- classic queues


def test_fcfs_sjf_edf_pick() -> None:
    s = server("s", speed=2.0)
    q = [task("x", work=4.0, deadline=9.0, submitted=1.0),
         task("y", work=1.0, deadline=None, submitted=0.5),
         task("z", work=2.0, deadline=5.0, submitted=2.0)]
    assert make_queue_policy("fcfs").pick(q, s, 3.0) == 1
    assert make_queue_policy("sjf").pick(q, s, 3.0) == 1
    assert make_queue_policy("edf").pick(q, s, 3.0) == 2
    # ties keep arrival order
    same = [task("a", submitted=1.0, deadline=3.0), task("b", submitted=1.0, deadline=3.0)]
    for name in ("fcfs", "sjf", "edf"):
        assert make_queue_policy(name).pick(same, s, 3.0) == 0
    # no deadlines at all: EDF falls back to FCFS
    nod = [task("a", submitted=2.0), task("b", submitted=1.0)]
    assert make_queue_policy("edf").pick(nod, s, 3.0) == 1


# ----------------------------------------------------------------------------- learners, in isolation


def test_dqn_learns_a_two_server_bandit() -> None:
    """Reward e^(-T) where T is the chosen server's queue wait: DQN must learn to avoid the queue."""
    dqn = make_dispatch_policy("dqn", seed=3, eps_decay=300, gamma=0.0, sync_every=50)
    rng = np.random.default_rng(0)
    greedy_ok = 0
    for i in range(800):
        w = rng.uniform(0, 20, size=2)
        servers = [server("a", work=w[0]), server("b", work=w[1])]
        t = task(f"t{i}")
        k = dqn.choose(t, servers, float(i))
        dqn.observe(t, servers[k].id, w[k] / 2.0, float(i))  # T = wait (2 cpus * speed 1)
    dqn.learning = False
    for i in range(200):
        w = rng.uniform(0, 20, size=2)
        servers = [server("a", work=w[0]), server("b", work=w[1])]
        greedy_ok += dqn.choose(task(f"e{i}"), servers, 0.0) == int(np.argmin(w))
    assert greedy_ok >= 180, greedy_ok
    assert dqn.train_steps > 500


def test_marl_agents_learn_from_the_shared_reward() -> None:
    """Every agent gets the team reward; picking the short task makes the team's
    tasks finish sooner, so each agent must learn to pick it."""
    marl = make_queue_policy("marl", seed=1, eps_decay=400, sync_every=25)
    rng = np.random.default_rng(2)
    servers = [server("s0"), server("s1")]
    for i in range(1000):
        s = servers[i % 2]
        short, long_ = rng.uniform(0.5, 1.0), rng.uniform(3.0, 5.0)
        q = [task(f"a{i}", work=long_, submitted=float(i)),
             task(f"b{i}", work=short, submitted=float(i))]
        order = rng.permutation(2)
        q = [q[j] for j in order]
        k = marl.pick(q, s, float(i))
        marl.observe(q[k], s.id, q[k].work / 2.0, float(i))  # T = the picked task's run time
    marl.learning = False
    right = 0
    for i in range(200):
        q = [task("l", work=rng.uniform(3.0, 5.0)), task("s", work=rng.uniform(0.5, 1.0))]
        if rng.random() < 0.5:
            q.reverse()
        right += q[marl.pick(q, servers[i % 2], 0.0)].id == "s"
    assert right >= 180, right
    assert set(marl.agents) == {"s0", "s1"}


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("name", DISPATCH_POLICIES)
def test_dispatch_state_survives_a_restart(name: str) -> None:
    w = generate_workload(n_tasks=150, density=8, n_servers=5, seed=9)
    p = make_dispatch_policy(name, seed=4, time_scale=10.0) if name == "dqn" else make_dispatch_policy(name, seed=4)
    simulate(w, p, make_queue_policy("edf"))  # learn / advance RNG
    blob = msgpack.packb(p.state_dict())
    q = make_dispatch_policy(name, seed=99, time_scale=10.0) if name == "dqn" else make_dispatch_policy(name, seed=99)
    q.load_state_dict(msgpack.unpackb(blob))
    w2 = generate_workload(n_tasks=150, density=8, n_servers=5, seed=10)
    if name == "dqn":  # compare greedy decisions (the replay memory is not saved)
        p.learning = q.learning = False
    r1 = simulate(w2, p, make_queue_policy("edf"))
    r2 = simulate(w2, q, make_queue_policy("edf"))
    assert [x.server for x in r1.records.values()] == [x.server for x in r2.records.values()]
    with pytest.raises(ValueError):
        make_dispatch_policy("nearest" if name != "nearest" else "random").load_state_dict(p.state_dict())


@pytest.mark.parametrize("name", QUEUE_POLICIES)
def test_queue_state_survives_a_restart(name: str) -> None:
    w = generate_workload(n_tasks=150, density=10, n_servers=4, seed=9)
    opts = {"time_scale": 10.0} if name == "marl" else {}
    p = make_queue_policy(name, seed=4, **opts)
    simulate(w, make_dispatch_policy("least-load"), p)
    q = make_queue_policy(name, seed=99, **opts)
    q.load_state_dict(msgpack.unpackb(msgpack.packb(p.state_dict())))
    w2 = generate_workload(n_tasks=150, density=10, n_servers=4, seed=10)
    if name == "marl":  # compare greedy decisions (no exploration, no learning)
        p.learning = q.learning = False
    r1 = simulate(w2, make_dispatch_policy("least-load"), p)
    r2 = simulate(w2, make_dispatch_policy("least-load"), q)
    assert [x.started for x in r1.records.values()] == [x.started for x in r2.records.values()]


# ----------------------------------------------------------------------------- seeded comparisons


def totals(dispatch: str | object, queue: str | object, *, n_tasks=400, density=8.0,
           n_servers=8) -> tuple[float, float]:
    """Sum over EVAL_SEEDS of (mean response time, deadline miss rate)."""
    resp = miss = 0.0
    for s in EVAL_SEEDS:
        w = generate_workload(n_tasks=n_tasks, density=density, n_servers=n_servers, seed=s)
        d = make_dispatch_policy(dispatch) if isinstance(dispatch, str) else dispatch
        q = make_queue_policy(queue) if isinstance(queue, str) else queue
        r = simulate(w, d, q)
        resp += r.mean_response
        miss += r.miss_rate
    return resp, miss


@pytest.fixture(scope="module")
def classic() -> dict[str, tuple[float, float]]:
    pairs = [("random", "fcfs"), ("nearest", "fcfs"), ("least-load", "fcfs"),
             ("least-load", "sjf"), ("least-load", "edf"), ("heft", "edf"), ("random", "edf")]
    return {f"{d}+{q}": totals(d, q) for d, q in pairs}


def test_least_load_beats_random_and_nearest_under_load(classic) -> None:
    assert classic["least-load+fcfs"][0] < 0.8 * classic["random+fcfs"][0]
    assert classic["least-load+fcfs"][0] < 0.8 * classic["nearest+fcfs"][0]
    # Seed 004, Fig. 3: NF has the highest deadline miss rate of the baselines.
    assert classic["nearest+fcfs"][1] > 2 * classic["least-load+edf"][1]


def test_edf_beats_fcfs_on_deadline_misses_and_sjf_on_response(classic) -> None:
    assert classic["least-load+edf"][1] < 0.7 * classic["least-load+fcfs"][1]
    assert classic["least-load+sjf"][0] < classic["least-load+fcfs"][0]


def test_heft_is_no_worse_than_least_load(classic) -> None:
    assert classic["heft+edf"][0] < 1.1 * classic["least-load+edf"][0]
    assert classic["heft+edf"][0] < 0.8 * classic["random+edf"][0]


@pytest.fixture(scope="module")
def trained() -> tuple[DispatchPolicy, QueuePolicy]:
    dqn = make_dispatch_policy("dqn", seed=0, time_scale=10.0, eps_decay=1000)
    marl = make_queue_policy("marl", seed=1, time_scale=10.0, eps_decay=1000)
    for e in range(3):  # training workloads are disjoint from EVAL_SEEDS
        w = generate_workload(n_tasks=400, density=8, n_servers=8, seed=100 + e)
        simulate(w, dqn, make_queue_policy("edf"))
        simulate(w, make_dispatch_policy("least-load"), marl)
    dqn.learning = False
    marl.learning = False
    return dqn, marl


def test_trained_dqn_beats_random_dispatch(trained, classic) -> None:
    dqn, _ = trained
    resp, miss = totals(dqn, "edf")
    assert resp < 0.75 * classic["random+edf"][0]
    assert miss < 0.5 * classic["random+edf"][1]
    assert resp < 1.25 * classic["least-load+edf"][0]


def test_trained_marl_is_no_worse_than_a_random_order(trained) -> None:
    _, marl = trained
    random_order = make_queue_policy("marl", seed=5, eps_start=1.0, eps_end=1.0)
    r_resp, _ = totals("least-load", random_order)
    m_resp, _ = totals("least-load", marl)
    assert m_resp < 1.1 * r_resp
