"""Data between tasks: task B names task A's output as an input and runs on another worker, with
its own work directory; the output comes from A's worker, verified by its recorded SHA-256."""

import contextlib
import hashlib
import json
import sys
import urllib.error
import urllib.request

import pytest
import trio

from shoal.core.dispatch.jobs import SpecError, job_from_dict
from tests.dispatcher.live import SHOAL, connect, metric, start_dispatcher, start_worker, wait_job, wait_workers
from tests.harness import scrape, start_daemon
from tests.peer.conftest import Lab, next_client_ip

PY = sys.executable
MAKE = ("import os,hashlib; d=os.urandom(5*2**20+123); open('result.bin','wb').write(d); "
        "print(hashlib.sha256(d).hexdigest())")
USE = "import hashlib; print(hashlib.sha256(open('A/result.bin','rb').read()).hexdigest())"


def test_task_inputs_name_declared_outputs_and_become_dependencies():
    a = {"name": "A", "command": ["true"], "outputs": ["result.bin"]}
    job = job_from_dict({"tasks": [{"name": "B", "command": ["true"], "inputs": ["task:A/result.bin"]}, a]})
    assert job.tasks["B"].deps == ("A",) and list(job.tasks) == ["A", "B"]
    fan = {"name": "f", "replicas": 2, "command": ["true"], "outputs": ["o"]}
    job = job_from_dict({"tasks": [fan, {"name": "j", "command": ["true"], "inputs": ["task:f.0/o", "task:f.1/o"]}]})
    assert job.tasks["j"].deps == ("f.0", "f.1")
    for inputs, words in ((["task:A/other"], "declares no output"), (["task:Z/x"], "not a task"),
                          (["task:f/o"], "name one replica"), (["task:A"], "task:NAME/OUTPUT")):
        with pytest.raises(SpecError, match=words):
            job_from_dict({"tasks": [a, fan, {"name": "B", "command": ["true"], "inputs": inputs}]})


