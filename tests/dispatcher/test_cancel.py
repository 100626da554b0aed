"""Cancel: ``shoal cancel JOB`` and a failed job kill their running units and start no new ones.

The core tests drive the state machine with a fake clock; the live test runs a
real dispatcher and worker and checks the processes themselves (whole process
groups gone) and what the records say about each unit.
"""

import json
import subprocess
from pathlib import Path

import pytest
import trio

from shoal.core.dispatch.jobs import job_from_dict
from shoal.core.dispatch.machine import CoreError
from shoal.protocol.dispatch import KILLED, Heartbeat, HeartbeatReply, Report, ReportReply, TaskResult
from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher, start_worker, wait_job, wait_workers
from tests.dispatcher.test_core import CAP, bad, independent, kept_counts_checked, make_core, ok
from tests.harness import scrape


def by_task(view):
    return {t["task"]: t for t in view["tasks"]}


def test_cancel_records_what_happened_to_each_unit_and_names_the_ones_to_kill(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    job = core.submit(independent(4), 0.0)
    leased = core.pull("w", 2, 1.0)  # t0, t1 leased; t2, t3 queued at the dispatcher
    assert [p["key"] for p in leased] == [f"{job}/t0", f"{job}/t1"]
    assert core.cancel(job, 2.0, "alice") == {"cancelled": 4, "killing": 2}
    assert core.pull("w", 10, 2.1) == []  # nothing more is handed out
    assert core.to_cancel([f"{job}/t0", f"{job}/t1"]) == [f"{job}/t0", f"{job}/t1"]
    # t0 had started: the worker killed it and says so; t1 was still in its queue (dropped, no report)
    killed = TaskResult("t0", None, 1.5, 2.2, error=KILLED, stdout=b"half way\n")
    assert core.report("w", [(f"{job}/t0", [killed])], 2.3) == 0  # no open unit changed
    view = core.store.job(job, logs=True)
    assert view["state"] == "cancelled" and view["reason"] == "job cancelled by alice"
    t = by_task(view)
    assert t["t0"]["state"] == "cancelled" and t["t0"]["attempts"] == 1 and t["t0"]["worker"] == "w"
    assert t["t0"]["error"] == "killed on w: job cancelled by alice" and t["t0"]["started"] == 1.5
    assert t["t0"]["stdout"] == b"half way\n"
    assert t["t1"]["attempts"] == 0 and t["t1"]["error"] == "job cancelled by alice; it was leased to w"
    assert t["t2"]["attempts"] == 0 and t["t2"]["error"] == "job cancelled by alice; not started"
    assert view["counts"] == kept_counts_checked(core.store, job) == {"cancelled": 4}
    # a second kill report of the same run changes nothing
    core.report("w", [(f"{job}/t0", [TaskResult("t0", None, 9.0, 9.0, error=KILLED)])], 3.0)
    assert by_task(core.store.job(job))["t0"]["started"] == 1.5
    with pytest.raises(CoreError) as info:
        core.cancel(job, 4.0, "alice")
    assert info.value.code == "not_running"


def test_a_failed_job_names_its_other_running_units_to_kill(tmp_path):
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    job = core.submit(independent(3), 0.0)
    p0, p1, p2 = core.pull("w", 3, 1.0)
    core.report("w", [(p0["key"], bad(p0))], 2.0)
    assert core.to_cancel([p1["key"], p2["key"]]) == [p1["key"], p2["key"]]
    view = core.store.job(job)
    assert view["state"] == "failed" and view["reason"] == "job failed: task t0 exit 1"
    assert by_task(view)["t1"]["error"] == "job failed: task t0 exit 1; it was leased to w"


def test_two_failures_of_one_job_in_one_report_are_both_recorded(tmp_path):
    """The first failure ends the job; the second unit (already cancelled in memory) must not crash the
    report with an illegal life-cycle move, and its own result is kept."""
    core = make_core(tmp_path / "d.db")
    core.register("w", CAP, 0.0)
    job = core.submit(independent(3), 0.0)
    p0, p1, p2 = core.pull("w", 3, 1.0)
    assert core.report("w", [(p0["key"], bad(p0)), (p1["key"], bad(p1)), (p2["key"], ok(p2))], 2.0) == 3
    view = core.store.job(job)
    assert view["state"] == "failed" and view["counts"] == {"failed": 2, "done": 1}
    assert view["counts"] == kept_counts_checked(core.store, job)
    assert core.unfinished_units == 0 and job not in core.jobs


def test_a_rerun_after_a_lost_lease_is_attempt_two(tmp_path):
    core = make_core(tmp_path / "d.db", lease=5.0)
    core.register("a", CAP, 0.0)
    job = core.submit(independent(1), 0.0)
    (p,) = core.pull("a", 1, 0.5)
    assert p["attempt"] == 1
    core.register("b", CAP, 5.0)
    assert core.tick(6.0) == ["a"]  # a went silent: its lease is lost
    (p2,) = core.pull("b", 1, 6.1)
    assert p2["attempt"] == 2
    core.report("b", [(p2["key"], ok(p2))], 7.0)
    t = by_task(core.store.job(job))["t0"]
    assert t["attempts"] == 2 and t["lost"] == 1
    # and across a restart: the count is in the store
    core2 = make_core(tmp_path / "d.db", lease=5.0)
    job2 = core2.submit(independent(1), 8.0)
    core2.register("c", CAP, 8.0)
    (q,) = core2.pull("c", 1, 8.1)
    core2.register("c", CAP, 9.0)  # c restarted: what it held was lost
    core3 = make_core(tmp_path / "d.db", lease=5.0)
    core3.restore(10.0)
    core3.register("d", CAP, 10.0)
    (q2,) = core3.pull("d", 1, 10.1)
    assert q2["key"] == q["key"] == f"{job2}/t0" and q2["attempt"] == 2


def test_independent_tasks_are_released_in_spec_order(tmp_path):
    core = make_core(tmp_path / "d.db", policy="nearest")
    core.register("w", CAP, 0.0)
    names = ["zeta", "alpha", "mid", "beta", "omega"]
    job = core.submit(job_from_dict({"tasks": [{"name": n, "builtin": "sleep 0"} for n in names]}), 0.0)
    assert [p["key"] for p in core.pull("w", 10, 1.0)] == [f"{job}/{n}" for n in names]


def test_cancel_contracts_refuse_bad_keys():
    assert Heartbeat.decode({"worker": "w", "units": ["3/a"]}).units == ["3/a"]
    assert HeartbeatReply.decode({"rewards": [], "cancel": ["3/a"]}).cancel == ["3/a"]
    assert ReportReply.decode({"applied": 1, "duplicates": 0, "cancel": []}).cancel == []
    for bad_keys in (["nojob"], ["x/a"], [3]):
        with pytest.raises(Exception, match="units|unit key|list"):
            Report.decode({"worker": "w", "results": [], "units": bad_keys})


# -- live --------------------------------------------------------------------------------


def _pids_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (a zombie has an empty one)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in p.joinpath("cmdline").read_bytes().decode("utf-8", "replace"):
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def long_task(name: str, pids: Path, marker: str) -> dict:
    """A task (a shell named ``marker``) that starts a child in its process group, writes the child's
    pid to ``pids/name`` (so: it started), and waits for it: a minute."""
    script = f"sleep 60 & echo $! > {pids / name}.tmp && mv {pids / name}.tmp {pids / name}; wait"
    return {"name": name, "command": ["/bin/sh", "-c", script, marker], "timeout": 120}


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie
    except OSError:
        return True


def _all_gone(marker: str, pids: Path) -> bool:
    return not _pids_with(marker) and all(_dead(int(f.read_text())) for f in pids.iterdir() if f.suffix != ".tmp")


async def _until(cond, what: str, timeout: float = 20.0):
    with trio.fail_after(timeout):
        while not (got := cond()):  # noqa: ASYNC110 - polls other processes' state: there is no event to wait on
            await trio.sleep(0.05)
    return got


async def _wait_recorded(c, job: int, n: int) -> dict:
    """Until ``n`` tasks of the ended job carry their worker's kill report."""
    with trio.fail_after(20):
        while True:
            view = await c.call("job", {"id": job})
            if sum(1 for t in view["tasks"] if t["error"] and t["error"].startswith("killed on")) >= n:
                return view
            await trio.sleep(0.05)


async def test_cancel_and_a_failed_job_kill_running_units_and_start_no_new_ones(tmp_path):
    marker = f"shoal-cancel-{tmp_path.name}"
    pa, pb = tmp_path / "pa", tmp_path / "pb"
    pa.mkdir()
    pb.mkdir()
    job_a = {"name": "a", "tasks": [long_task(f"long{i}", pa, marker) for i in range(4)]}
    bad_script = f"while [ ! -e {pb / 'long0'} ]; do sleep 0.02; done; exit 1"
    job_b = {"name": "b", "tasks": [long_task("long0", pb, marker),
                                    {"name": "bad", "command": ["/bin/sh", "-c", bad_script]},
                                    *[long_task(f"later{i}", pb, marker) for i in range(3)]]}
    with trio.fail_after(90):
        async with await start_dispatcher(tmp_path) as d:
            async with await start_worker(tmp_path, d.addresses["rpc"], "w1", slots=2) as w, await connect(d) as c:
                await wait_workers(c, 1)
                a = (await c.call("submit", {"spec": json.dumps(job_a).encode()}))["job"]
                await _until(lambda: len([f for f in pa.iterdir() if f.suffix != ".tmp"]) == 2, "two running")
                r = subprocess.run([*SHOAL, "cancel", str(a), "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 0, r.stderr
                assert "4 units cancelled, 4 of them leased" in r.stdout  # two run, two wait in w1's queue
                view = await _wait_recorded(c, a, 2)
                assert view["state"] == "cancelled"
                t = by_task(view)
                ran = sorted(p.name for p in pa.iterdir())
                assert len(ran) == 2  # no new one started
                for name, task in t.items():
                    if name in ran:
                        assert task["attempts"] == 1 and task["started"] is not None and task["worker"] == "w1"
                        assert task["error"] == "killed on w1: job cancelled by root"
                    else:
                        assert task["attempts"] == 0 and task["started"] is None, task
                        assert task["error"].startswith("job cancelled by root"), task
                # the tasks and their children (the whole process group) are gone
                await _until(lambda: _all_gone(marker, pa), "job a's processes gone")

                b = (await c.call("submit", {"spec": json.dumps(job_b).encode()}))["job"]
                view = await wait_job(c, b)
                assert view["state"] == "failed" and view["reason"] == "job failed: task bad exit 1"
                view = await _wait_recorded(c, b, 1)
                t = by_task(view)
                assert t["bad"]["state"] == "failed" and t["bad"]["attempts"] == 1
                assert t["long0"]["state"] == "cancelled" and t["long0"]["error"] == (
                    "killed on w1: job failed: task bad exit 1")
                assert sorted(p.name for p in pb.iterdir()) == ["long0"]  # no later task started
                for i in range(3):
                    assert t[f"later{i}"]["attempts"] == 0 and t[f"later{i}"]["started"] is None, (t, w.log)
                await _until(lambda: _all_gone(marker, pb), "job b's processes gone")

                m = await scrape(w.addresses["metrics"])
                assert metric(m, "shoal_worker_units_killed_total") == 2 + 1
                assert metric(m, "shoal_worker_queue_length") == 0 and metric(m, "shoal_worker_running_tasks") == 0
                dm = await scrape(d.addresses["metrics"])
                assert metric(dm, 'shoal_dispatcher_jobs_finished_total{state="cancelled"}') == 1
                # cancel is an operator method: refused without a credential on the token-less TCP RPC
                r = subprocess.run([*SHOAL, "cancel", str(b), "--dispatcher", str(d.addresses["rpc"])],  # noqa: ASYNC221 - the CLI under test is its own process
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 2 and "unauthorized" in r.stderr
                r = subprocess.run([*SHOAL, "cancel", str(b), "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 2 and f"job {b} is not running" in r.stderr
                assert await w.terminate() == 0
            assert await d.terminate() == 0
