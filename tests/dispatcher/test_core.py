"""The dispatcher core on a real SQLite store, driven by fake workers and a fake clock."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from shoal.core.dispatch.jobs import Limits, job_from_dict
from shoal.core.dispatch.machine import ASSIGN_AHEAD, MAX_SHARED_PER_REPLY, Core, CoreError
from shoal.core.dispatch.policy import make_dispatch_policy
from shoal.daemons.dispatcher.metrics import DispatcherMetrics
from shoal.daemons.dispatcher.store import Store
from shoal.protocol.dispatch import TaskResult

CAP = {"cpus": 2, "memory": 4e9, "cpu_speed": 1.0, "bandwidth": 1e8, "rtt": 0.001}


def make_core(path, lease=10.0, policy="least-load"):
    cache = {}

    def policy_for(name):
        if name not in cache:
            cache[name] = make_dispatch_policy(name, seed=1)
        return cache[name]

    return Core(Store(path), policy_for, default_policy=policy, lease_seconds=lease)


def ok(payload, t=0.0):
    return [TaskResult(task=x["name"], exit_code=0, started=t, finished=t) for x in payload["tasks"]]


def bad(payload, t=0.0):
    return [TaskResult(task=payload["tasks"][0]["name"], exit_code=1, started=t, finished=t)]


def chain(n, **extra):
    return job_from_dict({"tasks": [
        {"name": f"t{i}", "builtin": "sleep 0", "deps": [f"t{i - 1}"] if i else [], **extra} for i in range(n)]})


def test_units_are_released_in_dependency_order(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w1", CAP, 0.0)
    job = core.submit(chain(3), 0.0)
    got = core.pull("w1", 10, 1.0)
    assert [p["key"] for p in got] == [f"{job}/t0"]  # t1 waits for t0
    assert core.report("w1", [(got[0]["key"], ok(got[0]))], 2.0) == 1
    got = core.pull("w1", 10, 3.0)
    assert [p["key"] for p in got] == [f"{job}/t1"]


def test_completion_is_idempotent_and_logged_once(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w1", CAP, 0.0)
    job = core.submit(chain(1), 0.0)
    (p,) = core.pull("w1", 10, 1.0)
    assert core.report("w1", [(p["key"], ok(p))], 2.0) == 1
    assert core.report("w1", [(p["key"], ok(p))], 2.5) == 0
    assert core.store.completion_counts(job) == {"t0": 1}
    assert core.store.job(job)["state"] == "done"


def test_the_dispatchers_own_stall_is_not_held_against_its_workers(tmp_path):
    """A tick that comes 60 s late (the dispatcher's loop was busy storing a huge job, or
    the host slept) must not declare every worker dead and take back every lease: the
    workers were heard from right up to the stall. Silence after it still counts."""
    core = make_core(tmp_path / "d.db", lease=5.0)
    core.register("a", CAP, 0.0)
    job = core.submit(chain(1), 0.0)
    (p,) = core.pull("a", 1, 0.5)
    assert core.tick(1.25, period=1.25) == []
    assert core.tick(61.25, period=1.25) == []  # 58.75 s of the dispatcher's own deafness, excused
    assert core.stalled_seconds == pytest.approx(58.75)
    assert core.workers["a"].leased  # the lease stands: its worker is not judged on that time
    assert core.tick(62.5, period=1.25) == []
    assert core.tick(63.75, period=1.25) == []
    assert core.tick(65.0, period=1.25) == ["a"]  # over 5 s of real silence besides the stall: dead
    assert core.store.job(job)["state"] == "running"


def test_silent_worker_loses_its_lease_and_late_report_is_a_duplicate(tmp_path):
    core = make_core(tmp_path / "d.db", lease=5.0)
    core.register("a", CAP, 0.0)
    job = core.submit(chain(1), 0.0)
    (p,) = core.pull("a", 1, 0.5)
    core.register("b", CAP, 1.0)
    core.heartbeat("b", 0, 5.0)
    assert core.tick(5.5) == []  # a was seen at 0.5: not yet dead
    core.heartbeat("b", 0, 6.0)
    assert core.tick(6.0) == ["a"]
    (p2,) = core.pull("b", 1, 6.1)
    assert p2["key"] == p["key"]
    assert core.report("b", [(p2["key"], ok(p2))], 7.0) == 1
    assert core.report("a", [(p["key"], ok(p))], 8.0) == 0  # the first run finishing late
    assert core.store.completion_counts(job) == {"t0": 1}
    with pytest.raises(CoreError) as info:
        core.pull("a", 1, 9.0)
    assert info.value.code == "unknown_worker"


def test_failure_retries_then_fails_the_job_and_cancels_dependents(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    job = core.submit(chain(2, retries=1), 0.0)
    for attempt in (1, 2):
        (p,) = core.pull("w", 5, float(attempt))
        assert p["attempt"] == attempt
        core.report("w", [(p["key"], bad(p))], float(attempt))
    assert core.pull("w", 5, 3.0) == []
    view = core.store.job(job)
    assert view["state"] == "failed"
    assert [t["state"] for t in view["tasks"]] == ["failed", "cancelled"]
    assert job not in core.jobs and core.unfinished_units == 0


def test_a_huge_job_is_queued_on_workers_a_bounded_window_at_a_time(tmp_path):
    """A 1,000,000-task job assigned every unit to a worker queue at submit: minutes of
    policy calls with the dispatcher deaf, and a worker that re-registered (its heartbeat
    timed out meanwhile) handed back half a million units to dispatch again, stalling the
    dispatcher again. Queues now hold ASSIGN_AHEAD units not yet pulled; the rest wait in
    order. Every unit still runs exactly once, and a unit no worker admits blocks no other."""
    core = make_core(tmp_path / "d.db", lease=1e6)
    core.register("a", CAP, 0.0)
    core.register("b", CAP, 0.0)
    n = 5 * ASSIGN_AHEAD
    job = core.submit(job_from_dict({"tasks": [
        {"name": "huge", "builtin": "sleep 0", "memory": "64GB"},  # admitted by no worker
        {"name": "t", "builtin": "sleep 0", "replicas": n}]}, Limits(max_tasks=n + 1)), 0.0)
    assert all(len(w.assigned) == ASSIGN_AHEAD for w in core.workers.values())
    assert core.queue_depth() == n + 1
    core.register("a", CAP, 1.0)  # again: what it held goes back, ahead of the rest
    assert len(core.workers["a"].assigned) <= ASSIGN_AHEAD and len(core.workers["b"].assigned) <= ASSIGN_AHEAD
    runs: dict[str, int] = {}
    t = 2.0
    while core.queue_depth() > 1:
        for wid in ("a", "b"):
            got = core.pull(wid, 700, t)
            for p in got:
                runs[p["key"]] = runs.get(p["key"], 0) + 1
            core.report(wid, [(p["key"], ok(p, t)) for p in got], t)
            assert len(core.workers[wid].assigned) <= ASSIGN_AHEAD
        t += 1.0
    assert len(runs) == n and set(runs.values()) == {1}
    counts = core.store.completion_counts(job)
    assert len(counts) == n and set(counts.values()) == {1} and "huge" not in counts
    assert [u.unit.id for u in core.waiting] == ["huge"]  # still waiting, for a worker big enough


def test_memory_admission_holds_units_until_a_big_enough_worker(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("small", {**CAP, "memory": 1e9}, 0.0)
    big = job_from_dict({"tasks": [{"name": "x", "builtin": "sleep 0", "memory": "2GB"}]})
    job = core.submit(big, 0.0)
    assert core.pull("small", 5, 1.0) == [] and core.queue_depth() == 1
    core.register("large", {**CAP, "memory": 8e9}, 2.0)
    assert [p["key"] for p in core.pull("large", 5, 2.0)] == [f"{job}/x"]


def test_excluded_workers_get_nothing_and_lose_their_queue(tmp_path):
    core = make_core(tmp_path / "d.db", policy="nearest")
    core.register("near", {**CAP, "rtt": 0.001}, 0.0)
    core.register("far", {**CAP, "rtt": 0.2}, 0.0)
    job = core.submit(chain(1), 0.0)
    assert core.workers["near"].assigned  # nearest picked it
    core.set_excluded(["near"], 1.0)
    assert not core.workers["near"].assigned
    assert [p["key"] for p in core.pull("far", 5, 1.0)] == [f"{job}/t0"]


def independent(n):
    return job_from_dict({"tasks": [{"name": f"t{i}", "builtin": "sleep 0"} for i in range(n)]})


def test_anomalous_verdict_excludes_the_worker_until_it_recovers(tmp_path):
    registry = CollectorRegistry()
    cache = {}
    core = Core(Store(tmp_path / "d.db"), lambda n: cache.setdefault(n, make_dispatch_policy(n, seed=1)),
                default_policy="nearest", exclude_anomalous=True, metrics=DispatcherMetrics(registry))
    core.metrics.watch(registry, core)
    core.register("near", {**CAP, "rtt": 0.001}, 0.0, verdict="normal")
    core.register("far", {**CAP, "rtt": 0.2}, 0.0)
    first = core.submit(chain(1), 0.0)
    assert [u.key for u in core.workers["near"].assigned] == [f"{first}/t0"]
    # the node is flagged: its queue moves to the other worker, and new work goes there too
    core.heartbeat("near", 0, 1.0, verdict="anomalous")
    assert not core.workers["near"].assigned
    second = core.submit(independent(3), 1.0)
    assert core.pull("near", 10, 1.5) == []
    keys = {p["key"] for p in core.pull("far", 10, 1.5)}
    assert keys == {f"{first}/t0"} | {f"{second}/t{i}" for i in range(3)}
    view = {w["id"]: w for w in core.workers_view()}
    assert view["near"]["verdict"] == "anomalous" and view["near"]["excluded"]
    assert view["far"]["verdict"] is None and not view["far"]["excluded"]
    # the same verdict again is not a new exclusion
    core.heartbeat("near", 0, 1.6, verdict="anomalous")
    assert registry.get_sample_value("shoal_dispatcher_anomaly_exclusions_total") == 1
    assert registry.get_sample_value("shoal_dispatcher_workers_excluded") == 1
    assert registry.get_sample_value("shoal_dispatcher_workers_anomalous") == 1
    # recovered: nearest picks it again
    core.heartbeat("near", 0, 2.0, verdict="normal")
    third = core.submit(chain(1), 2.0)
    assert [p["key"] for p in core.pull("near", 10, 2.5)] == [f"{third}/t0"]
    assert registry.get_sample_value("shoal_dispatcher_workers_excluded") == 0
    # an unreadable telemetry daemon ("unknown") does not keep a node out
    core.heartbeat("near", 0, 3.0, verdict="unknown")
    assert core.dispatchable(core.workers["near"])
    with pytest.raises(CoreError) as e:
        core.heartbeat("near", 0, 3.0, verdict="on fire")
    assert e.value.code == "bad_params"


def test_units_wait_while_every_worker_is_anomalous_and_run_on_recovery(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.set_exclude_anomalous(True, 0.0)
    core.register("w", CAP, 0.0, verdict="anomalous")
    job = core.submit(independent(2), 0.0)
    assert core.pull("w", 10, 0.5) == [] and core.queue_depth() == 2
    core.heartbeat("w", 0, 1.0, verdict="normal")
    assert {p["key"] for p in core.pull("w", 10, 1.0)} == {f"{job}/t0", f"{job}/t1"}


def test_the_verdict_is_ignored_unless_exclude_anomalous_is_on(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0, verdict="anomalous")
    job = core.submit(chain(1), 0.0)
    assert [p["key"] for p in core.pull("w", 10, 0.5)] == [f"{job}/t0"]
    assert core.workers_view()[0]["verdict"] == "anomalous" and not core.workers_view()[0]["excluded"]
    # turned on (a reload): the worker's queue moves away at once
    core.register("other", CAP, 1.0)
    second = core.submit(independent(4), 1.0)
    assert core.workers["w"].assigned
    core.set_exclude_anomalous(True, 1.0)
    assert not core.workers["w"].assigned
    assert {p["key"] for p in core.pull("other", 10, 1.0)} == {f"{second}/t{i}" for i in range(4)}


def test_team_rewards_carry_the_other_workers_results_once_and_bounded(tmp_path):
    core = make_core(tmp_path / "d.db", policy="random")
    core.register("a", CAP, 0.0)
    core.register("b", CAP, 0.0)
    job = core.submit(independent(40), 0.0)
    done = {"a": [], "b": []}
    for w, t in (("a", 2.0), ("b", 3.0)):
        for p in core.pull(w, 100, 1.0):
            core.report(w, [(p["key"], ok(p))], t)
            done[w].append(p["key"])
    assert done["a"] and done["b"]
    got_a = core.team_rewards("a")
    assert [k for k, _w, _r in got_a] == done["b"]  # only b's units, in completion order
    assert all(w == "b" and r == pytest.approx(3.0) for _k, w, r in got_a)
    assert core.team_rewards("a") == []  # each is given once
    assert [k for k, _w, _r in core.team_rewards("b")] == done["a"]
    # a worker that joins later starts from now, not from history
    core.register("c", CAP, 4.0)
    assert core.team_rewards("c") == []
    # bounded: only the newest MAX_SHARED_PER_REPLY of a long backlog
    big = core.submit(independent(MAX_SHARED_PER_REPLY + 50), 5.0)
    keys = []
    for w in ("a", "b", "c"):
        for p in core.pull(w, 10_000, 5.0):
            core.report(w, [(p["key"], ok(p))], 6.0)
            if w != "c":
                keys.append(p["key"])
    got = core.team_rewards("c")
    assert len(got) == min(MAX_SHARED_PER_REPLY, len(keys))
    assert [k for k, _w, _r in got] == keys[-len(got):] and all(k.startswith(f"{big}/") for k, _w, _r in got)
    assert job != big


def test_restart_restores_unfinished_work_and_keeps_done_units_done(tmp_path):
    db = tmp_path / "d.db"
    core = make_core(db)
    core.register("w", CAP, 0.0)
    job = core.submit(chain(3), 0.0)
    (p,) = core.pull("w", 5, 1.0)
    core.report("w", [(p["key"], ok(p))], 1.0)
    core.pull("w", 5, 1.5)  # t1 leased, then the dispatcher dies
    core2 = make_core(db)
    assert core2.restore(2.0) == 1
    core2.register("w", CAP, 2.0)
    keys = [p["key"] for p in core2.pull("w", 5, 2.0)]
    assert keys == [f"{job}/t1"]
    assert core2.report("w", [(p["key"], ok(p))], 2.5) == 0  # t0 again: already done


def kept_counts_checked(store, job: int) -> dict[str, int]:
    """The job's task counts by state, counted from the tasks themselves (the store keeps its own)."""
    return dict(store.db.execute("SELECT state, count(*) FROM tasks WHERE job=? GROUP BY state", (job,)))


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 18))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        tasks.append({"name": f"t{i}", "builtin": "sleep 0", "deps": [f"t{d}" for d in deps], "retries": 3})
    return {
        "spec": {"bundle_chains": draw(st.booleans()), "tasks": draw(st.permutations(tasks))},
        "policy": draw(st.sampled_from(["nearest", "random", "least-load", "heft", "dqn"])),
        "seed": draw(st.integers(0, 10**6)),
    }