def _get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_task_reads_another_tasks_output_from_another_worker(tmp_path):
    tasks = [
        {"name": "A", "cpus": 3, "command": [PY, "-c", MAKE], "outputs": [{"path": "result.bin", "max_bytes": 2**23}]},
        {"name": "B", "memory": "2GB", "command": [PY, "-c", USE], "inputs": ["task:A/result.bin"]},  # w2 only
        {"name": "C", "cpus": 3, "command": [PY, "-c", USE], "inputs": ["task:A/result.bin"]},  # w1, as A
    ]
    w1_extra = 'cpus = 4.0\nmemory = 1000000000\noutput_retention = 0.5\nwork_dir = "{}"'.format(tmp_path / "w1work")
    w2_extra = 'cpus = 1.0\nmemory = 8000000000\nwork_dir = "{}"'.format(tmp_path / "w2work")
    with trio.fail_after(90):
        async with await start_dispatcher(tmp_path) as d:
            addr = d.addresses["rpc"]
            async with await start_worker(tmp_path, addr, "w1", extra=w1_extra) as w1, \
                    await start_worker(tmp_path, addr, "w2", extra=w2_extra) as w2, await connect(d) as c:
                await wait_workers(c, 2)
                job = (await c.call("submit", {"spec": json.dumps({"name": "data", "tasks": tasks}).encode()}))["job"]
                view = await wait_job(c, job)
                assert view["state"] == "done", view
                logs = {t["task"]: t for t in (await c.call("job", {"id": job, "logs": True}))["tasks"]}
                assert logs["A"]["worker"] == "w1" and logs["B"]["worker"] == "w2" and logs["C"]["worker"] == "w1"
                made = logs["A"]["stdout"].decode().strip()
                assert logs["A"]["outputs"][0][2] == made  # the recorded SHA-256
                assert logs["B"]["stdout"].decode().strip() == made == logs["C"]["stdout"].decode().strip()
                assert "secret" not in json.dumps(view, default=str)  # the capability is not shown to readers
                m2 = await scrape(w2.addresses["metrics"])
                assert metric(m2, 'shoal_worker_task_inputs_fetched_total{how="http"}') == 1
                m1 = await scrape(w1.addresses["metrics"])
                assert metric(m1, 'shoal_worker_task_inputs_fetched_total{how="local"}') == 1
                assert metric(m1, "shoal_worker_output_served_bytes_total") == 5 * 2**20 + 123
                # hostile requests to the output server: refused and counted
                out = f"http://{w1.addresses['outputs']}/{job}/A/result.bin"
                assert _get(out, None) == 403 and _get(out, "0" * 32) == 403
                assert _get(f"http://{w1.addresses['outputs']}/{job}/A/../../etc/passwd", "x") in (400, 404)
                m1 = await scrape(w1.addresses["metrics"])
                assert metric(m1, 'shoal_worker_output_requests_refused_total{reason="forbidden"}') == 2
                # the job has ended: after output_retention its outputs leave w1
                with trio.fail_after(20):
                    while (tmp_path / "w1work" / str(job)).exists():  # noqa: ASYNC110 - another process's files
                        await trio.sleep(0.05)
                m1 = await scrape(w1.addresses["metrics"])
                assert metric(m1, "shoal_worker_outputs_swept_total") == 1
                assert _get(out, "0" * 32) == 404  # forgotten

                # a tampered output is never handed to a task: the consumer fails, saying why
                tamper = [
                    {"name": "A", "cpus": 3, "outputs": ["result.bin"], "command": [PY, "-c", MAKE]},
                    {"name": "T", "cpus": 3, "deps": ["A"], "command": [
                        PY, "-c", "import os; open(os.environ['SHOAL_JOB'] + '/A/result.bin', 'r+b').write(b'evil')"]},
                    {"name": "B", "memory": "2GB", "deps": ["T"], "command": [PY, "-c", USE],
                     "inputs": ["task:A/result.bin"]},
                ]
                j2 = (await c.call("submit", {"spec": json.dumps({"name": "t", "tasks": tamper}).encode()}))["job"]
                view = await wait_job(c, j2)
                by = {t["task"]: t for t in view["tasks"]}
                assert view["state"] == "failed" and by["B"]["state"] == "failed", view
                assert "SHA-256" in by["B"]["error"] and by["B"]["exit_code"] is None
                assert hashlib.sha256(b"").hexdigest() not in by["B"]["error"]
                assert await w1.terminate() == 0 and await w2.terminate() == 0
            assert await d.terminate() == 0


async def test_a_producer_worker_killed_and_restarted_still_serves_its_published_output(tmp_path):
    # A on w1 publishes its output; w1 is killed -9 and started again (same state directory and
    # outputs address) before B, on w2, fetches it. The restart used to forget the secrets: B
    # failed with "input: ... 404".
    from tests.promlab import free_port

    gate = tmp_path / "gate"
    wait = (f"import os,time; t=time.monotonic()+60\n"
            f"while not os.path.exists({str(gate)!r}) and time.monotonic()<t: time.sleep(0.05)")
    tasks = [
        {"name": "A", "cpus": 3, "command": [PY, "-c", MAKE], "outputs": ["result.bin"]},
        {"name": "G", "memory": "2GB", "command": [PY, "-c", wait]},  # w2 only: holds B until told
        {"name": "B", "memory": "2GB", "deps": ["G"], "command": [PY, "-c", USE], "inputs": ["task:A/result.bin"]},
    ]
    w1_extra = f'cpus = 4.0\nmemory = 1000000000\noutputs_listen = "127.0.0.1:{free_port()}"\n' \
               f'work_dir = "{tmp_path / "w1work"}"'
    w2_extra = f'cpus = 1.0\nmemory = 8000000000\nwork_dir = "{tmp_path / "w2work"}"'
    with trio.fail_after(120):
        async with await start_dispatcher(tmp_path) as d:
            addr = d.addresses["rpc"]
            async with await start_worker(tmp_path, addr, "w2", extra=w2_extra) as w2, await connect(d) as c:
                w1 = await start_worker(tmp_path, addr, "w1", extra=w1_extra)
                async with w1:
                    await wait_workers(c, 2)
                    job = (await c.call("submit", {"spec": json.dumps({"name": "r", "tasks": tasks}).encode()}))["job"]
                    states = {}
                    while states.get("A") != "done":  # noqa: ASYNC110 - another process's state: polled
                        states = {t["task"]: t["state"] for t in (await c.call("job", {"id": job}))["tasks"]}
                        await trio.sleep(0.05)
                    out = tmp_path / "w1work" / str(job) / "A" / "result.bin"
                    made = hashlib.sha256(out.read_bytes()).hexdigest()
                    assert await w1.kill() == -9
                async with await start_worker(tmp_path, addr, "w1", extra=w1_extra) as w1:
                    m1 = await scrape(w1.addresses["metrics"])  # up and serving again
                    assert metric(m1, "shoal_worker_output_served_bytes_total") == 0
                    gate.touch()
                    view = await wait_job(c, job, timeout=60)
                    by = {t["task"]: t for t in (await c.call("job", {"id": job, "logs": True}))["tasks"]}
                    assert view["state"] == "done", (view, by["B"].get("error"))
                    assert by["B"]["worker"] == "w2" and by["B"]["stdout"].decode().strip() == made
                    assert metric(await scrape(w1.addresses["metrics"]), "shoal_worker_output_served_bytes_total") \
                        == 5 * 2**20 + 123
                    assert await w1.terminate() == 0
                assert await w2.terminate() == 0
            assert await d.terminate() == 0


