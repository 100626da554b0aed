"""The dispatcher and worker daemons as real processes over real sockets (127.0.0.1)."""

import json
import subprocess
import sys

import trio

from shoal.daemons.runtime.rpc import RpcError
from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher, start_worker, wait_job, wait_workers
from tests.harness import scrape


def spec(tasks, **job):
    return json.dumps({"name": "t", **job, "tasks": tasks}).encode()


async def test_dag_job_runs_in_order_across_workers_with_outputs_and_logs(tmp_path):
    py = sys.executable
    tasks = [
        {"name": "prep", "command": [py, "-c", "print('prepared'); open('data.txt','w').write('x'*100)"],
         "outputs": [{"path": "data.txt", "max_bytes": 1000}]},
        {"name": "fan", "replicas": 4, "builtin": "sleep 0.05", "deps": ["prep"]},
        {"name": "mid", "command": [py, "-c", "import sys; sys.stderr.write('warn\\n')"], "deps": ["fan"]},
        {"name": "last", "builtin": "sleep 0", "deps": ["mid", "prep"]},
    ]
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:
            addr = d.addresses["rpc"]
            async with await start_worker(tmp_path, addr, "w1") as w1, await start_worker(tmp_path, addr, "w2") as w2:
                async with await connect(d) as c:
                    await wait_workers(c, 2)
                    reply = await c.call("submit", {"spec": spec(tasks, policy="least-load")})
                    assert reply == {"job": 1, "tasks": 7, "units": 7}
                    view = await wait_job(c, 1)
                    assert view["state"] == "done", view
                    by = {t["task"]: t for t in view["tasks"]}
                    deps = {"fan.0": ["prep"], "fan.1": ["prep"], "fan.2": ["prep"], "fan.3": ["prep"],
                            "mid": [f"fan.{i}" for i in range(4)], "last": ["mid", "prep"]}
                    for t, ds in deps.items():
                        assert by[t]["started"] >= max(by[x]["finished"] for x in ds), (t, by)
                    assert {t["worker"] for t in view["tasks"]} == {"w1", "w2"}  # least-load spreads the fan
                    assert by["prep"]["outputs"][0][:2] == ["data.txt", 100]
                    logs = await c.call("job", {"id": 1, "logs": True})
                    lby = {t["task"]: t for t in logs["tasks"]}
                    assert lby["prep"]["stdout"] == b"prepared\n" and lby["mid"]["stderr"] == b"warn\n"
                    # the CLI shows the same job
                    r = subprocess.run([*SHOAL, "job", "1", "--logs", "--dispatcher", str(addr)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                                       capture_output=True, text=True, timeout=30)
                    assert r.returncode == 0 and "prepared" in r.stdout and "done" in r.stdout, r.stderr
                    r = subprocess.run([*SHOAL, "jobs", "--dispatcher", str(addr)], capture_output=True, text=True,  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                                       timeout=30)
                    assert r.returncode == 0 and " done " in r.stdout
                m = await scrape(d.addresses["metrics"])
                assert metric(m, "shoal_dispatcher_tasks_finished_total") == 7
                assert metric(m, "shoal_dispatcher_tasks_submitted_total") == 7
                wm = await scrape(w1.addresses["metrics"])
                assert metric(wm, "shoal_worker_slots") == 2
                assert await w1.terminate() == 0 and await w2.terminate() == 0
            assert await d.terminate() == 0


async def test_failures_retries_timeouts_and_output_limits(tmp_path):
    py = sys.executable
    flaky = tmp_path / "flaky"
    tasks = [
        # fails on the first attempt, succeeds on the second
        {"name": "flaky", "retries": 1, "command": [
            py, "-c",
            f"import os,sys; p={str(flaky)!r}; e=os.path.exists(p); open(p,'a').close(); sys.exit(0 if e else 3)"]},
        # after flaky: its job fails when slow times out, and must not end before flaky's retry
        {"name": "slow", "timeout": 0.3, "deps": ["flaky"], "command": [py, "-c", "import time; time.sleep(30)"]},
        {"name": "after_slow", "builtin": "sleep 0", "deps": ["slow"]},
    ]
    big = [{"name": "big", "command": [py, "-c", "open('o','w').write('x'*5000); print('y'*100000)"],
            "outputs": [{"path": "o", "max_bytes": 1000}]}]
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:  # noqa: SIM117 - the worker needs the dispatcher's address
            async with await start_worker(tmp_path, d.addresses["rpc"], "w1", slots=3) as w:
                async with await connect(d) as c:
                    await wait_workers(c, 1)
                    j = (await c.call("submit", {"spec": spec(tasks)}))["job"]
                    view = await wait_job(c, j)
                    by = {t["task"]: t for t in view["tasks"]}
                    assert view["state"] == "failed"
                    assert by["flaky"]["state"] == "done" and by["flaky"]["attempts"] == 2
                    assert by["slow"]["state"] == "failed" and "timeout" in by["slow"]["error"]
                    assert by["after_slow"]["state"] == "cancelled"
                    j2 = (await c.call("submit", {"spec": spec(big)}))["job"]
                    view = await wait_job(c, j2)
                    (t,) = view["tasks"]
                    assert t["state"] == "failed" and "above its max_bytes" in t["error"]
                    logs = await c.call("job", {"id": j2, "logs": True})
                    assert len(logs["tasks"][0]["stdout"]) == 65536  # captured output is bounded
                wm = await scrape(w.addresses["metrics"])
                assert metric(wm, "shoal_worker_output_truncated_bytes_total") == 100001 - 65536
                assert metric(wm, 'shoal_worker_tasks_finished_total{result="timeout"}') == 1


async def test_bad_specs_are_refused_with_one_line_and_counted(tmp_path):
    bad = {
        "cycle": spec([{"name": "a", "builtin": "sleep 0", "deps": ["b"]},
                       {"name": "b", "builtin": "sleep 0", "deps": ["a"]}]),
        "unknown_dep": spec([{"name": "a", "builtin": "sleep 0", "deps": ["zz"]}]),
        "too_large": b"#" * 600_000,
        "syntax": b"[[tasks]\nname=",
        "too_many_tasks": spec([{"name": "a", "builtin": "sleep 0", "replicas": 20_000}]),
    }
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:
            async with await connect(d) as c:
                for reason, data in bad.items():
                    try:
                        await c.call("submit", {"spec": data})
                    except RpcError as exc:
                        assert exc.code == "bad_spec" and "\n" not in exc.message, (reason, exc)
                    else:
                        raise AssertionError(f"{reason}: accepted")
                try:
                    await c.call("submit", {"spec": spec([{"name": "a", "builtin": "sleep 0"}]), "policy": "psychic"})
                except RpcError as exc:
                    assert exc.code == "bad_params" and "psychic" in exc.message
                else:
                    raise AssertionError("unknown policy accepted")
                assert await c.call("jobs") == []
                # the daemon keeps serving
                assert (await c.call("submit", {"spec": spec([{"name": "ok", "builtin": "sleep 0"}])}))["job"] == 1
            cyc = tmp_path / "cycle.toml"
            cyc.write_text('[[tasks]]\nname = "a"\nbuiltin = "sleep 0"\ndeps = ["a"]\n')
            r = subprocess.run([*SHOAL, "submit", str(cyc), "--socket", str(d.submit_socket)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 2 and r.stderr == "shoal: cycle: a -> a\n", r.stderr
            m = await scrape(d.addresses["metrics"])
            for reason in bad:  # the CLI's cycle is the second one
                want = 2 if reason == "cycle" else 1
                assert metric(m, f'shoal_dispatcher_specs_rejected_total{{reason="{reason}"}}') == want, reason
            assert await d.terminate() == 0


async def test_learned_policies_keep_their_weights_across_restarts(tmp_path):
    import msgpack

    dstate = tmp_path / "dstate"
    job = spec([{"name": "t", "replicas": 6, "builtin": "sleep 0", "work": 2}], policy="dqn")
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path, state_dir=dstate) as d:
            async with await start_worker(tmp_path, d.addresses["rpc"], "w1",
                                          extra='queue_policy = "marl"') as w, await connect(d) as c:
                await wait_workers(c, 1)
                j = (await c.call("submit", {"spec": job}))["job"]
                assert (await wait_job(c, j))["state"] == "done"
                assert await w.terminate() == 0
            assert await d.terminate() == 0
        saved = msgpack.unpackb((dstate / "policies.msgpack").read_bytes(), raw=False)
        assert "dqn" in saved and saved["dqn"]
        assert msgpack.unpackb((tmp_path / "w1-state" / "queue-policy.msgpack").read_bytes(), raw=False)
        async with await start_dispatcher(tmp_path, state_dir=dstate) as d:
            async with await connect(d) as c:
                await c.call("submit", {"spec": job})  # first use of dqn after the restart loads it
            assert await d.terminate() == 0
            assert "restored the dqn policy's state" in d.log
        again = msgpack.unpackb((dstate / "policies.msgpack").read_bytes(), raw=False)
        assert again["dqn"] == saved["dqn"]  # loaded, not trained since: saved back unchanged


async def test_big_jobs_are_shown_page_by_page(tmp_path):
    big = spec([{"name": "t", "replicas": 4500, "builtin": "sleep 0"}])
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path) as d:
            async with await connect(d) as c:
                j = (await c.call("submit", {"spec": big}))["job"]
                first = await c.call("job", {"id": j})
                assert first["total"] == 4500 and first["counts"] == {"pending": 4500}
                assert 0 < len(first["tasks"]) < 4500
            r = subprocess.run([*SHOAL, "job", str(j), "--dispatcher", str(d.addresses["rpc"])],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            shown = [ln.split()[0] for ln in r.stdout.splitlines()[1:]]
            assert sorted(shown) == sorted(f"t.{i}" for i in range(4500))
            assert await d.terminate() == 0


async def test_token_authenticates_workers_and_clients(tmp_path):
    from shoal.daemons.runtime.rpc import RpcConnectionError, connect_tcp

    token = tmp_path / "token"
    token.write_text("correct horse battery staple 42\n")
    with trio.fail_after(60):
        async with await start_dispatcher(tmp_path, extra=f'token_file = "{token}"') as d:
            addr = d.addresses["rpc"]
            async with await start_worker(tmp_path, addr, "w1", extra=f'token_file = "{token}"') as w:
                async with await connect_tcp(addr, token=token.read_bytes().strip()) as c:
                    await wait_workers(c, 1)
                    j = (await c.call("submit", {"spec": spec([{"name": "a", "builtin": "sleep 0"}])}))["job"]
                    assert (await wait_job(c, j))["state"] == "done"
                try:
                    await connect_tcp(addr)
                except RpcConnectionError as exc:
                    assert exc.code == "unauthorized"
                else:
                    raise AssertionError("a client without the token was let in")
                r = subprocess.run([*SHOAL, "jobs", "--dispatcher", str(addr)], capture_output=True, text=True,  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                                   timeout=30)
                assert r.returncode == 2 and "unauthorized" in r.stderr
                r = subprocess.run([*SHOAL, "jobs", "--dispatcher", str(addr), "--token-file", str(token)],  # noqa: ASYNC221 - the CLI under test is its own process; the daemons run in others
                                   capture_output=True, text=True, timeout=30)
                assert r.returncode == 0 and " done " in r.stdout, r.stderr
                assert await w.terminate() == 0
            assert await d.terminate() == 0
