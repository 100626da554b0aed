"""One task on a worker: inputs, bounded output capture, output checks, timeouts."""

import os
import sys

import trio

from shoal.daemons.runtime.config import ListenAddr
from shoal.daemons.runtime.http import HttpResponse, serve_http
from shoal.daemons.worker.runner import RunLimits, SwarmHook, run_task

PY = sys.executable


def task(name="t", command=(), builtin="", timeout=10.0, inputs=(), outputs=()):
    return {"name": name, "command": list(command), "builtin": builtin, "timeout": timeout,
            "inputs": list(inputs), "outputs": [list(o) for o in outputs]}


async def test_inputs_from_a_path_and_a_url_and_outputs_with_hashes(tmp_path):
    src = tmp_path / "local.txt"
    src.write_text("from disk")

    async def handler(req):
        return HttpResponse(200, [(b"content-type", b"text/plain")], b"from http")

    limits = RunLimits(tmp_path / "work", max_log_bytes=1000)
    limits.work_dir.mkdir()
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(serve_http, handler, ListenAddr("127.0.0.1", 0))
        code = "a=open('local.txt').read(); b=open('remote.txt').read(); open('out','w').write(a+'+'+b); print(a, b)"
        t = task(command=[PY, "-c", code], inputs=[str(src), f"http://{addr}/remote.txt"], outputs=[("out", 100)])
        with trio.fail_after(30):
            r = await run_task(t, "7/t", 1, limits, SwarmHook(None))
        nursery.cancel_scope.cancel()
    assert r.ok, r
    assert r.stdout == b"from disk from http\n"
    assert (limits.work_dir / "7" / "t" / "out").read_text() == "from disk+from http"
    assert r.outputs[0][:2] == ["out", len("from disk+from http")] and len(r.outputs[0][2]) == 64


async def test_bad_inputs_are_errors_and_the_task_does_not_run(tmp_path):
    limits = RunLimits(tmp_path, max_input_bytes=10)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100)
    marker = tmp_path / "ran"
    cmd = [PY, "-c", f"open({str(marker)!r},'w')"]
    for inputs, words in (([str(big)], "above max_input_bytes"), (["/nonexistent/file"], "No such file"),
                          (["swarm:/x.torrent"], "no swarm peer configured"),
                          (["http://127.0.0.1:9/x"], "input: http://127.0.0.1:9/x")):
        with trio.fail_after(30):
            r = await run_task(task(command=cmd, inputs=inputs), "1/t", 1, limits, SwarmHook(None))
        assert r.exit_code is None and words in r.error, (inputs, r.error)
    assert not marker.exists()


async def test_output_capture_is_bounded_and_exit_codes_and_missing_outputs_fail(tmp_path):
    limits = RunLimits(tmp_path, max_log_bytes=10)
    with trio.fail_after(30):
        r = await run_task(task(command=[PY, "-c", "import sys; print('a'*50); sys.exit(4)"]), "1/t", 1, limits,
                           SwarmHook(None))
        assert r.exit_code == 4 and not r.ok and r.stdout == b"a" * 10
        r = await run_task(task(command=["true"], outputs=[("missing", 10)]), "1/t", 1, limits, SwarmHook(None))
        assert r.exit_code == 0 and not r.ok and "missing" in r.error
        r = await run_task(task(command=["/no/such/program"]), "1/t", 1, limits, SwarmHook(None))
        assert r.exit_code is None and "cannot start" in r.error


async def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # the task starts a grandchild that would outlive a kill of the direct child alone
    code = ("import subprocess,sys,time; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);"
            f"open({str(pidfile)!r},'w').write(str(p.pid)); time.sleep(60)")
    with trio.fail_after(30):
        r = await run_task(task(command=[PY, "-c", code], timeout=1.0), "1/t", 1, RunLimits(tmp_path),
                           SwarmHook(None))
    assert r.exit_code is None and r.error.startswith("timeout")
    pid = int(pidfile.read_text())
    with trio.fail_after(10):
        while True:  # the grandchild is gone (reaped by init) once the group was killed
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:
                with open(f"/proc/{pid}/stat") as f:  # noqa: ASYNC230 - one small /proc read
                    if f.read().split()[2] == "Z":
                        break
            except FileNotFoundError:
                break
            await trio.sleep(0.02)


async def test_builtin_sleep_runs_in_process(tmp_path):
    with trio.fail_after(5):
        r = await run_task(task(builtin="sleep 0"), "1/t", 1, RunLimits(tmp_path), SwarmHook(None))
    assert r.ok and r.finished >= r.started


def test_a_units_logs_are_trimmed_to_fit_one_report():
    from shoal.daemons.worker.daemon import _trim_logs
    from shoal.protocol.dispatch import TaskResult

    results = [TaskResult(f"t{i}", 0, 0.0, 0.0, stdout=b"o" * 65536, stderr=b"e" * 65536) for i in range(10)]
    _trim_logs(results, 384 * 1024)
    assert sum(len(r.stdout) + len(r.stderr) for r in results) <= 384 * 1024
    assert all(r.stdout.startswith(b"o") and r.stderr.startswith(b"e") for r in results)  # heads are kept
    small = [TaskResult("t", 0, 0.0, 0.0, stdout=b"x" * 10)]
    _trim_logs(small, 384 * 1024)
    assert small[0].stdout == b"x" * 10