def peer_config(path, sock, downloads) -> str:
    path.write_text(f"""
[daemon]
metrics_listen = "127.0.0.1:0"
stop_timeout = 5.0
[peer]
listen = "{next_client_ip()}:0"
download_dir = "{downloads}"
control_socket = "{sock}"
""")
    return str(path)


async def test_the_consumer_fetches_the_output_through_the_swarm(tmp_path):
    """With publish_tracker, the producer's peer seeds A's output; B's worker fetches it by info-hash
    (a magnet link: metadata and pieces from the swarm), then checks the recorded SHA-256."""
    tasks = [
        {"name": "A", "cpus": 3, "command": [PY, "-c", MAKE], "outputs": [{"path": "result.bin", "max_bytes": 2**23}]},
        {"name": "B", "memory": "2GB", "command": [PY, "-c", USE], "inputs": ["task:A/result.bin"]},
    ]
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            tracker = await Lab(nursery, tmp_path).tracker()
            announce = f"http://{tracker['http']}/announce"
            s1, s2 = tmp_path / "p1.sock", tmp_path / "p2.sock"
            async with await start_daemon([*SHOAL, "peer", "run", "--config",
                                           peer_config(tmp_path / "p1.toml", s1, tmp_path / "p1dl")],
                                          state_dir=tmp_path / "p1") as p1, \
                    await start_daemon([*SHOAL, "peer", "run", "--config",
                                        peer_config(tmp_path / "p2.toml", s2, tmp_path / "p2dl")],
                                       state_dir=tmp_path / "p2") as p2, \
                    await start_dispatcher(tmp_path) as d:
                addr = d.addresses["rpc"]
                w1_extra = (f'cpus = 4.0\nmemory = 1000000000\nwork_dir = "{tmp_path / "w1work"}"\n'
                            f'peer_socket = "{s1}"\npublish_tracker = "{announce}"')
                w2_extra = f'cpus = 1.0\nmemory = 8000000000\nwork_dir = "{tmp_path / "w2work"}"\npeer_socket = "{s2}"'
                async with await start_worker(tmp_path, addr, "w1", extra=w1_extra) as w1, \
                        await start_worker(tmp_path, addr, "w2", extra=w2_extra) as w2, await connect(d) as c:
                    await wait_workers(c, 2)
                    spec = json.dumps({"name": "swarm", "tasks": tasks}).encode()
                    job = (await c.call("submit", {"spec": spec}))["job"]
                    view = await wait_job(c, job, timeout=60)
                    assert view["state"] == "done", view
                    logs = {t["task"]: t for t in (await c.call("job", {"id": job, "logs": True}))["tasks"]}
                    assert logs["B"]["stdout"].decode().strip() == logs["A"]["stdout"].decode().strip()
                    m2 = await scrape(w2.addresses["metrics"])
                    assert metric(m2, 'shoal_worker_task_inputs_fetched_total{how="swarm"}') == 1
                    m1 = await scrape(w1.addresses["metrics"])
                    assert metric(m1, "shoal_worker_output_served_bytes_total") == 0  # none over HTTP
                    assert await w1.terminate() == 0 and await w2.terminate() == 0
                assert await d.terminate() == 0
                assert await p1.terminate() == 0 and await p2.terminate() == 0
            nursery.cancel_scope.cancel()