@settings(max_examples=40, deadline=None)
@given(scenarios())
def test_dag_order_holds_through_failures_deaths_and_duplicates(tmp_path_factory, sc):
    """Random DAGs, random worker deaths, failures and duplicate reports: every
    task runs only after all its dependencies were recorded done, and each unit
    is recorded done exactly once."""
    rng = random.Random(sc["seed"])
    core = make_core(tmp_path_factory.mktemp("core") / "d.db", lease=3.0, policy=sc["policy"])
    job = job_from_dict(sc["spec"])
    now = 0.0
    for w in ("w0", "w1", "w2"):
        core.register(w, CAP, now)
    jid = core.submit(job, now)
    done_at: dict[str, float] = {}
    held: dict[str, list] = {"w0": [], "w1": [], "w2": []}
    down = {"w0": 0, "w1": 0, "w2": 0}  # steps a crashed worker stays away
    for _step in range(2000):
        if jid not in core.jobs:
            break
        now += 1.0
        for w in list(held):
            if down[w]:
                down[w] -= 1
                if down[w] == 0:  # a fresh process registers again
                    core.register(w, CAP, now)
                continue
            if rng.random() < 0.05:
                held[w] = []  # crashes: its units are lost with it
                down[w] = rng.randint(1, 6)
                continue
            if w not in core.workers:
                core.register(w, CAP, now)
            core.heartbeat(w, len(held[w]), now)
            for p in core.pull(w, 2, now):
                # a task may start only once all its deps are recorded done
                for t in p["tasks"]:
                    for d in job.tasks[t["name"]].deps:
                        assert d in done_at or d in [x["name"] for x in p["tasks"]]
                held[w].append(p)
            if jid in core.jobs and rng.random() < 0.1:  # the kept progress counts are the units' states
                want: dict[str, int] = {}
                for u in core.jobs[jid].units.values():
                    want[u.state] = want.get(u.state, 0) + len(u.unit.tasks)
                assert core.progress(jid) == want
            if held[w]:
                p = held[w].pop(0)
                if rng.random() < 0.1:
                    core.report(w, [(p["key"], bad(p, now))], now)
                else:
                    if core.report(w, [(p["key"], ok(p, now))], now):
                        for t in p["tasks"]:
                            assert t["name"] not in done_at
                            done_at[t["name"]] = now
                    if rng.random() < 0.2:
                        assert core.report(w, [(p["key"], ok(p, now))], now) == 0
        core.tick(now)
    view = core.store.job(jid)
    assert view["state"] in ("done", "failed")
    assert view["counts"] == kept_counts_checked(core.store, jid)
    if view["state"] == "done":
        assert set(done_at) == set(job.tasks)
        assert set(core.store.completion_counts(jid).values()) == {1}
    for t, at in done_at.items():
        assert all(done_at[d] <= at for d in job.tasks[t].deps)