async def test_published_outputs_survive_a_restart_and_a_bad_state_file_is_refused_in_one_line(tmp_path, caplog):
    from shoal.daemons.runtime.config import ListenAddr
    from shoal.daemons.worker.outputs import OutputServer, _http_fetch

    state = tmp_path / "outputs.json"
    (tmp_path / "work" / "7" / "A").mkdir(parents=True)
    (tmp_path / "work" / "7" / "A" / "out.bin").write_bytes(b"x" * 1000)
    (tmp_path / "work" / "8" / "A").mkdir(parents=True)
    (tmp_path / "work" / "8" / "A" / "out.bin").write_bytes(b"y")

    @contextlib.asynccontextmanager
    async def serving(server: OutputServer):
        async with trio.open_nursery() as n:
            await n.start(server.serve, ListenAddr("127.0.0.1", 0))
            yield server
            n.cancel_scope.cancel()

    async def fetch(server: OutputServer, job: int, secret: str, size: int) -> str:
        return await trio.to_thread.run_sync(_http_fetch, f"{server.url}/{job}/A/out.bin", secret, size,
                                             tmp_path / "got")

    first = OutputServer(tmp_path / "work", retention=60.0, state_file=state)
    async with serving(first) as s:
        src7 = await s.publish(7, "A", tmp_path / "work" / "7" / "A", [["out.bin", 1000, "-"]])
        src8 = await s.publish(8, "A", tmp_path / "work" / "8" / "A", [["out.bin", 1, "-"]])
    assert state.stat().st_mode & 0o777 == 0o600  # secrets inside
    (tmp_path / "work" / "9").mkdir()
    async with serving(first) as s, trio.open_nursery() as n:  # publishes at once: each save whole, the last last
        for t in ("A", "B", "C"):
            (tmp_path / "work" / "9" / t).mkdir()
            n.start_soon(s.publish, 9, t, tmp_path / "work" / "9" / t, [["out.bin", 1, "-"]])
    assert {k for k in OutputServer(tmp_path / "work", retention=60.0, state_file=state).published} == {
        (7, "A"), (8, "A"), (9, "A"), (9, "B"), (9, "C")}
    (tmp_path / "work" / "8" / "A" / "out.bin").unlink()
    (tmp_path / "work" / "8" / "A").rmdir()  # job 8's directory went while the worker was down
    again = OutputServer(tmp_path / "work", retention=60.0, state_file=state)
    assert set(again.published) == {(7, "A"), (9, "A"), (9, "B"), (9, "C")} and again.jobs() == [7, 9]
    async with serving(again) as s:
        assert await fetch(s, 7, src7["secret"], 1000) == hashlib.sha256(b"x" * 1000).hexdigest()
        with pytest.raises(urllib.error.HTTPError) as e:
            await fetch(s, 7, src8["secret"], 1000)  # another task's secret
        assert e.value.code == 403
    for bad in (b"{not json", b'[{"job": "seven"}]', b'{"job": 7}'):
        state.write_bytes(bad)
        caplog.clear()
        broken = OutputServer(tmp_path / "work", retention=60.0, state_file=state)
        assert broken.published == {}
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0] and str(state) in errors[0], errors