def test_a_failed_job_leaves_nothing_behind_in_the_pending_queue(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", {**CAP, "memory": 1e9}, 0.0)
    job = core.submit(job_from_dict({"tasks": [
        {"name": "huge", "builtin": "sleep 0", "memory": "4GB"},   # no worker admits it
        {"name": "bad", "builtin": "sleep 0"}]}), 0.0)
    (p,) = core.pull("w", 5, 1.0)
    core.report("w", [(p["key"], bad(p))], 1.0)   # the job fails; "huge" is cancelled
    core.register("big", {**CAP, "memory": 8e9}, 2.0)  # retries the pending queue
    core.tick(3.0)
    assert core.pull("big", 5, 3.0) == [] and core.queue_depth() == 0
    assert core.store.job(job)["counts"] == {"failed": 1, "cancelled": 1}


def test_reports_must_name_the_units_tasks(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    core.submit(chain(1), 0.0)
    (p,) = core.pull("w", 5, 1.0)
    with pytest.raises(CoreError) as info:
        core.report("w", [(p["key"], [TaskResult("someone-else", 0, 0.0, 0.0)])], 1.0)
    assert info.value.code == "bad_params"
    assert core.report("w", [(p["key"], ok(p))], 2.0) == 1


def test_finished_jobs_are_pruned_after_their_retention_in_bounded_batches(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    old = core.submit(independent(30), 0.0)
    running = core.submit(independent(2), 0.0)
    while old in core.jobs:
        ps = [p for p in core.pull("w", 8, 1.0) if p["key"].startswith(f"{old}/")]
        core.report("w", [(p["key"], ok(p)) for p in ps], 1.0)
    recent = core.submit(independent(1), 2.0)
    (p,) = [p for p in core.pull("w", 8, 5.0) if p["key"].startswith(f"{recent}/")]
    core.report("w", [(p["key"], ok(p))], 5.0)  # finished at 5.0
    store = core.store
    assert store.prune(before=0.5) == 0  # nothing finished that long ago
    deleted = 0
    while store.job(old) is not None:  # 30 tasks + 30 units + 30 completions + the job row, 25 rows a batch
        n = store.prune(before=3.0, budget=25)
        assert 0 < n <= 25
        deleted += n
        assert store.job(old) is None or store.job(old)["state"] == "done"  # listed until wholly gone
    assert deleted == 91
    assert store.prune(before=3.0) == 0
    assert store.job(running)["state"] == "running" and store.job(recent)["state"] == "done"
    assert [j["id"] for j in store.jobs()] == [recent, running]
    for table in ("tasks", "units", "completions"):
        assert store.db.execute(f"SELECT count(*) FROM {table} WHERE job=?", (old,)).fetchone()[0] == 0
